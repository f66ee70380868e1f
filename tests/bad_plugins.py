"""Reward plugins that misbehave on purpose, for tests/test_bad_inputs.py (task.plugins=tests.bad_plugins:NAME).

Each takes the TRL-style arguments of essa_hpc/tasks/plugin.py and fails in one way a user's plugin can.
"""

from __future__ import annotations

import time
from typing import Any


def huge(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    """A finite reward far beyond what the exact fixed-point sums hold (dist.reward_limit)."""
    return [1e9] * len(completions)


def raises(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    raise RuntimeError("boom: the plugin's service is down")


def nan(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    return [float("nan")] * len(completions)


def short(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    return [0.0] * (len(completions) - 1)


def slow(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    time.sleep(0.3)
    return [0.0] * len(completions)


def half(prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
    """Every other reward is None: some failures, never all."""
    return [None if i % 2 else 0.0 for i in range(len(completions))]


def stuck(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    """A reward that hangs (a dead service): only a stop signal ends the run in time."""
    time.sleep(120)
    return [0.0] * len(completions)
