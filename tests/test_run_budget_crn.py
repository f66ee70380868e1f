"""The run loop's training-time budget (validation excluded) and common random numbers, on the fake backend."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from .conftest import REPO, run_cli

pytestmark = pytest.mark.mpi

FAKE = ["backend.name=fake", "task.name=fake", "backend.fake_dim=6", "task.batch_size=5", "search.popsize=4", "log.progress=false"]


def sets(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def test_train_budget_leaves_validation_out(tmp_path: Path) -> None:
    # each sample sleeps 2 ms: a generation (4 × 5 samples) ~0.04 s, a validation (200 samples) ~0.4 s
    args = [*FAKE, "backend.fake_sleep_s=0.002", "eval.size=200", "eval.every=1", "run.generations=100000", "run.train_budget_s=0.6"]
    r = run_cli(sets([*args, f"run.dir={tmp_path}", "run.name=b"]), REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "training budget of 0.6 s spent" in r.stdout
    with h5py.File(tmp_path / "b" / "log.h5", "r") as f:
        gens = f["gen/rewards"].shape[0]
        wall = float(f["gen/wall_time"][-1]) - float(f["eval/wall_time"][0])
        validations = f["eval/gen"].shape[0]
    # validation alone took longer than the budget, and the run still trained for about the budget
    assert validations >= 5 and gens == validations - 1
    assert wall > 2 * 0.6
    assert gens * 0.04 * 3 >= 0.6  # at least the budget's worth of generations (loose: sleeps overshoot)


@pytest.mark.parametrize("ranks", [1, 2])
def test_common_random_numbers_share_the_noise(tmp_path: Path, ranks: int) -> None:
    # σ0 tiny: every candidate is the mean, so any spread of rewards in a generation is sampling noise
    base = [*FAKE, "backend.fake_noise=0.5", "search.sigma0=1e-9", "run.generations=3", "eval.every=0"]
    spread = {}
    for crn in ("false", "true"):
        name = f"crn{crn}"
        r = run_cli(sets([*base, f"search.common_random_numbers={crn}", f"run.dir={tmp_path}", f"run.name={name}"]), REPO, ranks=ranks)
        assert r.returncode == 0, r.stdout + r.stderr
        with h5py.File(tmp_path / name / "log.h5", "r") as f:
            spread[crn] = float(np.std(f["gen/rewards"][()], axis=1).max())
    assert spread["true"] < 1e-6 < 0.01 < spread["false"]
