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
scored in batches of ``batch_size``. Which output is the reward (task.reward_output, ``reward_values``):
a ``score`` output where the model returns one (ArmoRM and reward models shaped like it: a
multi-objective head whose objectives a gating network weighs into one preference score); a
multi-objective output without it (``rewards`` and ``gating_output``, and the model's
``reward_transform_matrix``) reduced as ArmoRM's model card does, score = Σ_k rewards_k · (gating ·
Tᵀ)_k; else the single logit (or logit 1 − logit 0 for a two-label classifier). A reward model whose
config.json maps its classes to its own code (``auto_map``, as ArmoRM's) loads only with
task.trust_remote_code (off by default: that code runs with the user's permissions). task.reward_model
may be a local folder or a hub id. ``zscore`` standardizes the scores of one call (mean 0, std 1),
which makes a score depend on the other completions of that call.
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
REWARD_OUTPUTS = ("auto", "score", "logits")


def reward_values(output: Any, model: Any, mode: str = "auto") -> Any:
    """One reward per sequence (a float tensor [n]) from a reward model's forward output.

    ``score`` (mode auto or score): the model's own preference score (ArmoRM: the gating-weighted
    objectives); without one, ``rewards`` · (``gating_output`` · Tᵀ) with T the model's
    ``reward_transform_matrix``, the reduction ArmoRM's model card states. ``logits`` (mode logits, or
    auto without a score): the single logit, or logit 1 − logit 0 of a two-label classifier.
    """
    if mode not in REWARD_OUTPUTS:
        raise TaskError(f"task.reward_output: expected one of {REWARD_OUTPUTS}, got {mode!r}")
    if mode in ("auto", "score"):
        score = getattr(output, "score", None)
        rewards, gating = getattr(output, "rewards", None), getattr(output, "gating_output", None)
        transform = getattr(model, "reward_transform_matrix", None)
        if score is None and rewards is not None and gating is not None and transform is not None:
            score = (rewards.float() * (gating.float() @ transform.float().T)).sum(dim=-1)
        if score is not None:
            score = score.float().reshape(score.shape[0], -1)
            if score.shape[1] != 1:
                raise TaskError(f"task.reward_output: the model's score has {score.shape[1]} values per sequence, expected 1")
            return score[:, 0]
        if mode == "score":
            raise TaskError("task.reward_output=score: the reward model returns no score (nor rewards and gating_output to reduce)")
    logits = getattr(output, "logits", None)
    if logits is None:
        raise TaskError("task.reward_output: the reward model returns neither a score nor logits")
    logits = logits.float()
    if logits.shape[-1] not in (1, 2):
        raise TaskError(f"task.reward_model: expected a reward head with 1 (or 2) labels, got {logits.shape[-1]}; set task.reward_output")
    return logits[:, 0] if logits.shape[-1] == 1 else logits[:, 1] - logits[:, 0]


class RewardModelScorer:
    def __init__(
        self,
        path: str | Path,
        device: Any = "cpu",
        dtype: Any = None,
        batch_size: int = 16,
        normalization: str = "none",
        max_length: int = 4096,
        output: str = "auto",
        trust_remote_code: bool = False,
    ) -> None:
        self.path = Path(path)
        self.source = str(path)
        hub_id = not self.path.exists() and self.source.count("/") == 1 and not self.source.startswith((".", "~", "/"))
        if not hub_id and not (self.path / "config.json").is_file():
            raise TaskError(f"task.reward_model: {self.path} is not a model folder (no config.json)")
        if not hub_id and not trust_remote_code:
            import json

            try:
                auto_map = json.loads((self.path / "config.json").read_text()).get("auto_map")
            except (OSError, ValueError):
                auto_map = None
            if auto_map:
                raise TaskError(
                    f"task.reward_model={self.path}: the model runs its own code ({sorted(auto_map)[0]} in config.json's auto_map); "
                    "set task.trust_remote_code=true if you trust that code"
                )
        if output not in REWARD_OUTPUTS:
            raise TaskError(f"task.reward_output: expected one of {REWARD_OUTPUTS}, got {output!r}")
        self.output, self.trust_remote_code = output, trust_remote_code
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
            remote = {"trust_remote_code": True} if self.trust_remote_code else {}
            tok = AutoTokenizer.from_pretrained(self.source, **remote)
            model = AutoModelForSequenceClassification.from_pretrained(self.source, dtype=self.dtype or torch.float32, **remote)
        except (OSError, ValueError) as e:
            raise TaskError(
                f"task.reward_model={self.path}: cannot load a sequence-classification model ({type(e).__name__}: {str(e).splitlines()[0]})"
            ) from None
        if self.output == "logits" and model.config.num_labels not in (1, 2):
            raise TaskError(f"task.reward_model={self.path}: expected a reward head with 1 (or 2) labels, got {model.config.num_labels}")
        if self.output == "auto" and model.config.num_labels not in (1, 2) and not self.trust_remote_code:
            raise TaskError(
                f"task.reward_model={self.path}: expected a reward head with 1 (or 2) labels, got {model.config.num_labels} "
                "(a multi-objective model with its own scoring code needs task.trust_remote_code)"
            )
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
                vals = reward_values(self.model(**enc), self.model, self.output)
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
            t.reward_model,
            device=_device(cfg),
            dtype=_dtype(cfg),
            batch_size=t.reward_batch_size,
            normalization=t.reward_normalization,
            output=t.reward_output,
            trust_remote_code=t.trust_remote_code,
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
