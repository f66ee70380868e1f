"""Search strategies behind one small interface (docs/design.md, "One generation").

``make_optimizer(cfg.search, dim, seed)`` builds the optimizer; every rank builds the same one from
the same seed and drives it with ``ask(g)`` / ``tell(X, -rewards)``; ``digest()`` compares states
across ranks and ``state_dict()`` / ``load_state_dict()`` checkpoint it.
"""

from essa_hpc.search.base import FITNESS_SHAPINGS, Optimizer, OptimizerError, centered_ranks, check_fitness, shape_fitness
from essa_hpc.search.cma_es import BLAS_PINNING, CMAES
from essa_hpc.search.es import ES
from essa_hpc.search.factory import OPTIMIZERS, make_optimizer

__all__ = [
    "BLAS_PINNING",
    "CMAES",
    "ES",
    "FITNESS_SHAPINGS",
    "OPTIMIZERS",
    "Optimizer",
    "OptimizerError",
    "centered_ranks",
    "check_fitness",
    "make_optimizer",
    "shape_fitness",
]
