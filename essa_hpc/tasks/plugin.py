"""A task whose reward is a user function: task.name = ``package.module:function``.

Data: task.path (required) with prompts in ``prompt`` (or task.prompt_field) and, when present, a
reference in ``answer`` (or task.answer_field, then required in every row); every other column goes
to Example.columns and reaches the function as a keyword argument (see essa_hpc.rewards.plugins).
System prompt: task.system_prompt (none by default).
"""

from __future__ import annotations

from collections.abc import Sequence

from essa_hpc.config import Config
from essa_hpc.rewards.plugins import Plugin, score_plugins
from essa_hpc.tasks.base import Example, Rewards
from essa_hpc.tasks.common import check_lengths, file_splits
from essa_hpc.tasks.data import to_examples


class PluginTask:
    correct_threshold = 1.0

    def __init__(self, cfg: Config, plugin: Plugin) -> None:
        t = cfg.task
        self.name = plugin.name
        self.plugin = plugin
        self.timeout_s, self.failure_reward = t.reward_timeout_s, t.failure_reward
        pf, af = t.prompt_field or "prompt", t.answer_field
        self._train, self._validation = file_splits(
            cfg, lambda recs, src: to_examples(recs, src, pf, af or "answer", answer_required=af is not None, response_field="response")
        )
        self.system_prompt = t.system_prompt

    def train(self) -> Sequence[Example]:
        return self._train

    def validation(self) -> Sequence[Example]:
        return self._validation

    def reward(self, examples: Sequence[Example], completions: Sequence[str]) -> Rewards:
        check_lengths(examples, completions, self.name)
        return score_plugins([self.plugin], examples, completions, self.timeout_s, self.failure_reward)
