"""``make_optimizer``: the one place that maps ``search.optimizer`` to an optimizer class.

It sits above ``base`` (the interface and shared helpers) and every optimizer module, so each
optimizer imports only ``base`` and a new one (full-parameter ES, QES) is one more import and one more
branch here, never an import back into ``base``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from essa_hpc.search.base import Optimizer
from essa_hpc.search.cma_es import CMAES
from essa_hpc.search.es import ES

if TYPE_CHECKING:
    from essa_hpc.config import SearchSection

OPTIMIZERS = ("cma", "es")


def make_optimizer(cfg: SearchSection, dim: int, seed: int, seeded: bool = False) -> Optimizer:
    """The optimizer ``cfg.optimizer`` for solution length ``dim``, seeded with ``seed`` (run.seed).

    ``seeded``: the space's rows are seed codes (docs/design.md, "Search spaces"), which only an
    optimizer that can express its update as seed codes (es) drives.
    """
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"search.optimizer: expected one of {OPTIMIZERS}, got {cfg.optimizer!r}")
    if cfg.optimizer == "es":
        return ES(
            dim=dim,
            popsize=cfg.popsize,
            sigma0=cfg.sigma0,
            learning_rate=cfg.learning_rate,
            seed=seed,
            antithetic=cfg.antithetic,
            fitness_shaping=cfg.fitness_shaping,
            lr_decay=cfg.lr_decay,
            sigma_decay=cfg.sigma_decay,
            seeded=seeded,
        )
    if seeded:
        raise ValueError(f"search.optimizer={cfg.optimizer} cannot drive the seeded search.space={cfg.space}; use search.optimizer=es")
    return CMAES(
        dim=dim,
        popsize=cfg.popsize,
        sigma0=cfg.sigma0,
        seed=seed,
        diagonal=cfg.diagonal,
        fitness_shaping=cfg.fitness_shaping,
        cmean=cfg.cmean,
        mirrors=cfg.mirrors,
        active=cfg.active,
        step_size=cfg.step_size,
    )
