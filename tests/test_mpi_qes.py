"""search.space=qes through the real run loop under real mpiexec, on a tiny saved model quantized in-process.

Codes and residuals are bit-identical on 1, 2 and 3 ranks and across an interruption and resume (the
resumed run keeps its residual stored, the others replay it: both must agree exactly); the export is a
pre-quantized folder that ``models.load`` loads with the very codes the run ended with; bad input exits 2
naming the key.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from essa_hpc import models
from essa_hpc.config import ModelSection

from .conftest import REPO, cli_env, run_cli

pytest.importorskip("torchao")

PLUGIN = "def digits(prompts, completions, **kw):\n    return [sum(c.isdigit() for c in t) / max(1, len(t)) for t in completions]\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("tinyq")
    models.save_tiny_model(root / "model")
    (root / "qesplug.py").write_text(PLUGIN)
    env = cli_env()
    env["PYTHONPATH"] = f"{root}:{env['PYTHONPATH']}"
    return root, env


WINDOW = 5  # no reset within the test's 4 updates: the residual holds all of them (resets: tests/test_qes.py)


def qes_args(root: Path, out: Path, name: str, *extra: str) -> list[str]:
    sets = {
        "model.path": str(root / "model"),
        "model.quantization": "int4",
        "model.threads": "1",
        "search.space": "qes",
        "search.optimizer": "es",
        "search.popsize": "4",
        "search.sigma0": "0.8",
        "search.learning_rate": "0.6",
        "search.fitness_shaping": "centered_ranks",
        "search.qes_window": str(WINDOW),
        "run.dir": str(out),
        "run.name": name,
        "task.batch_size": "2",
        "task.plugins": "[qesplug:digits]",
        "eval.size": "2",
        "eval.every": "0",
        "backend.max_new_tokens": "5",
        "log.progress": "false",
    }
    args: list[str] = []
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args + list(extra)


def space_state(run: Path) -> dict:
    with open(run / "checkpoints" / "latest.pkl", "rb") as fh:
        return pickle.load(fh)["space"]


def logged(run: Path) -> dict[str, np.ndarray]:
    with h5py.File(run / "log.h5", "r") as f:
        return {k: f[k][()] for k in ("gen/rewards", "gen/digest", "eval/mean_reward")}


def replayed_residual(root: Path, state: dict) -> list[torch.Tensor]:
    from essa_hpc.quantize import quantize_model
    from essa_hpc.spaces import qes

    model = models.load(ModelSection(path=str(root / "model"))).model
    space = qes.QESSpace(qes.find_codes(quantize_model(model, "int4")), state["seed"], window=WINDOW)
    space.load_state_dict(state)
    return space.replayed_residual()


@pytest.mark.mpi
def test_qes_codes_and_residuals_identical_on_1_2_3_ranks_and_across_resume(tiny: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, env = tiny
    stored = ["--set", "search.qes_residual=stored"]
    # n2cut: 2 ranks, the residual stored instead of replayed, 2 generations, then the same command resumes to 4
    runs = {"n1": (1, [4], []), "n2cut": (2, [2, 4], stored), "n3": (3, [4], [])}
    for name, (ranks, stages, extra) in runs.items():
        for gens in stages:
            r = run_cli(qes_args(root, tmp_path, name, "--set", f"run.generations={gens}", *extra), REPO, ranks=ranks, env=env, timeout=900)
            assert r.returncode == 0, r.stdout + r.stderr
            assert gens == stages[0] or f"resuming at generation {stages[0]}" in r.stdout, r.stdout
    base, base_state = logged(tmp_path / "n1"), space_state(tmp_path / "n1")
    assert base["gen/rewards"].shape == (4, 4) and base["gen/rewards"].std() > 0, "rewards should differ between candidates"
    for name in ("n2cut", "n3"):
        got, state = logged(tmp_path / name), space_state(tmp_path / name)
        assert np.array_equal(got["gen/rewards"], base["gen/rewards"]), name
        # the validations at the start and at the end (n2cut also validated when its first stage ended)
        assert got["eval/mean_reward"][[0, -1]].tolist() == base["eval/mean_reward"][[0, -1]].tolist(), name
        assert state["updates"] == 4
        for a, b in zip(state["codes"], base_state["codes"], strict=True):
            assert np.array_equal(a, b), name
    # the same state on every rank count (replay mode): the digests that rode in every Allgather agree
    assert np.array_equal(logged(tmp_path / "n3")["gen/digest"], base["gen/digest"])
    # the stored residual after update 4 (four updates, no reset yet) is the one n1 replays. One update's
    # weights can all be 0 (both antithetic pairs tied on 2 prompts), so the window spans all four.
    cut = space_state(tmp_path / "n2cut")
    assert len(cut["history"]) == 4 and any(float(np.abs(r).max()) > 0 for r in cut["stored"])
    for a, b in zip(replayed_residual(root, base_state), cut["stored"], strict=True):
        assert torch.equal(a, torch.from_numpy(b))
    # the export: a pre-quantized folder the project's loader loads, holding the final codes
    from essa_hpc.quantize import quantize_model
    from essa_hpc.spaces import qes

    codes = qes.find_codes(models.load(ModelSection(path=str(tmp_path / "n3" / "model"))).model)
    assert [c.layout for c in codes] == ["IntxUnpackedToInt8Tensor"] * len(base_state["codes"])
    for c, ref in zip(codes, base_state["codes"], strict=True):
        assert np.array_equal(c.data.numpy(), ref)
    fresh = qes.find_codes(quantize_model(models.load(ModelSection(path=str(root / "model"))).model, "int4"))
    flips = sum(int((c.data.numpy() != ref).sum()) for c, ref in zip(fresh, base_state["codes"], strict=True))
    assert flips > 0, "no code flipped in 4 generations"


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--set", "model.quantization=none"], "model.quantization"),
        (["--set", "search.qes_window=0"], "search.qes_window"),
        (["--set", "model.device=cuda", "--set", "model.dtype=bfloat16"], "model.quantization: int4 on CUDA with bfloat16"),
        (["--set", "search.optimizer=cma"], "search.optimizer"),
        (["--set", "search.popsize=5"], "search.popsize"),
        (["--set", "backend.name=vllm"], "backend.name"),
    ],
)
def test_qes_bad_input_exits_2_naming_the_key(tiny: tuple[Path, dict[str, str]], tmp_path: Path, extra: list[str], needle: str) -> None:
    root, env = tiny
    r = run_cli(qes_args(root, tmp_path, "bad", *extra), REPO, env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "bad").exists()
