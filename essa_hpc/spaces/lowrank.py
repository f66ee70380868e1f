"""``search.space: lowrank``: EGGROLL-style low-rank perturbations of the base weights, a rank's whole
population in one batched generate (docs/design.md, "Search spaces").

For target matrix i (W_i: m×n, y = x W_iᵀ) and noise index k of generation g (EGGROLL, arXiv
2511.16652, §3):

    (LR-1)  [vec A_k,i ; vec B_k,i] = noise.normal(run seed, g, k, stream = i)   A: m×r, B: n×r
    (LR-2)  E_k,i = A_k,i B_k,iᵀ / √r
    (LR-3)  candidate (g, k, c):  y = x (W_i + c E_k,i)ᵀ = x W_iᵀ + (c/√r) (x B_k,i) A_k,iᵀ
    (LR-4)  update rows (g, k, w_k):  W_i ← W_i + Σ_k w_k E_k,i = W_i + (A_cat diag(w) B_catᵀ) / √r

(LR-3) is what the batched forward computes: the population shares the base weights and each batch
row adds its own rank-r term. With C candidates on a rank, ``LowRankLinear`` holds the stacks
Bt[c] = B_cᵀ (C × r × n) and A[c] = (c_c/√r) A_cᵀ (C × r × m); in each forward it gathers every batch
row's factors and adds (x Bt[row]ᵀ) A[row] (at r = 1 a vecdot and an addcmul, else two bmm): cost
(n + m)·r per token next to the base n·m, whatever the number of candidates, and a row's term is
computed from its own factors alone (no other candidate's columns enter its reductions). The gathered
factors live only during one layer's forward. The update (LR-4) is full-rank, formed in float32 and
added to every rank's weights.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from essa_hpc import noise
from essa_hpc.spaces.base import COEF, GEN, INDEX, SEED_CODE_WIDTH, RowModule, SpaceError, check_rows
from essa_hpc.spaces.weights import Target, TargetWeights


class LowRankLinear(nn.Module):
    """``base(x) + bmm(bmm(x, B[row]), A[row])``: a batch row's own rank-r term (module doc, LR-3)."""

    def __init__(self, base: nn.Module, name: str, rank: int) -> None:
        super().__init__()
        self.base, self.name, self.rank = base, name, rank
        self.B: torch.Tensor | None = None  # [C, r, n]: B_cᵀ
        self.A: torch.Tensor | None = None  # [C, r, m], coefficient/√r folded in
        self.rows: torch.Tensor | None = None  # [batch rows]: the candidate of each

    def select(self, table: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor) -> None:
        self.B, self.A = table
        self.rows = rows

    def clear(self) -> None:
        self.B = self.A = self.rows = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.B is None or self.A is None or self.rows is None:
            return y
        if x.dim() != 3 or x.shape[0] != self.rows.shape[0]:
            raise RuntimeError(f"{self.name}: input {tuple(x.shape)} does not match the {self.rows.shape[0]} rows selected")
        Bt, A = self.B.index_select(0, self.rows), self.A.index_select(0, self.rows)  # [rows, r, n], [rows, r, m]
        x = x.to(Bt.dtype)
        if y.dtype != Bt.dtype:  # tables in another dtype than the layer's output (tables() takes the model's)
            return y.add_(torch.bmm(torch.bmm(x, Bt.mT), A).to(y.dtype))
        if self.rank == 1:
            # a dot product and an outer product per row: on the CPU a bmm with one output column is several
            # times slower than the same reduction as a vecdot, and one with inner dimension 1 than an addcmul
            return y.addcmul_(torch.linalg.vecdot(x, Bt).unsqueeze(-1), A)
        return y.baddbmm_(torch.bmm(x, Bt.mT), A)  # y + (x Btᵀ) A in place


