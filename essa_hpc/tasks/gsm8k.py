r"""GSM8K grade-school math.

Data: task.path (JSONL/JSON/CSV/parquet/save_to_disk; fields ``question`` and ``answer`` unless
task.prompt_field / task.answer_field say otherwise). Without task.path: the project's copy in
``shared/data/gsm8k`` (train.jsonl trains, test.jsonl validates) when present.

The reference answer is the text after ``####`` with thousands commas removed (a plain-number answer
column is accepted as is). Example.response, for SFT, is the reference solution with the calculator
annotations ``<<48/2=24>>`` removed and the ``#### N`` line replaced by ``The answer is \boxed{N}.``

Reward: the final answer is the last \boxed{} in the completion, else the last number; 1.0 when it
equals the reference numerically (math-verify decides boxed non-numbers such as \frac{36}{2});
task.format_credit for a well-formed \boxed{} with a wrong answer; else 0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from essa_hpc.config import Config
from essa_hpc.tasks.answers import numeric_match, parse_number
from essa_hpc.tasks.base import Example, TaskError
from essa_hpc.tasks.common import MATH_SYSTEM_PROMPT, ScoredTask, file_splits
from essa_hpc.tasks.data import Record, field_value, shared_data_dir

_CALC = re.compile(r"<<[^<>]*>>")


def reference_answer(text: str) -> str | None:
    """The answer after '####' without commas (e.g. '70000'); None when there is no '####'."""
    if "####" not in text:
        return None
    return text.split("####")[-1].strip().replace(",", "")


def reference_response(solution: str, answer: str) -> str:
    body = _CALC.sub("", solution.split("####")[0]).strip()
    return f"{body}\nThe answer is \\boxed{{{answer}}}." if body else f"The answer is \\boxed{{{answer}}}."


def to_gsm8k_examples(
    records: Sequence[Record], source: str, prompt_field: str = "question", answer_field: str = "answer"
) -> list[Example]:
    stem = source.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    out = []
    for rec in records:
        q = field_value(rec, prompt_field, source)
        raw = field_value(rec, answer_field, source)
        if not isinstance(q, str):
            raise TaskError(f"{source}: record {rec.number}: field {prompt_field!r} should be text, got {type(q).__name__}")
        text = str(raw)
        ans = reference_answer(text)
        solution = text
        if ans is None:
            if parse_number(text) is None:
                raise TaskError(
                    f"{source}: record {rec.number}: field {answer_field!r} has no '#### <answer>' line and is not a number: {text[:80]!r}"
                )
            ans, solution = text.strip().replace(",", ""), ""
        if parse_number(ans) is None:
            raise TaskError(f"{source}: record {rec.number}: the answer after '####' is not a number: {ans!r}")
        ident = rec.data.get("id", f"{stem}:{rec.number}")
        cols = {k: v for k, v in rec.data.items() if k not in (prompt_field, answer_field)}
        cols["solution"] = text
        out.append(Example(id=str(ident), prompt=q, answer=ans, response=reference_response(solution, ans), columns=cols))
    return out


class GSM8KTask(ScoredTask):
    name = "gsm8k"

    def __init__(self, cfg: Config) -> None:
        t = cfg.task
        pf, af = t.prompt_field or "question", t.answer_field or "answer"
        folder = shared_data_dir() / "gsm8k"
        default = folder / "train.jsonl" if (folder / "train.jsonl").is_file() else None
        default_val = folder / "test.jsonl" if (folder / "test.jsonl").is_file() else None
        train, val, sft = file_splits(
            cfg, lambda recs, src: to_gsm8k_examples(recs, src, pf, af), default, default_val, what=f" (no default copy at {folder})"
        )
        super().__init__(train, val, t.failure_reward, sft)
        self.system_prompt = t.system_prompt if t.system_prompt is not None else MATH_SYSTEM_PROMPT
        self.format_credit = float(t.format_credit)

    def score(self, example: Example, text: str) -> tuple[float, dict[str, float]]:
        correct, boxed = numeric_match(example.answer, text)
        if correct:
            return 1.0, {"answer": 1.0, "format": float(boxed)}
        return (self.format_credit if boxed else 0.0), {"answer": 0.0, "format": float(boxed)}
