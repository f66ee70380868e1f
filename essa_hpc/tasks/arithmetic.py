r"""The embedded default task: generated arithmetic, no files.

Questions "What is 47 + 38?" are drawn from run.seed with task.digits digits per operand (1 digit:
0-9; d digits: 10^(d-1) .. 10^d - 1) and an operation from task.operations, each operation equally
likely. Subtraction keeps the larger operand first (no negative answers). All questions are distinct;
the first eval.size form the validation split, the next TRAIN_SIZE the training split, so the two are
disjoint. When fewer distinct questions exist (1 digit, one operation), at most a fifth of them
validate and the rest train.

Reference responses (for SFT): "47 + 38 = 85. The answer is \boxed{85}."

Reward: 1.0 when the last \boxed{} holds the right number; task.format_credit when the last
\boxed{} is well formed (closed, non-empty) but wrong; 0 otherwise. There is no fallback to the
last number in the text: the answer must be boxed for credit (the format the search should learn).
"""

from __future__ import annotations

import numpy as np

from essa_hpc.config import Config
from essa_hpc.tasks.answers import last_boxed, numbers_equal, parse_number
from essa_hpc.tasks.base import Example, TaskError
from essa_hpc.tasks.common import MATH_SYSTEM_PROMPT, ScoredTask

TRAIN_SIZE = 2000
ENUMERATE_BELOW = 200_000
ARITH_SALT = 0xA817


def _range(digits: int) -> tuple[int, int]:
    return (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1


def _space(digits: int, op: str) -> int:
    lo, hi = _range(digits)
    n = hi - lo + 1
    return n * (n + 1) // 2 if op == "-" else n * n


def _result(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def generate(
    seed: int, digits: int, operations: list[str], n_train: int, n_val: int
) -> tuple[list[tuple[int, str, int]], list[tuple[int, str, int]]]:
    """(train, validation) lists of distinct (a, op, b), deterministic in all arguments."""
    ops = sorted(set(operations), key="+-*".index)
    if not ops or any(o not in "+-*" for o in ops):
        raise TaskError(f"task.operations: expected a non-empty list from +, -, *, got {operations}")
    rng = np.random.default_rng([int(seed), ARITH_SALT, digits])
    lo, hi = _range(digits)
    space = sum(_space(digits, o) for o in ops)
    if space < n_train + n_val:
        n_val = min(n_val, max(1, space // 5))
        n_train = space - n_val
        if n_train < 1:
            raise TaskError(
                f"task.digits={digits} with operations {ops} gives only {space} distinct questions; use more digits or operations"
            )
    need = n_train + n_val
    if space <= ENUMERATE_BELOW:
        allq = [(a, o, b) for o in ops for a in range(lo, hi + 1) for b in range(lo, hi + 1) if o != "-" or a >= b]
        order = rng.permutation(len(allq))[:need]
        picked = [allq[i] for i in order]
    else:
        seen: set[tuple[int, str, int]] = set()
        picked = []
        while len(picked) < need:
            o = ops[int(rng.integers(len(ops)))]
            a, b = (int(x) for x in rng.integers(lo, hi + 1, size=2))
            if o == "-" and a < b:
                a, b = b, a
            q = (a, o, b)
            if q not in seen:
                seen.add(q)
                picked.append(q)
    return picked[n_val:], picked[:n_val]


def make_example(a: int, op: str, b: int) -> Example:
    r = _result(a, op, b)
    return Example(
        id=f"{a}{op}{b}", prompt=f"What is {a} {op} {b}?", answer=r, response=f"{a} {op} {b} = {r}. The answer is \\boxed{{{r}}}."
    )


class ArithmeticTask(ScoredTask):
    name = "arithmetic"

    def __init__(self, cfg: Config, train_size: int = TRAIN_SIZE) -> None:
        t = cfg.task
        tr, va = generate(cfg.run.seed, t.digits, list(t.operations), train_size, cfg.eval.size)
        train = [make_example(*q) for q in tr]
        val = [make_example(*q) for q in va]
        if cfg.eval.split.lower() == "train":
            val = train[: cfg.eval.size]
        super().__init__(train, val, t.failure_reward)
        self.system_prompt = t.system_prompt if t.system_prompt is not None else MATH_SYSTEM_PROMPT
        self.format_credit = float(t.format_credit)

    def score(self, example: Example, text: str) -> tuple[float, dict[str, float]]:
        boxed = last_boxed(text)
        if boxed is None or not boxed:
            return 0.0, {"answer": 0.0, "format": 0.0}
        v = parse_number(boxed)
        if v is not None and numbers_equal(v, float(example.answer)):
            return 1.0, {"answer": 1.0, "format": 1.0}
        return self.format_credit, {"answer": 0.0, "format": 1.0}
