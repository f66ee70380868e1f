"""What every backend does: turn (candidate vector, rendered prompt, seed) requests into completions.

A backend never sees rewards, ranks or the optimizer. The run loop hands it the distinct candidate
vectors this rank evaluates and a flat list of requests that index into them; a backend is free to
batch however it likes (hf: one batched generate for the whole population; vllm: one LoRA adapter per
candidate in one generate call; fake: an analytic function), but the completion of a request must not
depend on what else is in the batch (the invariant of docs/design.md, "One generation").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Request:
    candidate: int  # row of the vectors array passed to generate()
    prompt: str  # fully rendered prompt text (chat template applied)
    seed: int  # sampling seed for this (generation, candidate, prompt); unused under greedy decoding


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int  # generated tokens (for throughput accounting)


class Backend(Protocol):
    solution_length: int

    def generate(
        self, vectors: np.ndarray, requests: Sequence[Request], max_new_tokens: int | None = None, temperature: float | None = None
    ) -> list[Completion]:
        """One completion per request, in request order. vectors: float64 [n_candidates, solution_length]."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class GenerationArgs:
    max_new_tokens: int
    temperature: float
    top_p: float
    ignore_eos: bool


def resolve_generation(
    defaults: GenerationArgs,
    requests: Sequence[Request],
    n_candidates: int,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    ignore_eos: bool | None = None,
) -> GenerationArgs:
    """A backend's defaults with a call's overrides, checked, and every request checked against them.

    Shared by the backends so that one bad value or request gets the same message whichever backend runs.
    """
    args = GenerationArgs(
        defaults.max_new_tokens if max_new_tokens is None else int(max_new_tokens),
        defaults.temperature if temperature is None else float(temperature),
        defaults.top_p if top_p is None else float(top_p),
        defaults.ignore_eos if ignore_eos is None else bool(ignore_eos),
    )
    if args.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected >= 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not math.isfinite(args.temperature):
        raise ValueError(f"temperature: expected >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"top_p: expected 0 < top_p <= 1, got {args.top_p}")
    for i, r in enumerate(requests):
        if not 0 <= int(r.candidate) < n_candidates:
            raise ValueError(f"request {i}: candidate {r.candidate} out of range; {n_candidates} candidate vectors were given")
        if int(r.seed) < 0:
            raise ValueError(f"request {i}: seed {r.seed} is negative; sampling seeds are integers >= 0")
    return args
