"""Tier `slurm`: the batch scripts and essa-submit on a real one-node SLURM (tests/real_slurm.py).

What the fake-tool tests of test_slurm.py cannot show: that sbatch, srun's pmi2 and the pip MPICH
wheel start real MPI ranks; that ``scancel --signal=USR2 --batch`` reaches the batch shell, which
checkpoints, exits 75 and ``scontrol requeue``s, and that the requeued job resumes to a log identical to
an uninterrupted job's; that a sweep is one job array under submitit; and that a dead rank ends the job
(``srun --kill-on-bad-exit``) instead of leaving the others blocked in an Allgather. The runs use the
fake backend (no model), so each job takes seconds.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from . import real_slurm
from .conftest import BIN, REPO, logged_generations

pytestmark = [pytest.mark.slurm, pytest.mark.mpi]

FAST = "backend.fake_dim=8 search.popsize=6 task.batch_size=4 eval.size=4 eval.every=0 log.progress=true"
SAME = ("gen/rewards", "gen/seeds", "gen/sigma", "final/mean")  # what must match bit for bit (timings do not)


@pytest.fixture(scope="module")
def cluster() -> Iterator[real_slurm.Cluster]:
    got = real_slurm.start()
    if isinstance(got, str):
        pytest.skip(got)
    yield got
    got.stop()


def job_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "HYDRA_", "SLURM_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the ranks' `python` is this venv's
        ESSA_HOME=str(REPO),
        ESSA_PYTHON=sys.executable,
        ESSA_SRUN_MPI="pmi2",
        ESSA_RUN_DIR=str(tmp_path / "runs"),
        OMP_NUM_THREADS="1",
        **extra,
    )
    return env


def sbatch(tmp_path: Path, env: dict[str, str], *args: str) -> str:
    cmd = ["sbatch", "--parsable", f"--output={tmp_path}/%x-%j.out", "--ntasks-per-node=2", "--cpus-per-task=1", *args]
    p = subprocess.run([*cmd, str(REPO / "slurm" / "essa_debug.sh")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def job(job_id: str) -> dict[str, str]:
    """``scontrol show job -o`` as a dict (JobState, Restarts, ExitCode, ...)."""
    p = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return dict(kv.split("=", 1) for kv in p.stdout.split() if "=" in kv)


def wait_for(what: str, ok: Callable[[], bool], timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def finished(job_id: str) -> bool:
    return job(job_id)["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def read(log: Path) -> dict[str, np.ndarray]:
    with h5py.File(log, "r") as f:
        return {k: f[k][()] for k in SAME}


def output(tmp_path: Path, job_id: str) -> str:
    return (tmp_path / f"essa-debug-{job_id}.out").read_text()


def test_sbatch_debug_script_runs_two_mpi_ranks(cluster: real_slurm.Cluster, tmp_path: Path) -> None:
    env = job_env(tmp_path, ESSA_GENERATIONS="3", ESSA_SET=FAST)
    jid = sbatch(tmp_path, env)
    wait_for(f"job {jid}", lambda: finished(jid))
    info, out = job(jid), output(tmp_path, jid)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), out
    assert "launch: srun --mpi=pmi2 --kill-on-bad-exit=1 --ntasks=2" in out
    assert "| 2 rank(s) × 1 thread(s) |" in out  # essa_hpc.run saw an MPI world of two
    run_dir = tmp_path / "runs" / f"fake_scaling_{jid}"
    with h5py.File(run_dir / "log.h5", "r") as f:
        assert f["gen/rewards"].shape == (3, 6)
        assert int(f.attrs["world_size"]) == 2


def test_usr2_preemption_requeues_and_resumes_to_the_uninterrupted_log(cluster: real_slurm.Cluster, tmp_path: Path) -> None:
    gens = 30
    env = job_env(tmp_path, ESSA_GENERATIONS=str(gens), ESSA_SET=f"{FAST} backend.fake_sleep_s=0.02 log.checkpoint_every=1000")
    whole = sbatch(tmp_path, env)
    cut = sbatch(tmp_path, env)
    cut_log = tmp_path / "runs" / f"fake_scaling_{cut}" / "log.h5"
    wait_for("3 generations of the job to preempt", lambda: logged_generations(cut_log) >= 3 or finished(cut))
    assert not finished(cut), "the job ended before it could be preempted; raise the generations"
    p = subprocess.run(["scancel", "--signal=USR2", "--batch", cut], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    # the batch shell's exit 75 shows briefly as FAILED before the requeue turns the job PENDING
    wait_for(f"job {cut} requeued", lambda: (job(cut)["JobState"], job(cut).get("Restarts")) == ("PENDING", "1"))
    # it starts again once its credential expires (tests/real_slurm.py: cred_expire=10 instead of 120 s)
    wait_for("both jobs", lambda: finished(whole) and finished(cut), timeout=300)
    out = output(tmp_path, cut)
    assert job(cut)["JobState"] == "COMPLETED" and job(whole)["JobState"] == "COMPLETED", out
    assert "batch shell got SIGUSR2" in out
    m = re.search(r"checkpointed at generation (\d+); exit 75", out)
    assert m is not None and 0 < int(m.group(1)) < gens, out
    assert f"scontrol requeue {cut} (restart 1)" in out
    assert f"resuming at generation {m.group(1)}" in out
    a, b = read(tmp_path / "runs" / f"fake_scaling_{whole}" / "log.h5"), read(cut_log)
    assert a["gen/rewards"].shape == (gens, 6)
    for key in SAME:
        assert np.array_equal(a[key], b[key]), key


def test_submitit_sweep_is_one_job_array(cluster: real_slurm.Cluster, tmp_path: Path) -> None:
    env = job_env(tmp_path)
    cmd = [sys.executable, "-m", "essa_hpc.submit", "--config", "fake_scaling", "--cluster", "slurm"]
    cmd += ["--sweep", "search.popsize=4,6", "--set", "run.generations=2", "--set", "backend.fake_dim=8", "--set", "eval.size=4"]
    cmd += ["--tasks-per-node", "2", "--cpus-per-task", "1", "--srun-mpi", "pmi2", "--time", "10", "--run-dir", str(tmp_path / "runs")]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    index = json.loads((tmp_path / "runs" / "sweeps" / "fake_scaling" / "sweep.json").read_text())
    ids = [str(r["job_id"]) for r in index["points"]]
    assert len(ids) == 2 and len({i.split("_")[0] for i in ids}) == 1 and {i.split("_")[1] for i in ids} == {"0", "1"}, ids
    for jid in ids:
        wait_for(f"array task {jid}", lambda jid=jid: finished(jid))
        assert job(jid)["JobState"] == "COMPLETED", job(jid)
    for lam in (4, 6):
        with h5py.File(tmp_path / "runs" / f"fake_scaling_p{lam}" / "log.h5", "r") as f:
            assert f["gen/rewards"].shape == (2, lam)


def _rank_pid(job_id: str, rank: int) -> int | None:
    """The pid of MPI rank ``rank``'s python in job ``job_id`` (from /proc: this is one node)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        ours = f"SLURM_JOB_ID={job_id}".encode() in environ and f"SLURM_PROCID={rank}".encode() in environ
        if ours and b"python" in cmdline.split(b"\0")[0] and b"essa_hpc.run" in cmdline:  # not the bash wrapper
            return int(proc.name)
    return None


def test_a_dead_rank_ends_the_job_without_requeue(cluster: real_slurm.Cluster, tmp_path: Path) -> None:
    env = job_env(tmp_path, ESSA_GENERATIONS="100000", ESSA_SET=f"{FAST} backend.fake_sleep_s=0.02")
    jid = sbatch(tmp_path, env)
    log = tmp_path / "runs" / f"fake_scaling_{jid}" / "log.h5"
    wait_for("2 generations", lambda: logged_generations(log) >= 2)
    pid = _rank_pid(jid, 1)
    assert pid is not None, "rank 1's python not found in /proc"
    os.kill(pid, signal.SIGKILL)
    wait_for(f"job {jid} to end after its rank 1 died", lambda: finished(jid), timeout=90)
    info, out = job(jid), output(tmp_path, jid)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", out
    assert "scontrol requeue" not in out
