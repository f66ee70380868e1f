r"""Competition math: MATH, MATH500, PRM800K-style data.

Data: task.path (required; no copy ships with the project). Fields: ``problem`` (the prompt),
``answer`` (the reference; when a row has none, the last \boxed{} of ``solution``), and ``solution``
(Example.response for SFT, when present). task.prompt_field / task.answer_field rename the first two.

Reward: 1.0 when math-verify finds the completion's answer (its last \boxed{} first) equivalent to the
reference (\frac{1}{2} = 0.5, 2x+1 = 1+2x, intervals, sets, tuples); task.format_credit for a
well-formed but wrong \boxed{}; else 0.
"""

from __future__ import annotations

from collections.abc import Sequence

from essa_hpc.config import Config
from essa_hpc.tasks.answers import last_boxed, math_equal
from essa_hpc.tasks.base import Example, TaskError
from essa_hpc.tasks.common import MATH_SYSTEM_PROMPT, ScoredTask, file_splits
from essa_hpc.tasks.data import Record, field_value


def to_math_examples(
    records: Sequence[Record], source: str, prompt_field: str = "problem", answer_field: str | None = None
) -> list[Example]:
    stem = source.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    out = []
    for rec in records:
        problem = field_value(rec, prompt_field, source)
        if not isinstance(problem, str):
            raise TaskError(f"{source}: record {rec.number}: field {prompt_field!r} should be text, got {type(problem).__name__}")
        solution = rec.data.get("solution")
        solution = solution if isinstance(solution, str) else None
        if answer_field is not None:
            answer = field_value(rec, answer_field, source)
        else:
            answer = rec.data.get("answer")
            if answer is None or str(answer).strip() == "":
                answer = last_boxed(solution) if solution else None
            if answer is None or str(answer).strip() == "":
                raise TaskError(
                    f"{source}: record {rec.number} has no 'answer' field and no \\boxed{{}} answer in 'solution' "
                    f"(fields: {sorted(rec.data)[:12]}); set task.answer_field"
                )
        ident = next((rec.data[k] for k in ("unique_id", "id", "idx") if rec.data.get(k) is not None), f"{stem}:{rec.number}")
        cols = {k: v for k, v in rec.data.items() if k not in (prompt_field, answer_field or "answer")}
        out.append(Example(id=str(ident), prompt=problem, answer=str(answer).strip(), response=solution, columns=cols))
    return out


class MathTask(ScoredTask):
    name = "math"

    def __init__(self, cfg: Config) -> None:
        t = cfg.task
        pf, af = t.prompt_field or "problem", t.answer_field
        train, val, sft = file_splits(cfg, lambda recs, src: to_math_examples(recs, src, pf, af))
        super().__init__(train, val, t.failure_reward, sft)
        self.system_prompt = t.system_prompt if t.system_prompt is not None else MATH_SYSTEM_PROMPT
        self.format_credit = float(t.format_credit)

    def score(self, example: Example, text: str) -> tuple[float, dict[str, float]]:
        boxed = bool(last_boxed(text))
        if math_equal(str(example.answer), text):
            return 1.0, {"answer": 1.0, "format": float(boxed)}
        return (self.format_credit if boxed else 0.0), {"answer": 0.0, "format": float(boxed)}
