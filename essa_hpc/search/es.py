"""OpenAI-ES / NES with antithetic pairs: the optimizer of the full-parameter and low-rank spaces.

The estimator (Salimans et al. 2017, "Evolution Strategies as a Scalable Alternative to Reinforcement
Learning", Algorithm 1; Wierstra et al. 2014, NES, eq. (3) with a fixed isotropic search distribution)
is the search gradient of E[F(θ + σε)], ε ~ N(0, I):

    (ES-1)  θ_i^c = θ + s_c σ_g ε_{k_c}                    candidate c of generation g
    (ES-2)  ∇̂ = 1/(n σ_g) Σ_c u_c s_c ε_{k_c}              n = λ candidates, u_c the shaped reward
    (ES-3)  θ ← θ + α_g ∇̂ = θ + Σ_k w_k ε_k,   w_k = α_g/(n σ_g) Σ_{c: k_c = k} s_c u_c
    (ES-4)  α_g = α_0 · lr_decay^g,   σ_g = σ_0 · sigma_decay^g

With antithetic (mirrored) sampling candidates 2k and 2k+1 share ε_k with signs s = +1, −1
(Salimans et al. §2.2; Brockhoff et al. 2010), so w_k = α/(nσ) (u_{2k} − u_{2k+1}) and equal rewards of
a pair cancel exactly. es-at-scale (Qiu et al. 2025, arXiv 2509.24372) runs this with z-scored rewards
(``fitness_shaping: zscore``) and folds 1/σ into α; OpenAI-ES uses centered ranks.

Two codings (docs/design.md, "Search spaces"):

* explicit (``seeded=False``, for a vector space such as svd_lora): θ is this optimizer's ``mean``
  (d floats), ε_k are drawn here from ``noise.normal(run seed, g, k, OPTIMIZER_STREAM)``, and ``ask``
  returns the candidates of (ES-1) themselves;
* seed codes (``seeded=True``, for lowrank and full): θ is the model's weights, held by the space;
  ``ask`` returns rows (g, k_c, s_c σ_g), ``step()`` the rows (g, k, w_k) of (ES-3), and the space
  draws ε itself. ``mean`` is then the zero row: no perturbation of the current weights.

The state is tiny: the generation, the mean (explicit coding) and the pending population; all noise
is a function of (run seed, generation, index), so there is no generator state to carry.
"""

from __future__ import annotations

import hashlib
import json
import operator
from typing import Any, Final

import numpy as np

from essa_hpc import noise
from essa_hpc.search.base import FITNESS_SHAPINGS, Handshake, check_fitness, check_state, shape_fitness

STATE_FORMAT = "essa-es-1"
SEED_CODE_WIDTH = 3  # (generation, noise index, coefficient): essa_hpc/spaces/base.py's row layout


