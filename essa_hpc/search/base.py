"""The optimizer interface the run loop talks to, and the helpers every optimizer shares.

ESSA's distribution scheme (docs/design.md, "One generation") needs exactly this from an optimizer: every
rank builds the same optimizer from the same seed, calls ``ask(g)`` and gets the same candidates
without any communication, evaluates its share, and after the one Allgather calls ``tell`` with the
same fitness vector, so the states stay bit-identical. ``digest()`` lets the ranks check that they
did, and ``state_dict()`` / ``load_state_dict()`` make checkpoints resume bit-identically.

Conventions: candidates are float64 arrays of shape ``[popsize, dim]``; fitness is *minimized*
(the run loop passes ``fitness = -reward``); generation numbers start at 0 and ``ask(g)`` may only be
called for ``g == generation`` (the number of completed ``tell`` calls).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

FITNESS_SHAPINGS = ("none", "centered_ranks", "zscore")


class OptimizerError(RuntimeError):
    """The optimizer was driven out of order (wrong generation, tell without ask, altered candidates)."""


@runtime_checkable
class Optimizer(Protocol):
    """What the run loop needs from a search strategy; every method is deterministic given the seed."""

    @property
    def dim(self) -> int:
        """Solution length d."""
        ...

    @property
    def popsize(self) -> int:
        """Population size λ: rows of every ``ask``."""
        ...

    @property
    def generation(self) -> int:
        """Completed generations (number of ``tell`` calls); the next ``ask`` must be for this number."""
        ...

    @property
    def sigma(self) -> float:
        """The overall step size σ (logged as /gen/sigma)."""
        ...

    @property
    def mean(self) -> np.ndarray:
        """A copy of the distribution mean m, float64 [d] (offsets from the SFT point)."""
        ...

    def ask(self, gen: int) -> np.ndarray:
        """Candidates of generation ``gen``, float64 [λ, d]; the same array again until ``tell``."""
        ...

    def tell(self, X: np.ndarray, fitness: np.ndarray) -> None:
        """Update from the candidates ``X`` returned by ``ask`` and their fitness (minimized), float [λ]."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Picklable plain data (incl. RNG state) from which ``load_state_dict`` resumes bit-identically."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict`` taken from an optimizer built with the same settings."""
        ...

    def digest(self) -> str:
        """sha256 hex of the full optimizer state; equal on every rank that did the same work."""
        ...


def check_fitness(fitness: Any, popsize: int, gen: int) -> np.ndarray:
    """``fitness`` as a float64 [popsize] array, or a ValueError naming every non-finite candidate.

    A NaN would otherwise be replaced silently by the median inside pycma, and ±inf would distort
    nothing visible but the logs; both mean a reward function failed, which the run loop is expected to
    map to ``task.failure_reward`` before ``tell``.
    """
    f = np.asarray(fitness, dtype=np.float64)
    if f.shape != (popsize,):
        raise ValueError(f"tell(gen={gen}): expected fitness of shape ({popsize},) (one value per candidate), got {f.shape}")
    bad = np.flatnonzero(~np.isfinite(f))
    if bad.size:
        shown = ", ".join(f"candidate {i}: {float(f[i])!r}" for i in bad[:8])
        more = f" and {bad.size - 8} more" if bad.size > 8 else ""
        raise ValueError(
            f"tell(gen={gen}): non-finite fitness for {bad.size} of {popsize} candidates ({shown}{more}); "
            "every candidate needs a finite fitness (map failed rewards to task.failure_reward before tell)"
        )
    return f


def centered_ranks(fitness: np.ndarray) -> np.ndarray:
    """Centered ranks in [-0.5, 0.5] as in OpenAI-ES (Salimans et al. 2017): lowest fitness -> -0.5.

    Tied values get the average of their ranks, so the transform is strictly monotone on distinct
    values and keeps ties tied; the result does not depend on any sort algorithm's tie order.
    """
    f = np.asarray(fitness, dtype=np.float64)
    n = f.size
    if n < 2:
        return np.zeros(n)
    ranks = np.empty(n)
    ranks[np.argsort(f, kind="stable")] = np.arange(n, dtype=np.float64)
    _, inverse, counts = np.unique(f, return_inverse=True, return_counts=True)
    ranks = (np.bincount(inverse, weights=ranks) / counts)[inverse]
    return ranks / (n - 1) - 0.5


def zscore(fitness: np.ndarray) -> np.ndarray:
    """(f − mean f) / std f, es-at-scale's reward normalization; all zeros when every value is equal
    (no signal, so no step), never a division by zero."""
    f = np.asarray(fitness, dtype=np.float64)
    sd = float(f.std())
    return np.zeros_like(f) if sd == 0.0 or not np.isfinite(sd) else (f - f.mean()) / sd


def shape_fitness(fitness: np.ndarray, mode: str) -> np.ndarray:
    """Apply ``search.fitness_shaping`` (``none``, ``centered_ranks`` or ``zscore``) to a checked fitness vector."""
    if mode == "none":
        return fitness
    if mode == "centered_ranks":
        return centered_ranks(fitness)
    if mode == "zscore":
        return zscore(fitness)
    raise ValueError(f"search.fitness_shaping: expected one of {FITNESS_SHAPINGS}, got {mode!r}")
