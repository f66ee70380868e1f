"""``search.space: full``: es-at-scale's full-parameter ES on every rank's own copy of the model
(Qiu et al. 2025, arXiv 2509.24372, Algorithm 1; docs/design.md, "Search spaces").

For target matrix i and noise index k of generation g:

    (F-1)  ε_k,i = noise.normal(run seed, g, k, stream = i)  reshaped to W_i's shape (full-shape noise)
    (F-2)  candidate (g, k, c):  W_i ← W_i + c ε_k,i in place, evaluate, then W_i ← master_i exactly
    (F-3)  update rows (g, k, w_k):  W_i ← W_i + Σ_k w_k ε_k,i, accumulated in float32 in row order

One candidate at a time per model instance (the hf backend groups a rank's requests by candidate and
runs each group as one batch). Restoring copies the float32 master back (one extra copy of the target
weights) instead of subtracting the noise again, which would not give back the same bits in any
precision, and in bf16 would drift. The update is applied from the seeds on every rank; no weight
is ever broadcast.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from essa_hpc import noise
from essa_hpc.spaces.base import COEF, GEN, INDEX, SEED_CODE_WIDTH, check_rows
from essa_hpc.spaces.weights import Target, TargetWeights


class FullSpace:
    """The Space, and the hf backend's SequentialPerturbation, of full-shape perturbations."""

    name = "full"
    seeded = True
    export_name = "model"
    solution_length = dim = SEED_CODE_WIDTH  # a row is a seed code (g, k, coefficient)

    def __init__(self, loaded: Any, targets: list[str], run_seed: int, base_model: str) -> None:
        self.run_seed = int(run_seed)
        w = self.weights = TargetWeights(self.name, loaded, targets, run_seed, separate=True, base_model=base_model, delta=self.delta)
        # the Space protocol's weight operations are the TargetWeights' own (composition, not a base class)
        self.apply, self.digest, self.export = w.apply, w.digest, w.export
        self.state_dict, self.load_state_dict = w.state_dict, w.load_state_dict

    def epsilon(self, t: Target, gen: int, k: int) -> torch.Tensor:
        """ε_k,i of (F-1), float32 on the CPU."""
        m, n = t.shape
        return torch.from_numpy(noise.normal(self.run_seed, gen, k, t.index, m * n)).reshape(m, n)

    def perturbation(self, t: Target, row: np.ndarray) -> torch.Tensor:
        return float(row[COEF]) * self.epsilon(t, int(row[GEN]), int(row[INDEX]))

    def delta(self, t: Target, rows: np.ndarray) -> torch.Tensor:
        """Σ_k w_k ε_k,i of (F-3), float32, summed in row order."""
        acc = torch.zeros(t.shape, dtype=torch.float32)
        for r in rows:
            acc.add_(self.epsilon(t, int(r[GEN]), int(r[INDEX])), alpha=float(r[COEF]))
        return acc

    # -- the hf backend's SequentialPerturbation -------------------------------------------------------

    def backend_view(self) -> FullSpace:
        return self

    @contextmanager
    def perturbed(self, row: np.ndarray) -> Iterator[None]:
        """(F-2): the weights of candidate ``row`` within the block, the master's exactly after it."""
        r = check_rows(row, SEED_CODE_WIDTH)[0]
        if r[COEF] == 0:
            yield
            return
        try:
            with torch.no_grad():
                for t in self.weights.targets:
                    moved = t.master + self.perturbation(t, r).to(t.master.device)
                    t.param.copy_(moved.to(t.param.dtype))
            yield
        finally:
            with torch.no_grad():
                for t in self.weights.targets:
                    t.param.copy_(t.master.to(t.param.dtype))


def create(cfg: Any, loaded: Any) -> FullSpace:
    return FullSpace(loaded, list(cfg.search.targets), cfg.run.seed, cfg.model.path)