class ES:
    """OpenAI-ES over an explicit vector (``seeded=False``) or over seed codes (``seeded=True``)."""

    name = "es"

    def __init__(
        self,
        dim: int,
        popsize: int,
        sigma0: float,
        learning_rate: float,
        seed: int,
        *,
        antithetic: bool = True,
        fitness_shaping: str = "centered_ranks",
        lr_decay: float = 1.0,
        sigma_decay: float = 1.0,
        seeded: bool = False,
    ) -> None:
        if fitness_shaping not in FITNESS_SHAPINGS:
            raise ValueError(f"search.fitness_shaping: expected one of {FITNESS_SHAPINGS}, got {fitness_shaping!r}")
        if popsize < 2 or (antithetic and popsize % 2):
            raise ValueError(f"search.popsize: es needs >= 2 candidates, an even number with antithetic pairs; got {popsize}")
        if not (sigma0 > 0 and learning_rate > 0 and 0 < lr_decay <= 1 and 0 < sigma_decay <= 1):
            raise ValueError("es: expected sigma0 > 0, learning_rate > 0, 0 < lr_decay <= 1 and 0 < sigma_decay <= 1")
        if seeded and dim != SEED_CODE_WIDTH:
            raise ValueError(f"es: seed-code rows have {SEED_CODE_WIDTH} columns, got dim={dim}")
        self.dim: Final[int] = int(dim)  # the Optimizer protocol's read-only d and λ
        self.popsize: Final[int] = int(popsize)
        self._seed = int(seed)
        self._sigma0, self._lr0 = float(sigma0), float(learning_rate)
        self._lr_decay, self._sigma_decay = float(lr_decay), float(sigma_decay)
        self._antithetic, self._shaping, self._seeded = bool(antithetic), fitness_shaping, bool(seeded)
        self._mean = np.zeros(self.dim, dtype=np.float64)
        self._generation = 0
        self._asked = Handshake()
        self._step = np.zeros((0, SEED_CODE_WIDTH), dtype=np.float64)

    # -- the Optimizer protocol's properties -----------------------------------------------------------

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def sigma(self) -> float:
        """σ of the next generation (ES-4)."""
        return self.sigma_at(self._generation)

    @property
    def mean(self) -> np.ndarray:
        """θ (explicit coding) or the zero row, i.e. the current weights (seed codes)."""
        return self._mean.copy()

    def sigma_at(self, gen: int) -> float:
        return self._sigma0 * self._sigma_decay**gen

    def lr_at(self, gen: int) -> float:
        return self._lr0 * self._lr_decay**gen

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(noise index k_c, sign s_c) of every candidate c: mirrored pairs (2k, 2k+1) or one draw each."""
        c = np.arange(self.popsize)
        if self._antithetic:
            return c // 2, np.where(c % 2 == 0, 1.0, -1.0)
        return c, np.ones(self.popsize)

    def epsilon(self, gen: int, k: int) -> np.ndarray:
        """ε_k of generation ``gen`` in the explicit coding, float64 [d]."""
        return noise.normal(self._seed, gen, int(k), noise.OPTIMIZER_STREAM, self.dim, dtype=np.float64)

    # -- ask / tell ------------------------------------------------------------------------------------

    def ask(self, gen: int) -> np.ndarray:
        """The candidates of (ES-1) for generation ``gen`` (== :attr:`generation`), float64 [λ, d]."""
        gen = operator.index(gen)
        again = self._asked.asked(gen, self._generation)
        if again is not None:
            return again
        k, s = self.pairs()
        sigma = self.sigma_at(gen)
        if self._seeded:
            X = np.stack([np.full(self.popsize, float(gen)), k.astype(np.float64), s * sigma], axis=1)
        else:
            eps = {int(j): self.epsilon(gen, int(j)) for j in np.unique(k)}
            X = np.stack([self._mean + sc * sigma * eps[int(kc)] for kc, sc in zip(k, s)])
        return self._asked.hold(gen, X)

    def tell(self, X: np.ndarray, fitness: np.ndarray) -> None:
        """(ES-2)-(ES-3) from the fitness (minimized: the run passes −reward) of ``ask``'s candidates."""
        gen, _ = self._asked.check(X, self._generation)
        f = check_fitness(fitness, self.popsize, gen)
        u = np.asarray(shape_fitness(-f, self._shaping), dtype=np.float64)  # utilities: higher reward, higher u
        k, s = self.pairs()
        scale = self.lr_at(gen) / (self.popsize * self.sigma_at(gen))
        ks = np.unique(k)
        w = np.array([scale * float(np.sum(s[k == j] * u[k == j])) for j in ks])  # (ES-3), summed in candidate order
        self._step = np.stack([np.full(ks.size, float(gen)), ks.astype(np.float64), w], axis=1)
        if not self._seeded:
            for j, wj in zip(ks, w):
                self._mean = self._mean + wj * self.epsilon(gen, int(j))
        self._generation += 1
        self._asked.done()

    def step(self) -> np.ndarray:
        """The last update as seed-code rows (g, k, w_k) of (ES-3): what a seeded space applies."""
        return self._step.copy()

    # -- checkpoints and digests -----------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        return {
            "optimizer": self.name,
            "dim": self.dim,
            "popsize": self.popsize,
            "seed": self._seed,
            "sigma0": self._sigma0,
            "learning_rate": self._lr0,
            "lr_decay": self._lr_decay,
            "sigma_decay": self._sigma_decay,
            "antithetic": self._antithetic,
            "fitness_shaping": self._shaping,
            "seeded": self._seeded,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            **self._settings(),
            "generation": self._generation,
            "mean": self._mean.copy(),
            **self._asked.state_dict(),
            "step": self._step.copy(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state(state, STATE_FORMAT, self._settings())
        self._generation = int(state["generation"])
        self._mean = np.array(state["mean"], dtype=np.float64, copy=True)
        self._asked.load_state_dict(state)
        self._step = np.array(state["step"], dtype=np.float64, copy=True)

    def digest(self) -> str:
        """sha256 hex over the settings, the generation, the mean and the pending population."""
        h = hashlib.sha256(json.dumps(self._settings(), sort_keys=True).encode())
        h.update(np.array([self._generation, self._asked.digest_counter()], dtype="<i8").tobytes())
        h.update(np.ascontiguousarray(self._mean, dtype="<f8").tobytes())
        if self._asked.X is not None:
            h.update(np.ascontiguousarray(self._asked.X, dtype="<f8").tobytes())
        return h.hexdigest()

    def __repr__(self) -> str:
        coding = "seed codes" if self._seeded else f"dim={self.dim}"
        return f"ES({coding}, popsize={self.popsize}, generation={self._generation}, sigma={self.sigma:.4g})"
