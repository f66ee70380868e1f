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


class Handshake:
    """The ask/tell protocol every optimizer keeps: generations asked in order from :attr:`generation`,
    at most one pending, re-asking it returns the same candidates, and ``tell`` gets exactly those.

    Ranks never exchange candidates, so a ``tell`` with other rows is a bug in the caller, not data;
    the check costs one comparison of λ × d floats per generation.
    """

    def __init__(self) -> None:
        self.gen: int | None = None
        self.X: np.ndarray | None = None

    def asked(self, gen: int, generation: int) -> np.ndarray | None:
        """A copy of the pending candidates when ``gen`` is the pending generation, None when ``gen`` is
        the next one to draw; an OptimizerError for any other order."""
        if self.gen is not None and self.X is not None:
            if gen == self.gen:
                return self.X.copy()
            raise OptimizerError(
                f"ask(gen={gen}) while generation {self.gen} was asked and not told; call tell(X, fitness) for generation {self.gen} first"
            )
        if gen != generation:
            raise OptimizerError(
                f"ask(gen={gen}) but the optimizer is at generation {generation} ({generation} tell calls so far); ask is "
                "called once per generation, in order, from 0 (after a resume: from the checkpoint's generation)"
            )
        return None

    def hold(self, gen: int, X: np.ndarray) -> np.ndarray:
        """Keep ``X`` as generation ``gen``'s candidates; returns the copy ``ask`` hands out."""
        self.gen, self.X = gen, X
        return X.copy()

    def check(self, X: Any, generation: int) -> tuple[int, np.ndarray]:
        """(gen, candidates) of the pending generation, which ``X`` must equal exactly. It stays pending
        until :meth:`done`, so a ``tell`` that fails on its fitness consumes nothing."""
        if self.gen is None or self.X is None:
            raise OptimizerError(f"tell() without ask(gen={generation}) first")
        gen, pending = self.gen, self.X
        X = np.asarray(X)
        if X.shape != pending.shape:
            raise ValueError(f"tell(gen={gen}): expected candidates of shape {pending.shape}, got {X.shape}")
        if not np.array_equal(X, pending):
            rows = np.flatnonzero(np.any(pending != X, axis=1))
            raise OptimizerError(
                f"tell(gen={gen}): candidates {rows[:8].tolist()}{'...' if rows.size > 8 else ''} differ from what "
                f"ask(gen={gen}) returned; tell must get exactly ask's candidates"
            )
        return gen, pending

    def done(self) -> None:
        """The pending generation was told."""
        self.gen, self.X = None, None

    def state_dict(self) -> dict[str, Any]:
        return {"pending_gen": self.gen, "pending_X": None if self.X is None else self.X.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        X = state.get("pending_X")
        self.gen = state.get("pending_gen")
        self.X = None if X is None else np.array(X, dtype=np.float64, copy=True)

    def digest_counter(self) -> int:
        return -1 if self.gen is None else self.gen


def check_state(state: Any, fmt: str, settings: dict[str, Any]) -> None:
    """A ValueError unless ``state`` is a state_dict of format ``fmt`` written with these settings."""
    if not isinstance(state, dict) or state.get("format") != fmt:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"optimizer state: expected format {fmt!r}, got {got!r}")
    for key, value in settings.items():
        if state.get(key) != value:
            raise ValueError(f"optimizer state: {key} = {state.get(key)!r} in the checkpoint, but this run has {key} = {value!r}")


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
