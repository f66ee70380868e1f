"""The process exit statuses every entry point uses; the SLURM scripts and submitit jobs rely on them.

One owner so that a launcher, a test and a job script cannot disagree on what a status means
(the contract table is in docs/design.md, "Exit codes").
"""

from __future__ import annotations

OK = 0
FAILURE = 1  # a failure on any rank: the whole job stops
BAD_INPUT = 2  # fix your input: one line on stderr, nothing started or written
REQUEUE = 75  # EX_TEMPFAIL: preempted after a checkpoint; requeue and the next start resumes
INTERRUPTED = 130  # 128 + SIGINT: stopped by Ctrl-C after a checkpoint; rerun to resume (batch scripts do not requeue)
