"""log.report_to: the tracker on rank 0 mirrors the HDF5 rows (essa_hpc/tracker.py). TensorBoard's own
event reader reads the files back and every mirrored value equals the log's; W&B runs offline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import h5py
import numpy as np
import pytest

from essa_hpc.config import ConfigError, load_config
from essa_hpc.phases import LATE, PHASES

from .conftest import REPO, cli_env, run_cli

FAKE = ["backend.name=fake", "task.name=fake", "backend.fake_dim=6", "task.batch_size=4", "search.popsize=4", "log.progress=false"]
FAKE += ["backend.fake_sleep_s=0", "eval.size=4", "eval.every=1", "run.generations=3"]


def sets(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def read_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_mirrors_the_hdf5_log(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="log.report_to=tensorboard needs the tracker extra: pip install 'essa_hpc[tracker]'")
    r = run_cli(sets([*FAKE, f"run.dir={tmp_path}", "run.name=tb", "log.report_to=tensorboard"]), REPO, ranks=0)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    got = read_scalars(tmp_path / "tb" / "tensorboard")
    with h5py.File(tmp_path / "tb" / "log.h5", "r") as f:
        gens = f["gen/sigma"].shape[0]
        assert gens == 3
        for name in ("reward_mean", "reward_max", "sigma", "wall_time", "failures", "timeouts"):
            want = f[f"gen/{name}"][:]
            assert sorted(got[f"gen/{name}"]) == list(range(gens)), name
            np.testing.assert_allclose([got[f"gen/{name}"][g] for g in range(gens)], want, rtol=1e-6, err_msg=name)  # float32 events
        np.testing.assert_allclose([got["gen/reward_min"][g] for g in range(gens)], f["gen/rewards"][:].min(axis=1), rtol=1e-6)
        np.testing.assert_allclose([got["gen/tokens"][g] for g in range(gens)], f["gen/tokens"][:].sum(axis=1), rtol=1e-6)
        timings = f["gen/timings"][:].max(axis=1)  # the slowest rank, after the late phases were patched in
        for i, phase in enumerate(PHASES):
            vals = got[f"gen/timings/{phase}"]
            assert sorted(vals) == list(range(gens)), phase
            np.testing.assert_allclose([vals[g] for g in range(gens)], timings[:, i], rtol=1e-5, atol=1e-9, err_msg=phase)
        assert set(LATE) <= set(PHASES)
        eval_gens = f["eval/gen"][:]
        metrics = [k for k in f["eval"] if k not in ("gen", "wall_time")]
        assert metrics
        for m in metrics:
            assert sorted(got[f"eval/{m}"]) == sorted(int(g) for g in eval_gens), m
            np.testing.assert_allclose([got[f"eval/{m}"][int(g)] for g in eval_gens], f[f"eval/{m}"][:], rtol=1e-6)


def test_report_to_is_validated_before_anything_runs(tmp_path: Path) -> None:
    r = run_cli(sets([*FAKE, f"run.dir={tmp_path}", "run.name=bad", "log.report_to=mlflow"]), REPO)
    assert r.returncode == 2 and "log.report_to" in r.stderr and "tensorboard" in r.stderr
    assert not (tmp_path / "bad").exists()


def test_wandb_missing_is_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without wandb (hidden from find_spec here, so the test runs whether or not it is installed), the
    config check names the key and the install line before anything loads."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"log\.report_to.*pip install wandb"):
        load_config(overrides=[*FAKE, "log.report_to=wandb"])


def test_wandb_offline_run(tmp_path: Path) -> None:
    pytest.importorskip("wandb", reason="log.report_to=wandb needs wandb (pip install wandb)")
    env = cli_env()
    env.pop("WANDB_MODE", None)  # offline is the default
    env["WANDB_SILENT"] = "true"
    r = run_cli(sets([*FAKE, f"run.dir={tmp_path}", "run.name=wb", "log.report_to=wandb"]), REPO, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (run_file,) = (tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb")
    data = run_file.read_bytes()
    for key in (b"reward_mean", b"eval/mean_reward", b"generation"):  # history items carry their keys in the clear
        assert data.count(key) >= 2, key
