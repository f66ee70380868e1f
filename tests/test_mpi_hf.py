"""Tier 2/3: the real run loop with the hf backend on a tiny saved model, under real mpiexec.

The model is a random Llama with a character tokenizer saved as an ordinary HF folder, so it loads
through ``model.path`` like a user's model. A plugin reward (fraction of digits in the completion) on
top of the arithmetic task gives rewards that vary between candidates.
"""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from essa_hpc import models

from .conftest import REPO, cli_env, run_cli

PLUGIN = "def digits(prompts, completions, **kw):\n    return [sum(c.isdigit() for c in t) / max(1, len(t)) for t in completions]\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("tiny")
    models.save_tiny_model(root / "model")
    (root / "testplug.py").write_text(PLUGIN)
    env = cli_env()
    env["PYTHONPATH"] = f"{root}:{env['PYTHONPATH']}"
    return root, env


def hf_args(tiny_root: Path, out: Path, name: str, *extra: str) -> list[str]:
    return [
        "--set",
        f"model.path={tiny_root / 'model'}",
        "--set",
        "lora.init=random",
        "--set",
        "lora.rank=4",
        "--set",
        "lora.alpha_fraction=0.25",  # one searched value per factor at r = 4
        "--set",
        f"run.dir={out}",
        "--set",
        f"run.name={name}",
        "--set",
        "search.popsize=5",
        "--set",
        "task.batch_size=3",
        "--set",
        "eval.size=6",
        "--set",
        "eval.every=2",
        "--set",
        "backend.max_new_tokens=6",
        "--set",
        "search.sigma0=2",
        "--set",
        "task.plugins=[testplug:digits]",
        "--set",
        "log.progress=false",
        *extra,
    ]


@pytest.mark.mpi
def test_hf_backend_identical_on_1_2_3_ranks(tiny: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, env = tiny
    logs = {}
    for ranks in (1, 2, 3):
        r = run_cli(hf_args(root, tmp_path, f"n{ranks}", "--set", "run.generations=4"), REPO, ranks=ranks, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        with h5py.File(tmp_path / f"n{ranks}" / "log.h5", "r") as f:
            logs[ranks] = {k: f[k][()] for k in ("gen/rewards", "gen/sigma", "final/mean", "eval/mean_reward", "gen/tokens")}
    assert logs[1]["gen/rewards"].std() > 0, "rewards should differ between candidates"
    for ranks in (2, 3):
        for key in ("gen/rewards", "gen/sigma", "final/mean", "eval/mean_reward"):
            assert np.array_equal(logs[ranks][key], logs[1][key]), f"{ranks} ranks: {key} differs"
        assert logs[ranks]["gen/tokens"].shape == (4, ranks)
        assert logs[ranks]["gen/tokens"].sum() == logs[1]["gen/tokens"].sum()
    # the final adapter is a real PEFT adapter of the tiny model
    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(root / "model")
    model = peft.PeftModel.from_pretrained(base, tmp_path / "n3" / "adapter")
    assert sum("lora_A" in n for n, _ in model.named_parameters()) == 2 * 4  # 2 layers × q,k,v,o


def test_bad_input_fails_before_any_model_loads(tiny: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, env = tiny
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"prompt": "no question field"}\n')
    cases = [
        (["--set", "task.plugins=[nosuchmodule:fn]"], "nosuchmodule"),
        (["--set", "lora.adapter=/no/such/adapter"], "lora.adapter"),
        (["--set", "model.path=/no/such/model"], "model.path"),
        (["--set", "task.name=gsm8k", "--set", f"task.path={rows}"], "question"),
    ]
    for extra, needle in cases:
        r = run_cli(hf_args(root, tmp_path, "bad", *extra), REPO, env=env)
        assert r.returncode == 2, r.stderr
        assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "bad").exists(), "a failed start must not leave a run directory behind"


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (120_000, 120_000))


def test_full_disk_fails_cleanly_and_log_stays_readable(tmp_path: Path) -> None:
    """A disk that fills up mid-run (simulated with RLIMIT_FSIZE): a clear failure, no corrupt log."""
    args = [
        "--set",
        "backend.name=fake",
        "--set",
        "task.name=fake",
        "--set",
        "backend.fake_dim=400",
        "--set",
        "search.popsize=16",
        "--set",
        "search.diagonal=true",  # sep-CMA: full CMA's d² state would fill the 120 kB before generation 1
        "--set",
        "task.batch_size=16",
        "--set",
        f"run.dir={tmp_path}",
        "--set",
        "run.name=full",
        "--set",
        "run.generations=400",
        "--set",
        "log.checkpoint_every=1000",
        "--set",
        "eval.every=0",
        "--set",
        "log.progress=false",
    ]
    r = subprocess.run(
        [sys.executable, "-m", "essa_hpc.run", *args],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limit_file_size,
    )
    assert r.returncode != 0
    assert "File too large" in r.stderr or "No space" in r.stderr or "errno = 27" in r.stderr, r.stderr[-2000:]
    with h5py.File(tmp_path / "full" / "log.h5", "r", libver="latest", swmr=True) as f:
        n = f["gen/rewards"].shape[0]
        assert 0 < n < 400
        assert np.isfinite(f["gen/rewards"][: n - 1]).all()
