"""Tier 2: the distributed engine under real `mpiexec` with the fake backend (no model).

The same config must give bit-identical rewards and final mean on 1, 2, 3 and 4 ranks, for λ smaller
than, equal to and larger than the world size; a perturbed optimizer on one rank is caught and named;
a killed rank takes the whole job down; SIGUSR2 checkpoints and exits with the requeue code; and an
interrupted run resumes to exactly the uninterrupted result.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from essa_hpc.run import REQUEUE_EXIT_CODE

from .conftest import REPO, cli_env, logged_generations, mpiexec, run_cli

pytestmark = pytest.mark.mpi

FAKE = [
    "--set",
    "backend.name=fake",
    "--set",
    "task.name=fake",
    "--set",
    "backend.fake_dim=12",
    "--set",
    "backend.fake_noise=0.3",
    "--set",
    "task.batch_size=5",
    "--set",
    "eval.size=8",
    "--set",
    "search.sigma0=0.3",
    "--set",
    "log.progress=false",
]


def fake_args(tmp: Path, name: str, *extra: str) -> list[str]:
    return [*FAKE, "--set", f"run.dir={tmp}", "--set", f"run.name={name}", *extra]


def read(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r", libver="latest", swmr=True) as f:
        return {k: f[k][()] for k in ("gen/rewards", "gen/seeds", "gen/sigma", "final/mean", "eval/gen", "gen/timings", "gen/tokens")}


@pytest.mark.parametrize("popsize", [3, 4, 7])
def test_identical_across_rank_counts(tmp_path: Path, popsize: int) -> None:
    logs = {}
    for ranks in (1, 2, 3, 4):
        name = f"p{popsize}n{ranks}"
        r = run_cli(
            fake_args(tmp_path, name, "--set", f"search.popsize={popsize}", "--set", "run.generations=30", "--set", "eval.every=10"),
            REPO,
            ranks=ranks,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        logs[ranks] = read(tmp_path / name / "log.h5")
    ref = logs[1]
    assert ref["gen/rewards"].shape == (30, popsize)
    for ranks in (2, 3, 4):
        got = logs[ranks]
        assert np.array_equal(got["gen/rewards"], ref["gen/rewards"]), f"{ranks} ranks: rewards differ"
        assert np.array_equal(got["gen/seeds"], ref["gen/seeds"])
        assert np.array_equal(got["gen/sigma"], ref["gen/sigma"])
        assert np.array_equal(got["final/mean"], ref["final/mean"]), f"{ranks} ranks: final mean differs"
        assert got["gen/timings"].shape == (30, ranks, 8) and (got["gen/timings"][:, :, 0] >= 0).all()
    # the optimizer made progress on the noisy sphere
    assert ref["gen/rewards"][-5:].mean() > ref["gen/rewards"][:5].mean()


PERTURB = """
import os, sys
import essa_hpc.search as search
orig = search.make_optimizer
def patched(cfg, dim, seed, **kw):
    opt = orig(cfg, dim, seed, **kw)
    if os.environ.get("PMI_RANK") == "1":
        tell = opt.tell
        def bad_tell(X, f):
            tell(X, f)
            if opt.generation == 4:
                opt._es.mean[0] += 1e-12  # a silent one-ulp-scale divergence on rank 1 only
        opt.tell = bad_tell
    return opt
