"""Alignment to a learned reward: a sequence-classification reward model scores each completion.

Data: task.path (required), prompts from ``prompt`` (or task.prompt_field); other columns are kept
for plugins. Reward: the reward model's score of (prompt, completion), optionally z-scored per call
(task.reward_normalization). Validation ``accuracy`` counts scores >= 0 (``correct_threshold``); mean
reward is the number to watch.

Scoring (``RewardModelScorer``): the model (``AutoModelForSequenceClassification``) and its tokenizer
load from a local folder on the first reward() call, on the policy's device (model.device) and dtype,
in eval mode without gradients, so building the task (e.g. for SFT data) costs nothing. Each pair is
rendered with the reward model's chat template as a user turn and an assistant turn (a plain
``prompt\\n\\ncompletion`` when it has no template), tokenized with right padding and truncation, and
scored in batches of ``batch_size``; the score is the single logit (or logit 1 − logit 0 for a
two-label classifier). ``zscore`` standardizes the scores of one call (mean 0, std 1), which makes a
score depend on the other completions of that call.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from essa_hpc.config import Config
from essa_hpc.tasks.base import MAX_ERRORS, Example, Rewards, TaskError
from essa_hpc.tasks.common import ASSISTANT_SYSTEM_PROMPT, check_lengths, file_splits
from essa_hpc.tasks.data import to_examples

NORMALIZATIONS = ("none", "zscore")


class RewardModelScorer:
    def __init__(
        self,
        path: str | Path,
        device: Any = "cpu",
        dtype: Any = None,
        batch_size: int = 16,
        normalization: str = "none",
        max_length: int = 4096,
    ) -> None:
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise TaskError(f"task.reward_model: {self.path} is not a model folder (no config.json)")
        if normalization not in NORMALIZATIONS:
            raise TaskError(f"task.reward_normalization: expected one of {NORMALIZATIONS}, got {normalization!r}")
        self.device, self.dtype = device, dtype
        self.batch_size = batch_size
        self.normalization = normalization
        self.max_length = max_length
        self.model: Any = None
        self.tokenizer: Any = None

    def load(self) -> None:
        if self.model is not None:
            return
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(self.path)
            model = AutoModelForSequenceClassification.from_pretrained(self.path, dtype=self.dtype or torch.float32)
        except (OSError, ValueError) as e:
            raise TaskError(
                f"task.reward_model={self.path}: cannot load a sequence-classification model ({type(e).__name__}: {str(e).splitlines()[0]})"
            ) from None
        if model.config.num_labels not in (1, 2):
            raise TaskError(f"task.reward_model={self.path}: expected a reward head with 1 (or 2) labels, got {model.config.num_labels}")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
        tok.padding_side = "right"
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
        model.to(self.device).eval().requires_grad_(False)
        self.model, self.tokenizer = model, tok

    def render(self, prompt: str, completion: str) -> str:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return str(tok.apply_chat_template(msgs, tokenize=False))
        return f"{prompt}\n\n{completion}"

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        import torch

        self.load()
        texts = [self.render(p, c) for p, c in zip(prompts, completions)]
        limit = min(self.max_length, int(getattr(self.tokenizer, "model_max_length", self.max_length) or self.max_length))
        out = np.empty(len(texts))
        for s in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[s : s + self.batch_size], return_tensors="pt", padding=True, truncation=True, max_length=limit)
            enc = {k: v.to(self.model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            with torch.inference_mode():
                logits = self.model(**enc).logits.float()
            vals = logits[:, 0] if logits.shape[-1] == 1 else logits[:, 1] - logits[:, 0]
            out[s : s + len(vals)] = vals.cpu().numpy()
        if self.normalization == "zscore" and len(out) > 0:
            std = float(out.std())
            out = (out - out.mean()) / std if std > 1e-8 else np.zeros_like(out)
        return out


class RewardModelTask:
    name = "reward_model"
    correct_threshold = 0.0

    def __init__(self, cfg: Config) -> None:
        t = cfg.task
        if not t.reward_model:
            raise TaskError("task.reward_model: task.name=reward_model needs the path of a reward model")
        pf, af = t.prompt_field or "prompt", t.answer_field
        self._train, self._validation, self._sft = file_splits(
            cfg, lambda recs, src: to_examples(recs, src, pf, af or "answer", answer_required=af is not None, response_field="response")
        )
        self.system_prompt: str | None = t.system_prompt if t.system_prompt is not None else ASSISTANT_SYSTEM_PROMPT
        self.failure_reward = t.failure_reward
        self.scorer = RewardModelScorer(
            t.reward_model, device=_device(cfg), dtype=_dtype(cfg), batch_size=t.reward_batch_size, normalization=t.reward_normalization
        )

    def train(self) -> Sequence[Example]:
        return self._train

    def sft_examples(self) -> Sequence[Example]:
        return self._sft

    def validation(self) -> Sequence[Example]:
        return self._validation

    def reward(self, examples: Sequence[Example], completions: Sequence[str]) -> Rewards:
        check_lengths(examples, completions, self.name)
        self.scorer.load()  # load errors are configuration errors: raise
        try:
            values = self.scorer.score([e.prompt for e in examples], list(completions))
        except Exception as e:
            n = len(completions)
            return Rewards(
                values=np.full(n, float(self.failure_reward)),
                failures=n,
                errors=[f"reward_model: scoring raised {type(e).__name__}: {str(e)[:200]}"][:MAX_ERRORS],
            )
        bad = ~np.isfinite(values)
        values = np.where(bad, float(self.failure_reward), values)
        return Rewards(
            values=values.astype(np.float64), failures=int(bad.sum()), errors=["reward_model: non-finite score"] if bad.any() else []
        )


def _device(cfg: Config) -> str:
    from essa_hpc.models import resolve_device

    return str(resolve_device(cfg.model.device))


def _dtype(cfg: Config) -> object:
    import torch

    from essa_hpc.models import resolve_dtype

    return resolve_dtype(cfg.model.dtype, torch.device(_device(cfg)))
