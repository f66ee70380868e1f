"""The GRPO baseline (essa_hpc.grpo) on a tiny saved model: real TRL steps from a PEFT adapter, the shared
log schema, the adapter peft loads back, the same validation as ESSA's, bad grpo.* input, the overlay."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from essa_hpc import models
from essa_hpc.config import ModelSection

from .conftest import REPO, cli_env, run_cli

pytest.importorskip("trl", reason="the GRPO baseline needs the grpo extra: pip install 'essa_hpc[grpo]'")
pytest.importorskip("datasets", reason="the GRPO baseline needs the grpo extra: pip install 'essa_hpc[grpo]'")


def reward_lower(prompts: Sequence[str], completions: Sequence[str], **_: object) -> list[float]:
    """A reward that varies between the random tiny model's samples: the share of lowercase letters."""
    return [sum(ch.islower() for ch in c) / max(1, len(c)) for c in completions]


def module_cli(module: str, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def grpo_cli(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return module_cli("essa_hpc.grpo", args, timeout)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A tiny model folder, prompt data, and a starting PEFT adapter with non-zero B (a trained SFT stand-in)."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("grpo")
    model_dir = models.save_tiny_model(root / "model")
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say a {i}"}) + "\n" for i in range(40)))
    loaded = models.load(ModelSection(path=str(model_dir)))
    torch.manual_seed(3)
    peft_model = get_peft_model(loaded.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    adapter = root / "start"
    peft_model.save_pretrained(str(adapter))
    common = [
        f"model.path={model_dir}",
        "task.name=tests.test_grpo:reward_lower",
        f"task.path={data}",
        "eval.size=8",
        "lora.rank=4",
        "lora.alpha_fraction=0.25",
        "lora.targets=[q_proj,v_proj]",
        "backend.max_new_tokens=6",
        "model.threads=1",
        f"run.dir={root / 'runs'}",
    ]
    return {"root": root, "adapter": adapter, "model": model_dir, "common": common}


def sets(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


@pytest.fixture(scope="module")
def grpo_run(setup: dict[str, object]) -> Path:
    common = list(setup["common"])  # type: ignore[call-overload]
    args = [
        *common,
        f"lora.adapter={setup['adapter']}",
        "run.name=grpo",
        "grpo.max_steps=3",
        "grpo.group_size=4",
        "grpo.prompts_per_step=2",
        "grpo.learning_rate=5e-3",
        "eval.every=2",
    ]
    r = grpo_cli(sets(args))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "essa-grpo: max_steps after 3 steps" in r.stdout
    return Path(str(setup["root"])) / "runs" / "grpo"


def test_grpo_writes_the_shared_schema(grpo_run: Path) -> None:
    assert {"config.yaml", "log.h5", "summary.json", "adapter"} <= {p.name for p in grpo_run.iterdir()}
    assert not (grpo_run / ".trl").exists()
    with h5py.File(grpo_run / "log.h5", "r") as f:
        assert f.attrs["method"] == "grpo"
        assert json.loads(f.attrs["config"])["grpo"]["group_size"] == 4
        e = f["eval"]
        assert e["gen"][()].tolist() == [0, 2, 3]  # start, every 2 steps, the end
        assert {"wall_time", "train_time", "tokens", "accuracy", "mean_reward"} <= set(e)
        train_time = e["train_time"][()]
        assert train_time[0] == 0.0 and np.all(np.diff(train_time) > 0)
        assert np.all(np.diff(e["wall_time"][()]) > 0) and np.all(e["wall_time"][()] > train_time)
        tokens = e["tokens"][()]
        assert tokens[0] == 0 and tokens[-1] > 0 and tokens[-1] <= 3 * 8 * 6  # 3 steps × 8 completions × ≤ 6 tokens
        s = f["grpo"]
        assert s["step"][()].tolist() == [1, 2, 3]
        assert np.isfinite(s["loss"][()]).all() and np.isfinite(s["reward_mean"][()]).all()
        assert (s["grad_norm"][()] > 0).all()  # the rewards vary within groups: real gradient steps
    summary = json.loads((grpo_run / "summary.json").read_text())
    assert summary["method"] == "grpo" and summary["steps"] == 3 and summary["stopped_by"] == "max_steps"


def test_grpo_adapter_is_a_trained_peft_adapter(grpo_run: Path, setup: dict[str, object]) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    start = load_file(str(Path(str(setup["adapter"])) / "adapter_model.safetensors"))
    end = load_file(str(grpo_run / "adapter" / "adapter_model.safetensors"))
    assert set(start) == set(end)
    assert any(not torch.equal(start[k], end[k]) for k in start)  # GRPO moved the starting adapter
    base = models.load(ModelSection(path=str(setup["model"])))
    model = PeftModel.from_pretrained(base.model, str(grpo_run / "adapter"))
    assert sum(1 for n, _ in model.named_parameters() if "lora_A" in n) == 2 * 2  # 2 layers × q, v


def test_grpo_validates_like_essa_evaluate(grpo_run: Path, setup: dict[str, object]) -> None:
    """Step 0 of the GRPO log is the starting adapter scored by the ESSA validation path (same seeds, backend)."""
    from essa_hpc.config import load_config
    from essa_hpc.evaluate import evaluate

    cfg = load_config(None, [*setup["common"], f"lora.adapter={setup['adapter']}"])  # type: ignore[misc]
    torch.set_num_threads(1)
    m = evaluate(cfg)
    with h5py.File(grpo_run / "log.h5", "r") as f:
        assert f["eval/mean_reward"][0] == pytest.approx(m["mean_reward"], abs=1e-12)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("grpo.group_size=1", "grpo.group_size"),
        ("grpo.learning_rate=-1e-4", "grpo.learning_rate"),
        ("grpo.lr_scheduler=step", "grpo.lr_scheduler"),
        ("grpo.temperature=0", "grpo.temperature"),
        ("grpo.loss_typ=dapo", "grpo.loss_type"),
        ("backend.name=vllm", "backend.name"),
    ],
)
def test_bad_grpo_values_exit_2_naming_the_key(override: str, key: str, setup: dict[str, object], tmp_path: Path) -> None:
    r = grpo_cli(sets([*setup["common"], f"run.dir={tmp_path}", override]), timeout=120)  # type: ignore[misc]
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert key in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # nothing written


def test_grpo_refuses_to_replace_a_run(grpo_run: Path, setup: dict[str, object]) -> None:
    r = grpo_cli(sets([*setup["common"], "run.name=grpo"]), timeout=120)  # type: ignore[misc]
    assert r.returncode == 2 and "already holds a run" in r.stderr


def test_report_overlays_essa_and_grpo(grpo_run: Path, setup: dict[str, object], tmp_path: Path) -> None:
    pytest.importorskip("pandas", reason="the report needs the analysis extra: pip install 'essa_hpc[analysis]'")
    pytest.importorskip("matplotlib", reason="the report needs the analysis extra: pip install 'essa_hpc[analysis]'")
    r = run_cli(
        sets(
            [
                *setup["common"],
                "run.name=essa",
                "lora.init=random",
                "run.generations=2",
                "search.popsize=4",
                "task.batch_size=2",
                "eval.every=1",
            ]
        ),
        REPO,
    )  # type: ignore[misc]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    essa_log = grpo_run.parent / "essa" / "log.h5"
    out = tmp_path / "report"
    rep = module_cli("analysis.report", [str(essa_log), str(grpo_run / "log.h5"), "--out", str(out), "--formats", "png"])
    assert rep.returncode == 0, rep.stderr[-3000:]
    assert (out / "methods_accuracy_vs_train_time.png").stat().st_size > 1000
    assert (out / "methods_accuracy_vs_tokens.png").stat().st_size > 1000
    import pandas as pd

    table = pd.read_csv(out / "methods.csv")
    assert set(table["method"]) == {"essa", "grpo"}
    for _, c in table.groupby("run"):
        assert c["train_time"].iloc[0] == 0.0 and (np.diff(c["train_time"]) > 0).all()
        assert (np.diff(c["tokens"]) > 0).all()
    essa = table[table["method"] == "essa"]
    with h5py.File(essa_log, "r") as f:
        assert essa["step"].tolist() == f["eval/gen"][()].tolist()
        assert essa["tokens"].iloc[-1] == int(f["gen/tokens"][()].sum())
        assert essa["train_time"].iloc[-1] < f["gen/wall_time"][-1]  # the validations are left out
    # GRPO logs alone: the overlay and a short summary
    rep2 = module_cli("analysis.report", [str(grpo_run), "--out", str(tmp_path / "r2"), "--formats", "png"])
    assert rep2.returncode == 0, rep2.stderr[-3000:]
    assert "| grpo | grpo |" in (tmp_path / "r2" / "summary.md").read_text()
