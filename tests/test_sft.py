"""sft: LoRA warm start with peft on a tiny random Llama; loss masking, adapter format, cache, CLI errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from essa_hpc import models, sft, svd_lora
from essa_hpc.config import Config, LoraSection, ModelSection, RunSection, SftSection
from essa_hpc.tasks.base import Example

LORA = LoraSection(rank=4, lora_alpha=8.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one torch thread is ~10× faster than several on a shared, oversubscribed machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _examples(n: int = 32) -> list[Example]:
    # a learnable mapping: the answer is a fixed phrase built from the prompt's first letter
    return [Example(id=str(i), prompt=f"{chr(97 + i % 4)} {i}", response=f"ok {chr(97 + i % 4)}{chr(97 + i % 4)}") for i in range(n)]


def _learnable() -> models.Loaded:
    """The tiny model with its LM head scaled up: at the default init (std 0.02, hidden 32) the logits
    cannot differ by more than ~1, so no adapter could fit anything; ×30 makes the task learnable."""
    loaded = models.tiny_model()
    with torch.no_grad():
        loaded.model.lm_head.weight.mul_(30.0)
    return loaded


def _mean_response_loss(model, tok, examples, system=None) -> float:
    seqs, _, _ = sft.tokenize_examples(tok, examples, system, 128)
    ids, mask, labels = sft._batch(seqs, tok.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        return float(sft._response_loss_sum(model, ids, mask, labels)) / int((labels[:, 1:] != -100).sum())


def test_labels_cover_only_the_response_and_eos() -> None:
    tok = models.tiny_model().tokenizer
    ex = Example(id="0", prompt="2+2", response="4")
    seqs, no_resp, too_long = sft.tokenize_examples(tok, [ex, Example(id="1", prompt="x")], "sys", 64)
    assert (no_resp, too_long) == (1, 0) and len(seqs) == 1
    prompt_ids = tok.encode(models.render_chat(tok, "2+2", "sys"))
    assert seqs[0].ids == [*prompt_ids, *tok.encode("4"), tok.eos_token_id] and seqs[0].n_prompt == len(prompt_ids)
    _, mask, labels = sft._batch([*seqs, sft._Tokenized(ids=[5, 6, 7], n_prompt=1)], tok.pad_token_id, torch.device("cpu"))
    assert labels[0].tolist() == [-100] * len(prompt_ids) + [*tok.encode("4"), tok.eos_token_id]
    assert labels[1].tolist()[:3] == [-100, 6, 7] and set(labels[1].tolist()[3:]) == {-100}  # right padding unlabelled
    assert mask[1].tolist()[:3] == [1, 1, 1] and set(mask[1].tolist()[3:]) == {0}
    # a prompt that fills max_length is skipped, a long response is truncated
    seqs, _, too_long = sft.tokenize_examples(tok, [ex], "sys", len(prompt_ids))
    assert too_long == 1 and not seqs
    seqs, _, _ = sft.tokenize_examples(tok, [ex], "sys", len(prompt_ids) + 1)
    assert len(seqs[0].ids) == len(prompt_ids) + 1


def test_sft_lowers_loss_writes_a_peft_adapter_and_restores_the_model(tmp_path: Path) -> None:
    from peft import PeftModel

    loaded = _learnable()
    before_state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    exs = _examples()
    loss_before = _mean_response_loss(loaded.model, loaded.tokenizer, exs)
    logs: list[str] = []
    stats = sft.train_sft(
        loaded, exs, None, LORA, SftSection(steps=24, batch_size=8, learning_rate=3e-2), tmp_path / "ad", seed=3, log=logs.append
    )
    assert stats["steps"] == 24 and stats["examples"] == 32 and stats["tokens_per_s"] > 0
    assert stats["loss_tail_mean"] < 0.5 * stats["loss_first"]
    assert any("sft step 24/24" in line for line in logs)

    # the base model is back as it was: same weights, no LoRA modules, eval mode, frozen
    after_state = loaded.model.state_dict()
    assert set(after_state) == set(before_state) and all(torch.equal(before_state[k], after_state[k]) for k in before_state)
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())

    # a standard adapter: peft loads it and its loss is the trained one; svd_lora reads it
    out = tmp_path / "ad"
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "sft_stats.json"]
    pm = PeftModel.from_pretrained(_learnable().model, str(out))
    loss_after = _mean_response_loss(pm, loaded.tokenizer, exs)
    assert loss_after < 0.5 * loss_before
    svd = svd_lora.from_peft_dir(out, 1.0, "relative", model=loaded.model, targets=list(LORA.targets))
    assert svd.solution_length == 2 * 4 * 2 * 4 and svd.modules[0].scaling == pytest.approx(2.0)


def test_sft_is_deterministic_and_micro_batching_gives_the_same_update(tmp_path: Path) -> None:
    loaded = models.tiny_model()
    cfg = SftSection(steps=4, batch_size=6, learning_rate=1e-2)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    runs = []
    for name, micro in (("a", None), ("b", None), ("c", 4)):
        sft.train_sft(loaded, _examples(12), "be brief", LORA, cfg, tmp_path / name, seed=5, log=lambda s: None, micro_batch_size=micro)
        runs.append(load_file(str(tmp_path / name / "adapter_model.safetensors"))[key])
    assert torch.equal(runs[0], runs[1])
    assert torch.allclose(runs[0], runs[2], rtol=1e-3, atol=1e-6)
    sft.train_sft(loaded, _examples(12), "be brief", LORA, cfg, tmp_path / "d", seed=6, log=lambda s: None)
    assert not torch.equal(runs[0], load_file(str(tmp_path / "d" / "adapter_model.safetensors"))[key])


def test_epochs_set_the_step_count(tmp_path: Path) -> None:
    stats = sft.train_sft(
        models.tiny_model(),
        _examples(10),
        None,
        LORA,
        SftSection(steps=0, epochs=2.0, batch_size=4, examples=9),
        tmp_path / "e",
        seed=0,
        log=lambda s: None,
    )
    assert stats["examples"] == 9 and stats["steps"] == 5  # ceil(2·9/4)


def test_bad_inputs(tmp_path: Path) -> None:
    loaded = models.tiny_model()
    with pytest.raises(sft.SftError, match="no usable examples"):
        sft.train_sft(loaded, [Example(id="0", prompt="q")], None, LORA, SftSection(steps=1), tmp_path / "x", seed=0, log=lambda s: None)
    with pytest.raises(svd_lora.AdapterError, match="match no Linear"):
        sft.train_sft(loaded, _examples(4), None, LoraSection(targets=["c_attn"]), SftSection(steps=1), tmp_path / "x", seed=0)
    assert not (tmp_path / "x").exists()
    assert sft.main(["--set", "sft.learning_rate=-1"]) == 2
    assert sft.main(["--set", "sft.no_such_key=1"]) == 2


def test_cached_adapter_is_reused(tmp_path: Path) -> None:
    cfg = Config(run=RunSection(seed=1), model=ModelSection(cache_dir=str(tmp_path)), lora=LORA, sft=SftSection(steps=2, batch_size=4))
    loaded = models.tiny_model()
    logs: list[str] = []
    p1 = sft.cached_sft_adapter(cfg, loaded, _examples(8), None, log=logs.append)
    assert p1.parent == tmp_path / "sft" and (p1 / "adapter_model.safetensors").is_file()
    mtime = (p1 / "adapter_model.safetensors").stat().st_mtime_ns
    p2 = sft.cached_sft_adapter(cfg, loaded, _examples(8), None, log=logs.append)
    assert p2 == p1 and (p1 / "adapter_model.safetensors").stat().st_mtime_ns == mtime and "reusing" in logs[-1]
    # anything that changes the adapter changes the key
    assert sft.sft_cache_dir(cfg.replace(**{"run.seed": 2}), _examples(8), None) != p1
    assert sft.sft_cache_dir(cfg, _examples(8), "a system prompt") != p1
    assert sft.sft_cache_dir(cfg, _examples(9), None) != p1
    assert sft.sft_cache_dir(cfg.replace(**{"lora.rank": 2}), _examples(8), None) != p1
    assert sft.sft_cache_dir(cfg.replace(**{"search.popsize": 64}), _examples(8), None) == p1
