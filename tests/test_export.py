"""Adapters users can hand on (essa_hpc/export.py): the dtype, a base_model_name_or_path that peft resolves,
the model card, and essa-merge writing a merged HF folder whose logits equal base + adapter under peft."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from essa_hpc import export, models, svd_lora
from essa_hpc.config import ModelSection, load_config

from .conftest import REPO, cli_env, run_cli

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _svd_on(folder: Path) -> svd_lora.SvdLora:
    """An SVD-LoRA over a peft LoRA with non-zero B on the saved tiny model (as after SFT)."""
    from peft import LoraConfig, get_peft_model

    base = models.load(ModelSection(path=str(folder), device="cpu")).model
    torch.manual_seed(0)
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    return svd_lora.from_model(pm, alpha_fraction=0.5)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[5, 17, 33, 41, 9, 70]])
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_base_model_reference_is_what_peft_can_resolve(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert export.base_model_reference(ModelSection(path="Qwen/Qwen2.5-7B-Instruct")) == "Qwen/Qwen2.5-7B-Instruct"
    monkeypatch.chdir(tiny.parent)
    assert export.base_model_reference(ModelSection(path="model")) == str(tiny.resolve())  # made absolute


def test_export_dtype_follows_the_model_unless_configured(tiny: Path) -> None:
    cfg = load_config(None, [f"model.path={tiny}", "model.device=cpu"])
    model = models.tiny_model().model
    assert export.export_dtype(cfg, model) == torch.float32
    assert export.export_dtype(cfg, model.to(torch.bfloat16)) == torch.bfloat16
    assert export.export_dtype(cfg.replace(**{"lora.export_dtype": "float16"}), model) == torch.float16
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):  # vllm's skeleton: the configured dtype, not the meta model's float32
        tiny_cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
        skeleton = LlamaForCausalLM(tiny_cfg)
    assert skeleton.device.type == "meta" and skeleton.dtype == torch.float32
    assert export.export_dtype(cfg.replace(**{"model.dtype": "bfloat16"}), skeleton) == torch.bfloat16


def test_essa_merge_equals_peft_on_the_base(tiny: Path, tmp_path: Path) -> None:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    svd = _svd_on(tiny)
    x = svd.zeros() + 0.3
    adapter = svd_lora.export_adapter(svd, x, tmp_path / "adapter", base_model_name_or_path=str(tiny))
    via_peft = AutoPeftModelForCausalLM.from_pretrained(str(adapter))  # resolves the base from the adapter config
    want = _logits(via_peft.eval())
    assert not torch.allclose(want, _logits(models.load(ModelSection(path=str(tiny), device="cpu")).model))  # the adapter does something

    out = tmp_path / "merged"
    r = subprocess.run(
        [sys.executable, "-m", "essa_hpc.export", "--merge", str(adapter), "--out", str(out)],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    torch.testing.assert_close(_logits(merged), want, rtol=1e-4, atol=1e-4)
    assert (out / "tokenizer_config.json").is_file() and "essa-merge" in (out / "README.md").read_text()

    bad = subprocess.run(
        [sys.executable, "-m", "essa_hpc.export", "--merge", str(tmp_path / "nope"), "--out", str(tmp_path / "m2")],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "no adapter_config.json" in bad.stderr and not (tmp_path / "m2").exists()


def test_run_exports_in_the_configured_dtype_with_a_model_card(tiny: Path, tmp_path: Path) -> None:
    args = [
        f"model.path={tiny}",
        "lora.export_dtype=bfloat16",  # the model runs in float32 here (auto on the CPU)
        "lora.init=random",
        "lora.rank=4",
        "lora.alpha_fraction=0.25",
        f"run.dir={tmp_path}",
        "run.name=card",
        "run.generations=1",
        "search.popsize=4",
        "task.batch_size=2",
        "eval.size=2",
        "eval.every=1",
        "backend.max_new_tokens=4",
        "log.progress=false",
    ]
    r = run_cli([a for s in args for a in ("--set", s)], REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    adapter = tmp_path / "card" / "adapter"
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == str(tiny.resolve())
    assert {t.dtype for t in load_file(str(adapter / "adapter_model.safetensors")).values()} == {torch.bfloat16}
    card = (adapter / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft")
    assert "## Validation" in card and "| generation |" in card and "run:\n  name: card" in card
    assert "CMA-ES" in card and "AutoPeftModelForCausalLM" in card
