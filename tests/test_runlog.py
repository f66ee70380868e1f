"""The HDF5 log alone: schema, live (SWMR) reading, resume truncation, checkpoints."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from essa_hpc import checkpoint
from essa_hpc.dist import PHASES
from essa_hpc.runlog import RunLog, open_live


def _log(path: Path, resume_gen: int | None = None) -> RunLog:
    return RunLog(
        path,
        config_json="{}",
        world_size=2,
        hostnames=["a", "b"],
        popsize=3,
        solution_length=4,
        metrics=["accuracy", "pass@1"],
        resume_gen=resume_gen,
    )


def _fill(log: RunLog, gens: int, eval_every: int) -> None:
    log.append_eval(0, 0.0, {"accuracy": 0.1, "pass@1": 0.1})
    for g in range(gens):
        log.append_generation(
            rewards=np.full(3, g, float),
            seeds=np.arange(3, dtype=np.uint64),
            sigma=1.0 / (g + 1),
            wall_time=float(g),
            timings=np.ones((2, len(PHASES))),
            tokens=np.array([5, 6]),
            failures=0,
            timeouts=0,
            digest=b"x" * 16,
        )
        if (g + 1) % eval_every == 0:
            log.append_eval(g + 1, float(g), {"accuracy": 0.5, "pass@1": 0.5})


def test_schema_and_live_reading(tmp_path: Path) -> None:
    log = _log(tmp_path / "log.h5")
    _fill(log, 3, 2)
    with open_live(tmp_path / "log.h5") as f:  # while the writer still holds it open
        assert f["gen/rewards"].shape == (3, 3) and f["gen/timings"].shape == (3, 2, len(PHASES))
        assert f["eval/gen"][()].tolist() == [0, 2] and "pass@1" in f["eval"]
        assert f.attrs["world_size"] == 2 and f.attrs["popsize"] == 3
    log.write_final(np.ones(4), None)
    log.close()
    with h5py.File(tmp_path / "log.h5", "r") as f:
        assert f["final/written"][()] == 1 and np.isnan(f["final/best"][()]).all()


@pytest.mark.parametrize("resume_at,evals", [(4, [0, 2, 4]), (3, [0, 2]), (5, [0, 2, 4])])
def test_resume_truncates_to_the_checkpoint(tmp_path: Path, resume_at: int, evals: list[int]) -> None:
    log = _log(tmp_path / "log.h5")
    _fill(log, 6, 2)  # as if the run went on past its last checkpoint and then died
    log.close()
    again = _log(tmp_path / "log.h5", resume_gen=resume_at)
    with open_live(tmp_path / "log.h5") as f:
        assert f["gen/rewards"].shape[0] == resume_at
        assert f["eval/gen"][()].tolist() == evals  # validation at g belongs to the checkpoint at g
        assert "@" in f.attrs["resumed_at"]
    again.close()


def test_resume_refuses_another_shape(tmp_path: Path) -> None:
    _log(tmp_path / "log.h5").close()
    with pytest.raises(ValueError, match="popsize"):
        RunLog(
            tmp_path / "log.h5",
            config_json="{}",
            world_size=2,
            hostnames=[],
            popsize=9,
            solution_length=4,
            metrics=["accuracy"],
            resume_gen=0,
        )


def test_checkpoint_atomic_and_digest_checked(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, {"gen": 3, "config_digest": "abc"})
    checkpoint.save(tmp_path, {"gen": 6, "config_digest": "abc"})
    assert checkpoint.load(tmp_path, "abc")["gen"] == 6
    assert (tmp_path / "checkpoints" / "previous.pkl").exists()
    with pytest.raises(checkpoint.CheckpointError, match="another configuration"):
        checkpoint.load(tmp_path, "zzz")
    (tmp_path / "checkpoints" / "latest.pkl").write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match="unreadable"):
        checkpoint.load(tmp_path, "abc")
