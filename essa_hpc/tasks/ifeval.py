"""IFEval instruction following (verifiable instructions, no reference responses).

Data: task.path (default: ``shared/data/ifeval/input_data.jsonl`` when present) with fields ``prompt``,
``instruction_id_list`` and ``kwargs`` (one dict per instruction), and optionally ``key``. Every
instruction is validated when the task is built, so a bad row fails before any model loads. IFEval has
no training responses: the training split is the prompts, and validation is task.val_path or a fixed
held-out slice of them.

Reward (task.ifeval_reward): ``instruction`` — the fraction of the prompt's instructions followed
(default, a dense signal for the search); ``prompt`` — 1.0 only when all are followed (IFEval's
prompt-level accuracy). task.ifeval_loose uses IFEval's loose check (also accept the response
without its first/last line or without '*'). Rewards.components always carries the four IFEval
numbers per completion: ``prompt_strict``, ``instruction_strict``, ``prompt_loose``,
``instruction_loose`` (the instruction ones as fractions).
"""

from __future__ import annotations

from collections.abc import Sequence

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
        train, val = file_splits(
            cfg,
            lambda recs, src: to_ifeval_examples(recs, src, pf),
            default if default.is_file() else None,
            what=f" (no default copy at {default})",
        )
        super().__init__(train, val, t.failure_reward)
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
