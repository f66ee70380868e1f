"""Shared pieces of the built-in tasks: the scoring loop and file-backed splits."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from essa_hpc.config import Config
from essa_hpc.tasks.base import MAX_ERRORS, Example, Rewards, TaskError
from essa_hpc.tasks.data import Record, held_out, read_records, require_nonempty, reserve_sft, validation_source

MATH_SYSTEM_PROMPT = "Please reason step by step and place your final answer in \\boxed{}."
ASSISTANT_SYSTEM_PROMPT = "You are a helpful, honest, and concise assistant."
VALIDATION_SPLITS = ("validation", "val", "test")


def check_lengths(examples: Sequence[Example], completions: Sequence[str], task: str) -> None:
    if len(examples) != len(completions):
        raise TaskError(f"task {task}: reward() got {len(examples)} examples but {len(completions)} completions")


class ScoredTask:
    """A task whose reward is a per-completion function ``score(example, text) -> (reward, components)``.

    An exception inside ``score`` is a failure of that completion (scored ``failure_reward``, counted,
    its message kept), never a crash. ``correct_threshold`` is the reward at which a completion counts
    as correct in validation metrics (essa_hpc.metrics).
    """

    name: str = "task"
    system_prompt: str | None = None
    correct_threshold: float = 1.0

    def __init__(
        self, train: Sequence[Example], validation: Sequence[Example], failure_reward: float = 0.0, sft: Sequence[Example] = ()
    ) -> None:
        self._train = list(train)
        self._validation = list(validation)
        self._sft = list(sft)
        self.failure_reward = float(failure_reward)

    def train(self) -> Sequence[Example]:
        return self._train

    def sft_examples(self) -> Sequence[Example]:
        """The SFT split reserved by task.sft_size (empty: the warm start uses the training split)."""
        return self._sft

    def validation(self) -> Sequence[Example]:
        return self._validation

    def score(self, example: Example, text: str) -> tuple[float, dict[str, float]]:
        raise NotImplementedError

    def reward(self, examples: Sequence[Example], completions: Sequence[str]) -> Rewards:
        check_lengths(examples, completions, self.name)
        n = len(completions)
        values = np.empty(n)
        comps: dict[str, np.ndarray] = {}
        failures = 0
        errors: list[str] = []
        for i, (ex, text) in enumerate(zip(examples, completions)):
            try:
                v, parts = self.score(ex, text)
            except Exception as e:
                failures += 1
                v, parts = self.failure_reward, {}
                if len(errors) < MAX_ERRORS:
                    errors.append(f"{self.name}: scoring {ex.id!r} raised {type(e).__name__}: {str(e)[:200]}")
            values[i] = v
            for k, x in parts.items():
                comps.setdefault(k, np.zeros(n))[i] = x
        return Rewards(values=values, failures=failures, errors=errors, components=comps)


def unique_ids(examples: Sequence[Example], what: str) -> None:
    """Example ids key caches (rendered prompts, checkers): two different examples may not share one."""
    seen: dict[str, Example] = {}
    for e in examples:
        other = seen.setdefault(e.id, e)
        if other is not e and other.prompt != e.prompt:
            raise TaskError(f"{what}: two different examples have the id {e.id!r}; make the data's id/key column unique")


Mapper = Callable[[Sequence[Record], str], list[Example]]


class Splits(NamedTuple):
    train: list[Example]  # what ESSA draws minibatches from
    validation: list[Example]
    sft: list[Example]  # reserved for the SFT warm start by task.sft_size (empty when 0), disjoint from train


def file_splits(cfg: Config, mapper: Mapper, default_path: Path | None = None, default_val: Path | None = None, what: str = "") -> Splits:
    """(train, validation, sft) for a file-backed task.

    Train: task.path (else ``default_path``). Validation, first that applies: task.val_path; the
    default validation file when task.path is unset; a validation/test split inside the task.path
    folder or DatasetDict; else a fixed held-out slice of train (``tasks.data.held_out``). The
    validation split is then cut to its first eval.size examples; eval.split=train validates on the
    first eval.size training examples instead. Last, task.sft_size examples of train are reserved for the
    SFT warm start and task.train_size caps the rest (``tasks.data.reserve_sft``).
    """
    t, ev = cfg.task, cfg.eval
    path: Path | None = Path(t.path) if t.path else default_path
    if path is None:
        raise TaskError(
            f"task.path: task {t.name} needs data{what}; set task.path to a JSONL/JSON/CSV/parquet file or a save_to_disk folder"
        )
    train = mapper(read_records(path, key="task.path"), str(path))
    require_nonempty(train, f"task.path={path}")
    val: list[Example] | None = None
    if t.val_path:
        val = mapper(read_records(t.val_path, key="task.val_path"), str(t.val_path))
        require_nonempty(val, f"task.val_path={t.val_path}")
    elif t.path is None and default_val is not None:
        val = mapper(read_records(default_val, key="task.val_path"), str(default_val))
    else:
        src = validation_source(path)
        if src is not None:
            val = mapper(read_records(src[0], split=src[1], key="task.path"), str(src[0]))
    if not val:
        train, val = held_out(train, ev.size)
    unique_ids(train, "training split")
    unique_ids(val, "validation split")
    taken = {e.id for e in train}
    if any(e.id in taken for e in val):  # e.g. two files with the same stem: keep ids unique across splits
        val = [dataclasses.replace(e, id=f"val/{e.id}") for e in val]
    split = ev.split.lower()
    if split not in (*VALIDATION_SPLITS, "train"):
        raise TaskError(f"eval.split: expected validation (or test) or train, got {ev.split!r}")
    essa, sft = reserve_sft(train, t.sft_size, t.train_size)
    if split == "train":
        return Splits(essa, essa[: ev.size], sft)
    return Splits(essa, val[: ev.size], sft)
