"""Shared test helpers: where the venv's mpiexec is, how to run the CLI, where ../shared/data is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def shared_data() -> Path:
    return Path(os.environ.get("ESSA_SHARED_DATA", REPO.parent / "shared" / "data"))


def mpiexec() -> str:
    exe = BIN / "mpiexec"
    return str(exe) if exe.exists() else "mpiexec"


def cli_env(tmp_path: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "HYDRA_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_cli(
    args: list[str], cwd: Path, ranks: int = 0, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """python -m essa_hpc.run ..., under a real mpiexec when ranks > 0."""
    cmd = [sys.executable, "-m", "essa_hpc.run", *args]
    if ranks:
        cmd = [mpiexec(), "-n", str(ranks), *cmd]
    return subprocess.run(cmd, cwd=cwd, env=env or cli_env(), capture_output=True, text=True, timeout=timeout)


def logged_generations(log: Path) -> int:
    """Generations a (possibly live, SWMR) log.h5 holds so far; 0 before the file or its rows exist."""
    import h5py

    try:
        with h5py.File(log, "r", libver="latest", swmr=True) as f:
            return int(f["gen/sigma"].shape[0])
    except (OSError, KeyError):
        return 0


def have_mpi() -> str | None:
    """None when this venv can start MPI ranks, else why not (the tests marked mpi then skip, saying so)."""
    import importlib.util
    import shutil

    if not (BIN / "mpiexec").exists() and shutil.which("mpiexec") is None:
        return "no mpiexec: pip install 'essa_hpc[cpu]' (the mpich wheel) or load an MPI module"
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    why = have_mpi()
    if why is not None:
        for item in items:
            if item.get_closest_marker("mpi") is not None:
                item.add_marker(pytest.mark.skip(reason=why))


SHM = Path("/dev/shm")


@pytest.fixture(autouse=True)
def _no_leftover_mpich_segments():
    """Ranks killed on purpose (tests/test_mpi_engine.py and others) cannot unlink MPICH's shared-memory
    segments (/dev/shm/mpich_shm_*, 2 MB each); without this every test run left a few behind. Only
    segments that appeared during the test, whose jobs have ended by teardown, are removed."""
    before = set(SHM.glob("mpich_shm_*")) if SHM.is_dir() else set()
    yield
    if SHM.is_dir():
        for seg in set(SHM.glob("mpich_shm_*")) - before:
            seg.unlink(missing_ok=True)


@pytest.fixture
def shared() -> Path:
    d = shared_data()
    if not d.is_dir():
        pytest.skip(f"reference data not found at {d} (set ESSA_SHARED_DATA)")
    return d
