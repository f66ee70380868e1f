"""Reward models shaped like ArmoRM (docs/design.md, "The paper's settings"): their own code behind
task.trust_remote_code (off by default), a `score` output, and multi-objective heads reduced as
ArmoRM's model card does (score = Σ_k rewards_k · (gating · Tᵀ)_k). A tiny random model of that shape
is written to a folder with its modeling file and an auto_map, and loaded through transformers'
remote-code path, as ArmoRM itself is."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from essa_hpc.config import Config
from essa_hpc.tasks import TaskError, make_task

MODELING = """
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel, LlamaPreTrainedModel
from transformers.utils import ModelOutput


class TinyArmoConfig(LlamaConfig):
    model_type = "tiny_armo"

    def __init__(self, num_objectives=5, emit_score=True, **kw):
        self.num_objectives, self.emit_score = num_objectives, emit_score
        super().__init__(**kw)


@dataclass
class ArmoOutput(ModelOutput):
    rewards: Optional[torch.FloatTensor] = None
    gating_output: Optional[torch.FloatTensor] = None
    score: Optional[torch.FloatTensor] = None


class TinyArmoRM(LlamaPreTrainedModel):
    config_class = TinyArmoConfig

    def __init__(self, config):
        super().__init__(config)
        k = config.num_objectives
        self.model = LlamaModel(config)
        self.regression_layer = nn.Linear(config.hidden_size, k, bias=False)
        self.gating = nn.Linear(config.hidden_size, k)
        self.reward_transform_matrix = nn.Parameter(torch.randn(k, k), requires_grad=False)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kw):
        h = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.sum(dim=1) - 1 if attention_mask is not None else torch.full((h.shape[0],), h.shape[1] - 1)
        hl = h[torch.arange(h.shape[0]), last]
        rewards = self.regression_layer(hl)
        gating = torch.softmax(self.gating(hl), dim=-1)
        score = (rewards * (gating @ self.reward_transform_matrix.T)).sum(dim=-1, keepdim=True)
        return ArmoOutput(rewards=rewards, gating_output=gating, score=score if self.config.emit_score else None)
"""


def tiny_armo(path: Path, emit_score: bool = True) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path.mkdir(parents=True)
    (path / "modeling_tiny_armo.py").write_text(MODELING)
    spec = importlib.util.spec_from_file_location(f"tiny_armo_{path.name}", path / "modeling_tiny_armo.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{ch: 3 + i for i, ch in enumerate("abcdefghijklmnopqrstuvwxyz0123456789.,!? ")}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>").save_pretrained(path)
    torch.manual_seed(0)
    cfg = mod.TinyArmoConfig(
        num_objectives=5,
        emit_score=emit_score,
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        num_labels=5,
        pad_token_id=0,
        eos_token_id=2,
    )
    cfg.auto_map = {
        "AutoConfig": "modeling_tiny_armo.TinyArmoConfig",
        "AutoModelForSequenceClassification": "modeling_tiny_armo.TinyArmoRM",
    }
    mod.TinyArmoRM(cfg).save_pretrained(path)
    assert "auto_map" in json.loads((path / "config.json").read_text())
    return path


def config(rm: Path, data: Path, **extra: object) -> Config:
    return Config().replace(
        **{"task.name": "reward_model", "task.reward_model": str(rm), "task.path": str(data), "model.device": "cpu", **extra}
    )


def test_armorm_shaped_model_scores_through_its_own_code(tmp_path: Path) -> None:
    rm = tiny_armo(tmp_path / "armo")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}?"}) + "\n" for i in range(6)))
    with pytest.raises(TaskError, match="trust_remote_code"):
        make_task(config(rm, data))  # off by default: the model's own code does not run
    task = make_task(config(rm, data, **{"task.trust_remote_code": True, "task.reward_batch_size": 2}))
    exs = list(task.train()[:3])
    comps = ["a short answer.", "a much longer answer with more words!", "ok"]
    r = task.reward(exs, comps)
    assert r.failures == 0 and r.values.shape == (3,) and len(set(np.round(r.values, 6))) == 3
    # the reward is the model's `score`, what its card calls the preference score
    import torch

    scorer = task.scorer  # type: ignore[attr-defined]
    texts = [scorer.render(e.prompt, c) for e, c in zip(exs, comps)]
    own = []
    for t in texts:
        enc = scorer.tokenizer([t], return_tensors="pt")
        with torch.inference_mode():
            own.append(float(scorer.model(**enc).score[0, 0]))
    assert np.allclose(r.values, own, atol=1e-5)
    # a model that returns only the objectives and the gating: reduced as the model card says
    rm2 = tiny_armo(tmp_path / "armo_noscore", emit_score=False)
    r2 = make_task(config(rm2, data, **{"task.trust_remote_code": True})).reward(exs, comps)
    assert np.allclose(r2.values, r.values, atol=1e-5), "same weights (seed 0): the reduction gives the model's own score"
    with pytest.raises(TaskError, match="labels"):
        make_task(config(rm, data, **{"task.trust_remote_code": True, "task.reward_output": "logits"})).reward(exs, comps)
