"""python -m essa_hpc.evaluate on a tiny random model saved to disk (base model and a PEFT adapter)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from essa_hpc.evaluate import main

# the hf backend quantizes through essa_hpc.quantize (another module of the project, written separately)
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("essa_hpc.quantize") is None, reason="essa_hpc.quantize is not in this checkout yet (the hf backend needs it)"
)


def _tiny_causal_lm(path: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?+-*=:{}\\\n"
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{ch: 3 + i for i, ch in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>").save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "model"
    _tiny_causal_lm(path)
    return path


def _run(tiny: Path, tmp: Path, *extra: str) -> tuple[dict, list[dict]]:
    out, samples = tmp / "m.json", tmp / "s.jsonl"
    rc = main(
        [
            "--task",
            "arithmetic",
            "--size",
            "3",
            "--max-new-tokens",
            "4",
            "--set",
            f"model.path={tiny}",
            "--set",
            "model.device=cpu",
            "--out",
            str(out),
            "--samples",
            str(samples),
            *extra,
        ]
    )
    assert rc == 0
    return json.loads(out.read_text()), [json.loads(x) for x in samples.read_text().splitlines()]


def test_evaluate_base_and_identity_adapter(tiny: Path, tmp_path: Path) -> None:
    m, rows = _run(tiny, tmp_path)
    assert m["task"] == "arithmetic" and m["prompts"] == 3 and {"accuracy", "mean_reward", "avg@1", "pass@1"} <= set(m)
    assert len(rows) == 3 and all(r["sample"] == 0 and isinstance(r["completion"], str) for r in rows)
    # a PEFT adapter with B = 0 (its initialization) is the base model: the same completions
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    m2, rows2 = _run(tiny, tmp_path, "--adapter", str(adapter))
    assert [r["completion"] for r in rows2] == [r["completion"] for r in rows]
    assert m2["adapter"] == str(adapter)


def test_evaluate_k_samples_and_bad_input(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m, rows = _run(tiny, tmp_path, "--k", "2", "--temperature", "1.0")
    assert m["prompts"] == 3 and len(rows) == 6 and "pass@2" in m and "avg@2" in m
    assert main(["--task", "gsm8k", "--set", "task.path=/no/such.jsonl"]) == 2
    assert "task.path" in capsys.readouterr().err
