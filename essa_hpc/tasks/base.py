"""What every task provides: examples (train and validation) and a reward for completions.

Tasks know nothing about models or ranks. Minibatches are drawn from (run seed, generation) so every
rank, and every rank count, sees the same prompts (docs/design.md, "One generation", step 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

MAX_ERRORS = 5  # distinct failure messages kept in Rewards.errors: enough to diagnose, short enough to log


class TaskError(ValueError):
    """Bad task data or task settings; the message names the file, field, row or setting to fix."""


@dataclass(frozen=True)
class Example:
    id: str
    prompt: str  # the user message (the system prompt is the task's)
    answer: Any = None  # reference answer, or None
    response: str | None = None  # reference response for SFT, where the data has one
    columns: dict[str, Any] = field(default_factory=dict)  # extra fields handed to reward functions


@dataclass
class Rewards:
    values: np.ndarray  # float64 [n], one per completion; failures already replaced by the failure value
    failures: int = 0  # reward-function exceptions, NaN/None results (counted per completion)
    timeouts: int = 0  # completions whose reward function ran past task.reward_timeout_s
    # Optional per-completion breakdowns (float64 [n] each), e.g. "answer", "format", "plugin:mod:fn",
    # "ifeval_prompt_strict": for logging and validation metrics; never needed to run.
    components: dict[str, np.ndarray] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # a few distinct failure messages, for the log


class Task(Protocol):
    name: str
    system_prompt: str | None

    def train(self) -> Sequence[Example]: ...

    def validation(self) -> Sequence[Example]: ...

    def reward(self, examples: Sequence[Example], completions: Sequence[str]) -> Rewards: ...
