"""IFEval instruction following (verifiable instructions, no reference responses).

Data: JSONL (or any task data format) with fields ``prompt``, ``instruction_id_list`` and ``kwargs``
(one dict per instruction), and optionally ``key``. Every instruction is validated when the task is
built, so a bad row fails before any model loads. As in the paper (docs/design.md, "The paper's
settings"), training prompts are a file of their own, task.path (any "IFEval-like" prompts), and the
benchmark validates: task.val_path, else all of ``shared/data/ifeval/input_data.jsonl`` (541 prompts;
cut to eval.size). Training and validation prompts must be disjoint. Without task.path the task still
offers the benchmark's prompts (a fixed held-out slice validates; for evaluation), but a run, SFT or GRPO
refuses to train on them (``training_refusal``, checked by ``tasks.training_split``). IFEval has no
reference responses: the SFT warm start reads sft.path.

Reward (task.ifeval_reward): ``instruction`` — the fraction of the prompt's instructions followed
(default, a dense signal for the search); ``prompt`` — 1.0 only when all are followed (IFEval's
prompt-level accuracy). task.ifeval_loose uses IFEval's loose check (also accept the response
without its first/last line or without '*'). Rewards.components always carries the four IFEval
numbers per completion: ``prompt_strict``, ``instruction_strict``, ``prompt_loose``,
``instruction_loose`` (the instruction ones as fractions).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from essa_hpc.config import Config
from essa_hpc.tasks.base import Example, TaskError
from essa_hpc.tasks.common import ASSISTANT_SYSTEM_PROMPT, ScoredTask, file_splits
from essa_hpc.tasks.data import Record, field_value, shared_data_dir
from essa_hpc.tasks.ifeval_checks import Checker, IFEvalError, build_checker, check_all

REWARD_MODES = ("instruction", "prompt")


def to_ifeval_examples(records: Sequence[Record], source: str, prompt_field: str = "prompt") -> list[Example]:
    stem = source.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    out = []
    for rec in records:
        prompt = field_value(rec, prompt_field, source)
        ids = field_value(rec, "instruction_id_list", source)
        kwargs = rec.data.get("kwargs")
        if kwargs is None:
            kwargs = [{} for _ in ids]
        if not isinstance(prompt, str):
            raise TaskError(f"{source}: record {rec.number}: field {prompt_field!r} should be text, got {type(prompt).__name__}")
        if not isinstance(ids, list) or not ids or not isinstance(kwargs, list) or len(kwargs) != len(ids):
            raise TaskError(
                f"{source}: record {rec.number}: expected instruction_id_list (a non-empty list) and kwargs "
                f"(a list of the same length), got {ids!r} and {kwargs!r}"
            )
        for iid, kw in zip(ids, kwargs):
            try:
                build_checker(iid, kw, prompt)
            except IFEvalError as e:
                raise TaskError(f"{source}: record {rec.number}: {e}") from None
        ident = rec.data.get("key", rec.data.get("id", f"{stem}:{rec.number}"))
        cols = {k: v for k, v in rec.data.items() if k != prompt_field}
        cols["kwargs"] = kwargs
        out.append(Example(id=str(ident), prompt=prompt, answer=None, response=None, columns=cols))
    return out


class IFEvalTask(ScoredTask):
    name = "ifeval"

    def __init__(self, cfg: Config) -> None:
        t = cfg.task
        mode = t.ifeval_reward
        if mode not in REWARD_MODES:
            raise TaskError(f"task.ifeval_reward: expected one of {REWARD_MODES}, got {mode!r}")
        self.mode = mode
        self.loose = t.ifeval_loose
        pf = t.prompt_field or "prompt"
        default = shared_data_dir() / "ifeval" / "input_data.jsonl"
        benchmark = default if default.is_file() else None
        # Training prompts are task.path, a file apart from the benchmark (the paper: 3,414 "IFEval-like"
        # prompts); validation is task.val_path, else the whole benchmark. Without task.path the split
        # below is the benchmark's own, kept for evaluation only: training_refusal stops any run on it.
        self.training_refusal: str | None = None
        if t.path is None:
            self.training_refusal = (
                "task.path: no IFEval training prompts given, and the IFEval benchmark's 541 prompts only validate "
                "(the paper trains on 3,414 IFEval-like prompts); set task.path to a JSONL of prompts with "
                "instruction_id_list and kwargs"
            )
        elif t.val_path is None and benchmark is not None:
            if Path(t.path).resolve() == benchmark.resolve():
                raise TaskError(f"task.path={t.path} is the IFEval benchmark itself; training prompts must be a separate file")
            cfg = cfg.replace(**{"task.val_path": str(benchmark)})
        train, val, sft = file_splits(
            cfg, lambda recs, src: to_ifeval_examples(recs, src, pf), benchmark, what=f" (no default copy at {default})"
        )
        if t.path is not None:
            shared = {e.prompt for e in train} & {e.prompt for e in val}
            if shared:
                raise TaskError(
                    f"task.path={t.path}: {len(shared)} training prompt(s) are validation prompts too (e.g. {sorted(shared)[0][:60]!r}); "
                    "training and benchmark prompts must be disjoint"
                )
        super().__init__(train, val, t.failure_reward, sft)
        self.system_prompt = t.system_prompt if t.system_prompt is not None else ASSISTANT_SYSTEM_PROMPT
        self._checkers: dict[tuple[str, str], list[Checker]] = {}

    def checkers(self, example: Example) -> list[Checker]:
        key = (example.id, example.prompt)
        cs = self._checkers.get(key)
        if cs is None:
            ids, kws = example.columns["instruction_id_list"], example.columns["kwargs"]
            cs = [build_checker(i, k, example.prompt) for i, k in zip(ids, kws)]
            self._checkers[key] = cs
        return cs

    def score(self, example: Example, text: str) -> tuple[float, dict[str, float]]:
        cs = self.checkers(example)
        strict = check_all(cs, text, loose=False)
        loose = check_all(cs, text, loose=True)
        parts = {
            "prompt_strict": float(all(strict)),
            "instruction_strict": sum(strict) / len(strict),
            "prompt_loose": float(all(loose)),
            "instruction_loose": sum(loose) / len(loose),
        }
        kind = "loose" if self.loose else "strict"
        return parts[f"{self.mode}_{kind}"], parts
