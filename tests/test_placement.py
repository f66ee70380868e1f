"""The one GPU placement rule: essa_hpc.placement, and slurm/essa_rank.sh, which mirrors it in bash."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from essa_hpc import exit_codes
from essa_hpc.placement import PlacementError, bind_rank_gpus, gpu_slice, parse_visible, rank_gpus

from .conftest import REPO

UUIDS = ",".join(f"GPU-{i:x}{i:x}" for i in range(4))
# (CUDA_VISIBLE_DEVICES, local rank, tp): enough to cover slicing, "already bound", no GPUs, too few
CASES = [
    (visible, local, tp)
    for visible in ("0,1,2,3,4,5,6,7", "4,5,6,7", UUIDS, "2,3", "", "NoDevFiles", None)
    for tp in (1, 2, 4)
    for local in (0, 1, 3, 5)
]


def test_rule() -> None:
    gpus = [str(i) for i in range(8)]
    assert rank_gpus(3, 2, gpus) == ["6", "7"]
    assert rank_gpus(5, 2, ["GPU-a", "GPU-b"]) == ["GPU-a", "GPU-b"]  # exactly tp visible: already bound
    with pytest.raises(PlacementError, match=r"local rank 2 needs GPUs 8\.\.11"):
        rank_gpus(2, 4, gpus)
    assert parse_visible(None) == [] and parse_visible("NoDevFiles") == [] and parse_visible(" 0, 1") == ["0", "1"]


def test_bind_narrows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert bind_rank_gpus(1, 2) == ["2", "3"] and os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert bind_rank_gpus(1, 1) is None, "unset and nothing counted: a CPU machine"
    assert bind_rank_gpus(1, 1, count_gpus=lambda: 4) == ["1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    monkeypatch.setenv("ESSA_GPU_MAP", "0")
    assert bind_rank_gpus(1, 2) is None and os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"


def _wrapper(visible: str | None, local: int, tp: int) -> tuple[int, str | None]:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "ESSA_GPU_MAP") and "LOCAL" not in k}
    env.update(SLURM_LOCALID=str(local), ESSA_TP=str(tp))
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    script = 'echo "${CUDA_VISIBLE_DEVICES-<unset>}"'
    r = subprocess.run(["bash", str(REPO / "slurm" / "essa_rank.sh"), "bash", "-c", script], env=env, capture_output=True, text=True)
    return r.returncode, r.stdout.strip()


def test_rank_wrapper_follows_the_same_rule() -> None:
    for visible, local, tp in CASES:
        rc, out = _wrapper(visible, local, tp)
        try:
            mine = gpu_slice(visible, local, tp)
        except PlacementError:
            assert rc == exit_codes.BAD_INPUT, (visible, local, tp, out)
            continue
        assert rc == exit_codes.OK, (visible, local, tp)
        expected = mine if mine is not None else (visible if visible is not None else "<unset>")
        assert out == expected, (visible, local, tp)


def test_shell_exit_codes_match_exit_codes_py() -> None:
    text = (REPO / "slurm" / "common.sh").read_text()
    assert re.search(rf"^ESSA_REQUEUE_EXIT_CODE={exit_codes.REQUEUE}\b", text, re.M)
    assert re.search(rf"^ESSA_BAD_INPUT_EXIT_CODE={exit_codes.BAD_INPUT}\b", text, re.M)


@pytest.mark.mpi
def test_ranks_bind_their_gpus_from_the_communicators_local_rank(tmp_path) -> None:
    """Under a real mpiexec, every rank of a node narrows CUDA_VISIBLE_DEVICES to its own device before a
    model loads (evaluation._load_model, the path of essa-run and essa-evaluate), from dist.Comm.local_rank
    and no launcher variable."""
    import sys

    from .conftest import cli_env, mpiexec

    script = tmp_path / "bind.py"
    script.write_text(
        "import os, types\n"
        "from essa_hpc import dist, evaluation, models\n"
        "comm = dist.init()\n"
        "models.resolve_source = models.load = lambda m: None  # placement only: no model needed\n"
        "cfg = types.SimpleNamespace(backend=types.SimpleNamespace(name='hf', tensor_parallel_size=1), model=None)\n"
        "evaluation._load_model(cfg, comm)\n"
        "seen = comm.allgather((comm.local_rank, os.environ['CUDA_VISIBLE_DEVICES']))\n"
        "if comm.rank == 0: print('BOUND', seen)\n"
    )
    env = cli_env() | {"CUDA_VISIBLE_DEVICES": "GPU-a,GPU-b,GPU-c"}
    env = {k: v for k, v in env.items() if k not in ("SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")}
    out = subprocess.run([mpiexec(), "-n", "3", sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "BOUND [(0, 'GPU-a'), (1, 'GPU-b'), (2, 'GPU-c')]" in out.stdout
