"""What every backend does: turn (candidate vector, rendered prompt, seed) requests into completions.

A backend never sees rewards, ranks or the optimizer. The run loop hands it the distinct candidate
vectors this rank evaluates and a flat list of requests that index into them; a backend is free to
batch however it likes (hf: one batched generate for the whole population; vllm: one LoRA adapter per
candidate in one generate call; fake: an analytic function), but the completion of a request must not
depend on what else is in the batch (DESIGN.md invariant).
"""

from __future__ import annotations

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
