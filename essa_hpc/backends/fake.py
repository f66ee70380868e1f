"""A model-free backend: the "completion" of a request is the analytic reward of its candidate.

Used by tests, by the scaling benchmark and by the analysis tests, so that the distributed engine,
the log and the launchers run for real without a model. The reward is −f(x − shift) for the shifted
sphere or Rosenbrock, plus Gaussian noise seeded per (generation, candidate, sample) through the
request's seed, so results never depend on which rank evaluated what. ``fake_sleep_s`` per sample
emulates generation time. The completion text is ``repr(float)``; task ``fake`` reads it back.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from essa_hpc.backends.base import Completion, Request
from essa_hpc.config import BackendSection

SHIFT = 0.5


def objective(name: str, x: np.ndarray) -> float:
    """f(x) ≥ 0 with minimum 0: sphere at x = SHIFT, Rosenbrock at x = 1."""
    if name == "sphere":
        return float(np.sum((x - SHIFT) ** 2))
    if name == "rosenbrock":
        return float(np.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2))
    raise ValueError(f"backend.fake_function: expected sphere or rosenbrock, got {name!r}")


class FakeBackend:
    def __init__(self, section: BackendSection) -> None:
        self.function = section.fake_function
        self.solution_length = section.fake_dim
        self.noise = section.fake_noise
        self.sleep_s = section.fake_sleep_s
        objective(self.function, np.zeros(self.solution_length))  # fail early on a bad name

    def generate(
        self, vectors: np.ndarray, requests: Sequence[Request], max_new_tokens: int | None = None, temperature: float | None = None
    ) -> list[Completion]:
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
        if vectors.shape[1] != self.solution_length:
            raise ValueError(f"fake backend: candidate vectors have length {vectors.shape[1]}, expected {self.solution_length}")
        values = [-objective(self.function, v) for v in vectors]
        out = []
        for req in requests:
            r = values[req.candidate]
            if self.noise > 0:
                r += self.noise * float(np.random.default_rng(req.seed).standard_normal())
            out.append(Completion(text=repr(r), tokens=1))
        if self.sleep_s > 0:
            time.sleep(self.sleep_s * len(requests))
        return out

    def close(self) -> None:
        pass


def create(cfg: Any, loaded: Any = None, svd: Any = None) -> FakeBackend:
    """make_backend entry point: the fake backend needs neither a model nor an SVD-LoRA."""
    return FakeBackend(cfg.backend)
