"""Alignment to a learned reward: a sequence-classification reward model scores each completion.

Data: task.path (required), prompts from ``prompt`` (or task.prompt_field); other columns are kept
for plugins. Reward: the reward model's score of (prompt, completion) (see
essa_hpc.rewards.reward_model), optionally z-scored per call (task.reward_normalization). The model
loads on the first reward() call on the policy's device (model.device) and dtype, so building the
task (e.g. for SFT data) costs nothing. Validation ``accuracy`` counts scores >= 0
(``correct_threshold``); mean reward is the number to watch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from essa_hpc.config import Config
from essa_hpc.rewards.plugins import MAX_ERRORS
from essa_hpc.rewards.reward_model import RewardModelScorer
from essa_hpc.tasks.base import Example, Rewards, TaskError
from essa_hpc.tasks.common import ASSISTANT_SYSTEM_PROMPT, check_lengths, file_splits
from essa_hpc.tasks.data import to_examples


class RewardModelTask:
    name = "reward_model"
    correct_threshold = 0.0

    def __init__(self, cfg: Config) -> None:
        t = cfg.task
        if not t.reward_model:
            raise TaskError("task.reward_model: task.name=reward_model needs the path of a reward model")
        pf, af = t.prompt_field or "prompt", t.answer_field
        self._train, self._validation = file_splits(
            cfg, lambda recs, src: to_examples(recs, src, pf, af or "answer", answer_required=af is not None, response_field="response")
        )
        self.system_prompt: str | None = t.system_prompt if t.system_prompt is not None else ASSISTANT_SYSTEM_PROMPT
        self.failure_reward = t.failure_reward
        self.scorer = RewardModelScorer(
            t.reward_model, device=_device(cfg), dtype=_dtype(cfg), batch_size=t.reward_batch_size, normalization=t.reward_normalization
        )

    def train(self) -> Sequence[Example]:
        return self._train

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
