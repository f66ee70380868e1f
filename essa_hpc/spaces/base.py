"""The search-space seam: how an optimizer's candidate becomes a model change (docs/design.md, "Search spaces").

The optimizer decides candidates and updates; the space decides what they mean for the model. The run
loop talks to a space through ``Space`` alone, so a new space is a module here and one entry in
``essa_hpc.spaces.make_space``, never a branch in ``run.py``.

Two kinds of space, told apart by ``Space.seeded``:

* **vector spaces** (``svd_lora``, and the fake backend's analytic space): a candidate row *is* the
  point (the search vector x); the optimizer owns the mean, and ``apply`` has nothing to do.
* **seeded spaces** (``lowrank``, ``full``; QES builds on the same contract): the point is the model's
  own weights, far too large to send or even to hold λ times. A candidate row is a *seed code* of
  ``SEED_CODE_WIDTH`` floats ``(generation, noise index, coefficient)``: the candidate is
  ``θ + coefficient · E(run seed, generation, noise index)``, where the space alone knows how to draw
  the perturbation E from its counter-based generator. An update is a list of such rows too: after
  ``tell``, ``apply(opt)`` adds ``Σ_j coefficient_j · E_j`` (``opt.step()``) to the weights on every rank.
  The all-zero row is the current weights themselves (the optimizer's ``mean`` in this coding), so the
  loop validates and logs it like any vector. Only (seed, reward) records ever cross the network.

How the hf backend evaluates a space's candidates (``backend_view()`` is what ``make_backend`` gets):

* ``svd_lora``: the ``SvdLora`` itself (the backend's own per-row σ tables, as before);
* ``BatchedPerturbation``: the space installs wrapper modules (``wrap``) whose extra term differs per
  batch row, and builds per-candidate tables for a population (``tables``); a rank's whole population
  runs in one batched generate (lowrank);
* ``SequentialPerturbation``: the space perturbs the weights in place for one candidate at a time and
  restores them exactly afterwards (``perturbed``); the backend groups requests by candidate (full).

Checkpoints hold ``state_dict()`` next to the optimizer's; export writes ``export_name`` under the run
directory. This module is pure typing (no torch), so config-free callers can import it cheaply.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

SEED_CODE_WIDTH = 3  # a seeded candidate row: (generation, noise index, coefficient)
GEN, INDEX, COEF = 0, 1, 2  # its columns


class SpaceError(ValueError):
    """A search space that cannot be built for this model and config; the message names the key."""


@runtime_checkable
class SteppingOptimizer(Protocol):
    """What a seeded space needs from an optimizer beyond ``search.Optimizer``: the last update as seed codes."""

    def step(self) -> np.ndarray:
        """float64 [n, SEED_CODE_WIDTH]: the update ``Σ_j coefficient_j · E_j`` of the last ``tell``."""
        ...


@runtime_checkable
class Space(Protocol):
    """What the run loop, the backends, checkpoints and export need from a search space."""

    name: str  # search.space
    seeded: bool  # False: rows are points (the optimizer holds the mean); True: rows are seed codes
    export_name: str  # the folder export writes under the run directory ("adapter", "model")

    @property
    def dim(self) -> int:
        """Length of a candidate row: the optimizer's ``dim`` and the backend's ``solution_length``."""
        ...

    def backend_view(self) -> Any:
        """What ``backends.make_backend`` receives: an ``SvdLora``, a ``BatchedPerturbation``, a
        ``SequentialPerturbation`` or None (fake backend)."""
        ...

    def apply(self, opt: Any) -> None:
        """After ``opt.tell``: move the model to the optimizer's new point (vector spaces: nothing)."""
        ...

    def digest(self) -> str:
        """sha256 hex of the space's own state (the weights as moved so far); '' when the optimizer's
        digest covers everything (vector spaces). Costs a pass over the weights: the loop calls it every
        ``search.digest_every`` generations only."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Plain picklable data for the checkpoint, from which ``load_state_dict`` restores the space
        bit for bit on a freshly built one."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def export(self, x: np.ndarray, out: Path) -> None:
        """Write the model at optimizer point ``x`` (a row; seeded spaces: the zero row) as folder ``out``."""
        ...


class RowModule(Protocol):
    """A wrapper installed by a ``BatchedPerturbation``: its extra term differs per batch row."""

    def select(self, table: Any, rows: Any) -> None:
        """Batch row i runs candidate ``rows[i]`` (a LongTensor on the model's device) of ``table``."""
        ...

    def clear(self) -> None:
        """No candidate: exactly the wrapped base layer."""
        ...


@runtime_checkable
class BatchedPerturbation(Protocol):
    """A space whose candidates share the base weights and differ by a per-row term (one batched generate)."""

    solution_length: int

    def wrap(self, model: Any, dtype: Any, device: Any) -> list[tuple[str, RowModule]]:
        """Install wrappers around the target modules; returns (module path, wrapper) in order."""
        ...

    def unwrap(self, model: Any) -> None:
        """Put the original modules back."""
        ...

    def tables(self, X: np.ndarray, dtype: Any, device: Any) -> list[Any]:
        """Per wrapper (in ``wrap``'s order), the per-candidate data of population rows X."""
        ...


@runtime_checkable
class SequentialPerturbation(Protocol):
    """A space that perturbs the weights in place, one candidate at a time per model instance."""

    solution_length: int

    def perturbed(self, row: np.ndarray) -> AbstractContextManager[None]:
        """Within the block the model runs candidate ``row``; on exit the weights are exactly restored."""
        ...


def state_digest(opt_digest: str, space: Space, with_space: bool) -> str:
    """The digest the ranks compare: the optimizer's, combined with the space's own state on the
    generations that check it. A vector space adds nothing, so its digests are the optimizer's alone
    (the logs of svd_lora runs are unchanged)."""
    extra = space.digest() if with_space else ""
    if not extra:
        return opt_digest
    return hashlib.sha256(f"{opt_digest}:{extra}".encode()).hexdigest()


def check_rows(X: Any, width: int) -> np.ndarray:
    """Population rows as float64 [n, width], or a ValueError saying what was expected."""
    A = np.atleast_2d(np.asarray(X, dtype=np.float64))
    if A.ndim != 2 or A.shape[1] != width:
        raise ValueError(f"candidate rows have shape {tuple(np.shape(X))}; expected [n_candidates, {width}] seed codes")
    return A


def distinct(rows: Sequence[int]) -> list[int]:
    """The distinct values in first-seen order (candidates of a request list)."""
    return list(dict.fromkeys(int(r) for r in rows))