class LowRankSpace:
    """The Space, and the hf backend's BatchedPerturbation, of rank-``rank`` perturbations."""

    name = "lowrank"
    seeded = True
    export_name = "model"
    solution_length = dim = SEED_CODE_WIDTH  # a row is a seed code (g, k, coefficient)

    def __init__(self, loaded: Any, targets: list[str], rank: int, run_seed: int, base_model: str) -> None:
        self.rank, self.run_seed = int(rank), int(run_seed)
        self._wrapped: list[tuple[str, nn.Module, LowRankLinear]] = []  # (path, original, wrapper) while wrapped
        w = self.weights = TargetWeights(
            self.name, loaded, targets, run_seed, separate=False, base_model=base_model, delta=self.delta, wrapped=self.wrapped_names
        )
        # the Space protocol's weight operations are the TargetWeights' own (composition, not a base class)
        self.apply, self.digest, self.export = w.apply, w.digest, w.export
        self.state_dict, self.load_state_dict = w.state_dict, w.load_state_dict
        for t in self.weights.targets:
            m, n = t.shape
            if self.rank > min(m, n):
                raise SpaceError(f"search.rank={self.rank} exceeds the dimensions {m}×{n} of {t.name}")

    # -- the noise --------------------------------------------------------------------------------------

    def factors(self, t: Target, gen: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_k,i [m, r], B_k,i [n, r]) of (LR-1), float32 on the CPU."""
        m, n = t.shape
        v = torch.from_numpy(noise.normal(self.run_seed, gen, k, t.index, (m + n) * self.rank))
        return v[: m * self.rank].reshape(m, self.rank), v[m * self.rank :].reshape(n, self.rank)

    def _factors_of_rows(self, t: Target, rows: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`factors` of every row, each (generation, noise index) drawn once: an antithetic pair
        shares its draw (only its coefficient's sign differs), so the pair costs one generator run."""
        drawn: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        out = []
        for r in rows:
            key = (int(r[GEN]), int(r[INDEX]))
            if key not in drawn:
                drawn[key] = self.factors(t, *key)
            out.append(drawn[key])
        return out

    def perturbation(self, t: Target, row: np.ndarray) -> torch.Tensor:
        """c E_k,i of (LR-2) for one row, float32 [m, n] (tests, one-at-a-time evaluation)."""
        A, B = self.factors(t, int(row[GEN]), int(row[INDEX]))
        return (float(row[COEF]) / math.sqrt(self.rank)) * (A @ B.T)

    def delta(self, t: Target, rows: np.ndarray) -> torch.Tensor:
        """Σ_k w_k E_k,i of (LR-4), float32 [m, n]: one product with inner dimension (rows·r)."""
        pairs = self._factors_of_rows(t, rows)
        if not pairs:
            return torch.zeros(t.shape, dtype=torch.float32)
        w = torch.tensor(np.repeat(rows[:, COEF], self.rank), dtype=torch.float32)
        A = torch.cat([a for a, _ in pairs], dim=1) * w  # [m, rows·r]
        B = torch.cat([b for _, b in pairs], dim=1)  # [n, rows·r]
        return (A @ B.T) / math.sqrt(self.rank)

    # -- the hf backend's BatchedPerturbation ----------------------------------------------------------------

    def backend_view(self) -> LowRankSpace:
        return self

    def wrap(self, model: Any, dtype: Any, device: Any) -> list[tuple[str, RowModule]]:
        out: list[tuple[str, RowModule]] = []
        for t in self.weights.targets:
            parent_path, _, leaf = t.name.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            w = LowRankLinear(t.module, t.name, self.rank)
            setattr(parent, leaf, w)
            self._wrapped.append((t.name, t.module, w))
            out.append((t.name, w))
        return out

    def wrapped_names(self) -> list[str]:
        """The layers ``wrap`` replaced (export writes their weights under the original names)."""
        return [n for n, _, _ in self._wrapped]

    def unwrap(self, model: Any) -> None:
        for name, module, _ in reversed(self._wrapped):
            parent_path, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, leaf, module)
        self._wrapped.clear()

    def tables(self, X: np.ndarray, dtype: Any, device: Any) -> list[Any]:
        """Per target the stacks (Bᵀ [C, r, n], A [C, r, m]) for population rows X (module doc); [] when
        no row perturbs anything (validation of the current weights), so the wrappers stay plain layers."""
        rows = check_rows(X, SEED_CODE_WIDTH)
        if not np.any(rows[:, COEF]):
            return []
        out = []
        for t in self.weights.targets:
            Bs, As = [], []
            for r, (A, B) in zip(rows, self._factors_of_rows(t, rows), strict=True):
                Bs.append(B.T)
                As.append((float(r[COEF]) / math.sqrt(self.rank)) * A.T)
            out.append((torch.stack(Bs).to(device, dtype), torch.stack(As).to(device, dtype)))
        return out


def create(cfg: Any, loaded: Any) -> LowRankSpace:
    s = cfg.search
    return LowRankSpace(loaded, list(s.targets), s.rank, cfg.run.seed, cfg.model.path)
