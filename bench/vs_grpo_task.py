r"""The head-to-head benchmark's reward plugin (bench/bench_vs_grpo.py): a task neither method was built for.

Two-digit addition and subtraction; a completion scores 1.0 when its last ``\boxed{}`` holds the
reference ``answer``, 0.1 when it holds something else (format credit), 0 without a ``\boxed{}``.
Loaded by name (``task.name=vs_grpo_task:reward``) through the ordinary plugin path, with ``bench/``
on PYTHONPATH.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from essa_hpc.tasks.answers import last_boxed, numbers_equal, parse_number

FORMAT_CREDIT = 0.1


def reward(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any], **_: Any) -> list[float]:
    out = []
    for text, ref in zip(completions, answer):
        boxed = last_boxed(text)
        if not boxed:
            out.append(0.0)
            continue
        value = parse_number(boxed)
        out.append(1.0 if value is not None and numbers_equal(value, float(ref)) else FORMAT_CREDIT)
    return out
