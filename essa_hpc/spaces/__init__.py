"""Search spaces: how a candidate becomes a model change (the Protocol is in ``base.py``;
docs/design.md, "Search spaces").

``make_space(cfg, loaded, svd)`` builds ``cfg.search.space``; each space lives in its own module,
imported only when chosen. ``SEEDED`` names the spaces whose candidates are seed codes (their
optimizer runs in seed-code mode, ``search.make_optimizer(..., seeded=True)``).
"""

from __future__ import annotations

from typing import Any

from essa_hpc.spaces.base import (
    SEED_CODE_WIDTH,
    BatchedPerturbation,
    RowModule,
    SequentialPerturbation,
    Space,
    SpaceError,
    SteppingOptimizer,
    state_digest,
)
from essa_hpc.spaces.vector import VectorSpace

# search.space -> module with create(cfg, loaded) -> Space, for the seeded spaces
SEEDED = {"lowrank": "essa_hpc.spaces.lowrank", "full": "essa_hpc.spaces.full", "qes": "essa_hpc.spaces.qes"}

__all__ = [
    "SEEDED",
    "SEED_CODE_WIDTH",
    "BatchedPerturbation",
    "RowModule",
    "SequentialPerturbation",
    "Space",
    "SpaceError",
    "SteppingOptimizer",
    "VectorSpace",
    "make_space",
    "state_digest",
]


def make_space(cfg: Any, loaded: Any = None, svd: Any = None, export: Any = None) -> Space:
    """The space ``cfg.search.space``: a vector space over ``svd`` (svd_lora; None with the fake
    backend, of dimension ``backend.fake_dim``), or a seeded space over the loaded model."""
    import importlib

    name = cfg.search.space
    if name in SEEDED:
        space: Space = importlib.import_module(SEEDED[name]).create(cfg, loaded)
        return space
    if name != "svd_lora":
        raise SpaceError(f"search.space: expected svd_lora or one of {tuple(SEEDED)}, got {name!r}")
    dim = svd.solution_length if svd is not None else cfg.backend.fake_dim
    return VectorSpace(name, dim, view=svd, export=export)