search.make_optimizer = patched
from essa_hpc.run import main
sys.exit(main(sys.argv[1:]))
"""


def test_perturbed_rank_is_named(tmp_path: Path) -> None:
    script = tmp_path / "perturb.py"
    script.write_text(PERTURB)
    cmd = [mpiexec(), "-n", "3", sys.executable, str(script), *fake_args(tmp_path, "div", "--set", "run.generations=10")]
    r = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode != 0
    assert "diverged at generation 4: ranks [1]" in r.stderr + r.stdout


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _rank_pids(mpi_pid: int) -> list[int]:
    pids = []
    for p in _descendants(mpi_pid):
        try:
            if b"essa_hpc.run" in Path(f"/proc/{p}/cmdline").read_bytes():
                pids.append(p)
        except OSError:
            pass
    return sorted(pids)


def _wait_generations(log: Path, n: int, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, "the run ended before it was interrupted"
        if logged_generations(log) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"{log} never reached {n} generations")


def _start(tmp_path: Path, name: str, ranks: int, *extra: str) -> subprocess.Popen[str]:
    cmd = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "essa_hpc.run", *fake_args(tmp_path, name, *extra)]
    return subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_of_one_rank_ends_the_job(tmp_path: Path) -> None:
    proc = _start(tmp_path, "kill", 3, "--set", "run.generations=1000", "--set", "backend.fake_sleep_s=0.02")
    try:
        _wait_generations(tmp_path / "kill" / "log.h5", 2, proc)
        ranks = _rank_pids(proc.pid)
        assert len(ranks) == 3
        os.kill(ranks[-1], signal.SIGKILL)
        t0 = time.time()
        proc.wait(timeout=60)
        assert proc.returncode != 0
        assert time.time() - t0 < 60
    finally:
        if proc.poll() is None:
            proc.kill()
    # the log stays readable up to the last flushed generation
    assert read(tmp_path / "kill" / "log.h5")["gen/rewards"].shape[0] >= 2


def test_sigusr2_checkpoints_requeues_and_resumes_identically(tmp_path: Path) -> None:
    extra = (
        "--set",
        "run.generations=16",
        "--set",
        "search.popsize=5",
        "--set",
        "log.checkpoint_every=4",
        "--set",
        "eval.every=4",
        "--set",
        "backend.fake_sleep_s=0.06",
    )
    r = run_cli(fake_args(tmp_path, "whole", *extra), REPO, ranks=2)
    assert r.returncode == 0, r.stderr
    proc = _start(tmp_path, "cut", 2, *extra)
    _wait_generations(tmp_path / "cut" / "log.h5", 3, proc)
    os.kill(_rank_pids(proc.pid)[1], signal.SIGUSR2)  # one rank is told; all must stop together
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE_EXIT_CODE, err
    assert (tmp_path / "cut" / "checkpoints" / "latest.pkl").exists()
    assert not (tmp_path / "cut" / "adapter").exists()
    r = run_cli(fake_args(tmp_path, "cut", *extra), REPO, ranks=2)  # automatic resume: same command
    assert r.returncode == 0, r.stderr
    assert "resuming at generation" in r.stdout
    a, b = read(tmp_path / "whole" / "log.h5"), read(tmp_path / "cut" / "log.h5")
    for key in ("gen/rewards", "gen/seeds", "gen/sigma", "final/mean", "eval/gen"):
        assert np.array_equal(a[key], b[key]), key


def test_sigkill_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    extra = (
        "--set",
        "run.generations=14",
        "--set",
        "search.popsize=4",
        "--set",
        "log.checkpoint_every=3",
        "--set",
        "eval.every=5",
        "--set",
        "backend.fake_sleep_s=0.06",
    )
    r = run_cli(fake_args(tmp_path, "whole", *extra), REPO, ranks=1)
    assert r.returncode == 0, r.stderr
    proc = _start(tmp_path, "cut", 2, *extra)
    _wait_generations(tmp_path / "cut" / "log.h5", 5, proc)
    ranks = _rank_pids(proc.pid)  # before the launcher dies: afterwards the ranks are no longer its children
    for p in ranks:
        os.kill(p, signal.SIGKILL)
    proc.kill()
    proc.wait(timeout=30)
    r = run_cli(fake_args(tmp_path, "cut", *extra, "--resume"), REPO, ranks=2)
    assert r.returncode == 0, r.stderr
    a, b = read(tmp_path / "whole" / "log.h5"), read(tmp_path / "cut" / "log.h5")
    for key in ("gen/rewards", "gen/seeds", "gen/sigma", "final/mean", "eval/gen"):
        assert np.array_equal(a[key], b[key]), key


def test_existing_run_is_never_silently_overwritten(tmp_path: Path) -> None:
    args = fake_args(tmp_path, "once", "--set", "run.generations=2")
    assert run_cli(args, REPO).returncode == 0
    (tmp_path / "once" / "checkpoints" / "latest.pkl").unlink()
    r = run_cli(args, REPO)
    assert r.returncode == 2 and "already holds a run" in r.stderr
    r = run_cli([*args, "--set", "run.overwrite=true"], REPO)
    assert r.returncode == 0, r.stderr


def test_resume_with_changed_config_is_refused(tmp_path: Path) -> None:
    assert run_cli(fake_args(tmp_path, "c", "--set", "run.generations=2"), REPO).returncode == 0
    r = run_cli(fake_args(tmp_path, "c", "--set", "run.generations=2", "--set", "search.popsize=9"), REPO)
    assert r.returncode == 2 and "another configuration" in r.stderr


def test_unwritable_run_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for where, needle in ((blocker / "runs", "is not a folder"), (Path("/proc/essa_runs"), "not writable")):
        r = run_cli([*FAKE, "--set", f"run.dir={where}", "--set", "run.name=x"], REPO)
        assert r.returncode == 2, r.stderr
        assert "cannot write the run directory" in r.stderr and needle in r.stderr
