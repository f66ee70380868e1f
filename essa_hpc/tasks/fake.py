"""The task paired with backend.name=fake: the completion text is the reward.

The fake backend writes ``repr(float)`` of the analytic reward of a candidate; this task reads it
back. Its examples are synthetic (ids only, empty prompts): TRAIN_SIZE for training and eval.size
for validation. A completion that is not a finite number is a failure (scored task.failure_reward).
"""

from __future__ import annotations

import math

from essa_hpc.config import Config
from essa_hpc.tasks.base import Example
from essa_hpc.tasks.common import ScoredTask

TRAIN_SIZE = 1024


class FakeTask(ScoredTask):
    name = "fake"
    correct_threshold = 0.0  # the analytic rewards are −f(x) <= 0; "correct" = at the optimum

    def __init__(self, cfg: Config, train_size: int = TRAIN_SIZE) -> None:
        train = [Example(id=f"fake-{i}", prompt="") for i in range(max(train_size, cfg.task.batch_size))]
        val = [Example(id=f"fake-val-{i}", prompt="") for i in range(cfg.eval.size)]
        super().__init__(train, val, cfg.task.failure_reward)
        self.system_prompt = None

    def score(self, example: Example, text: str) -> tuple[float, dict[str, float]]:
        v = float(text)
        if not math.isfinite(v):
            raise ValueError(f"completion {text!r} is not a finite number")
        return v, {}
