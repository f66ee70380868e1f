"""CMA-ES for ESSA: a thin, deterministic wrapper around pycma's ``CMAEvolutionStrategy``.

Nothing of CMA-ES is reimplemented here. The wrapper pins everything that could make two ranks (or a
run and its resume) diverge, and checks how the run loop drives it:

* **Random numbers.** pycma draws every N(0, I) vector through its ``randn`` option (called as
  ``randn(number, dim)``: the z_k of Hansen 2016, eq. (38)). We pass a :class:`GenerationNormals`
  that draws from the optimizer's own ``numpy.random.Generator``, re-seeded at every ``ask(g)`` from
  ``SeedSequence(seed, spawn_key=(STREAM_TAG, g))`` (docs/design.md, "One generation", step 1). pycma's
  ``seed`` option is NaN ("do nothing"), so pycma never seeds or reads the global ``np.random``; the
  few places where pycma itself touches the global RNG (the TPA consistency check in ``tell`` uses
  ``np.random.randint``; ``Mh.sround`` for mirrors, which with an integer count of mirrors always rounds
  to that count whatever it draws) cannot change results, and the
  wrapper saves and restores the global ``np.random`` state around every call so user code sees it
  untouched.
* **No files, no output, no clock.** ``verbose=-9``, ``verb_log=0``, ``verb_disp=0``,
  ``verb_plot=0``, ``verb_time=False``, ``signals_filename=''`` (``None`` would make pycma evaluate
  the default file name), ``timeout=inf``.
* **No early stop.** ESSA runs a fixed number of generations. The wrapper never calls pycma's
  ``stop()`` (which also mutates a flat-fitness counter, so it must not be called on one rank only),
  ``ask`` works after pycma would have stopped, and every tolerance-based criterion (tolfun, tolx,
  stagnation, maxiter, timeout, ...) is switched off; only the numerical ``noeffect*`` checks remain.
* **Threads.** The eigendecomposition of C (lazy, inside ``ask``) and the sampling / rank-μ products
  use BLAS, whose results depend on the thread count (full CMA, d = 320: 1 vs 2 OpenBLAS threads
  changed the candidates by ~3e-9 right after the first eigendecomposition). ``ask`` and ``tell`` run
  under ``threadpoolctl`` limits (``blas_threads``, default 1) when threadpoolctl is importable
  (``BLAS_PINNING == "threadpoolctl"``); otherwise (``"environment"``) the run must set
  ``OPENBLAS_NUM_THREADS``/``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` identically on every rank before
  numpy is imported. One thread is also much faster on oversubscribed cores.
* **CPU features.** Bit-identity also needs the same numpy build and the same CPU dispatch on every
  rank: numpy's AVX-512 vs AVX2 kernels (exp/log, reductions, argsort's order of tied values) and
  OpenBLAS's per-CPU kernels (``OPENBLAS_CORETYPE``) give different bits. Jobs that span different node
  types must pin both (``NPY_DISABLE_CPU_FEATURES``, ``OPENBLAS_CORETYPE``) to a common level; the
  digest check catches a divergence either way.
* **Ranks/ties.** Only the ranking of the fitness values reaches the CMA update (the ordering
  x_{i:λ} in eqs. (41), (43), (46), (47); TPA compares ranks of its two line samples), so
  ``fitness_shaping='centered_ranks'`` (average ranks for ties) is a strictly monotone, tie-preserving
  transform and therefore changes nothing in the search: it is kept for other optimizers and logs.
  NaN/inf fitness is an error naming the candidates, in both modes.

pycma choices kept at their defaults (documented because they matter for ESSA): active CMA (negative
weights, eq. (46)); recombination weights eq. (49)/(53); step-size control by CSA (eqs. (43)-(44))
for d < 300 and by two-point adaptation (TPA, Hansen 2008) for d >= 300, in which case the first two
candidates of every generation after the first are the ±mean-shift line samples; lazy
eigendecomposition every ~1/(10 d (c1 + cμ)) generations.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import operator
import pickle
from collections.abc import Iterator
from typing import Any, Final

import cma
import numpy as np

from essa_hpc.search.base import FITNESS_SHAPINGS, Handshake, OptimizerError, check_fitness, check_state, shape_fitness

try:  # optional: pins BLAS threads at run time; without it the run pins them through the environment
    import threadpoolctl
except ImportError:  # pragma: no cover - depends on the environment
    threadpoolctl = None

BLAS_PINNING = "threadpoolctl" if threadpoolctl is not None else "environment"
"""How ``ask``/``tell`` pin BLAS threads: ``threadpoolctl`` limits, or the run's environment variables."""

STREAM_TAG = 0x434D41  # "CMA": the optimizer's spawn-key tag; other seed streams must use other tags
STATE_FORMAT = "essa_hpc.search.cma/1"
MIN_POPSIZE = 4  # with TPA (d >= TPA_FROM_DIM): two line samples + at least two free candidates
MIN_POPSIZE_CSA = 3  # pycma's own minimum (μ = 1 still works with CSA)
TPA_FROM_DIM = 300  # pycma's default: CSA below, TPA from here on
STEP_SIZES: Final[tuple[str, ...]] = ("auto", "csa", "tpa")  # search.step_size: pycma's choice by d, or pinned

_controller: Any = None

# settings added to the checkpoint after its first format, with the value that behaves as checkpoints
# written before them ran: c_m = 1 before search.cmean, no mirrors before search.mirrors, pycma's default
# active update and step-size rule before search.active and search.step_size
SETTINGS_BEFORE_THEIR_KEYS: Final[dict[str, Any]] = {"cmean": 1.0, "mirrors": 0, "active": True, "step_size": "auto"}


def uses_tpa(dim: int, step_size: str) -> bool:
    """Whether σ follows two-point adaptation (TPA, Hansen 2008) rather than CSA (Hansen 2016 eqs. (43)-(44)):
    pycma's default picks TPA from d = TPA_FROM_DIM on; ``csa`` / ``tpa`` pin one rule at any d."""
    return step_size == "tpa" or (step_size == "auto" and dim >= TPA_FROM_DIM)


def _blas_limit(threads: int) -> contextlib.AbstractContextManager[Any]:
    global _controller
    if threadpoolctl is None:
        return contextlib.nullcontext()
    if _controller is None:
        _controller = threadpoolctl.ThreadpoolController()
    return _controller.limit(limits=threads, user_api="blas")


class GenerationNormals:
    """pycma's ``randn`` option: ``randn(n, d)`` -> float64 [n, d] standard normals (z_k, eq. (38)).

    Draws from a private ``numpy.random.Generator`` that :meth:`start` re-seeds at the beginning of
    every generation from ``(seed, STREAM_TAG, gen)``, so the candidates of generation g depend only on
    the seed, g and the optimizer state, never on the global ``np.random`` or on earlier draw counts.
    Module-level and holding plain data, so it pickles together with the pycma object.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.gen = -1
        self.rng: np.random.Generator | None = None

    def start(self, gen: int) -> None:
        self.gen = gen
        self.rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(STREAM_TAG, gen)))

    def __call__(self, n: int, d: int) -> np.ndarray:
        if self.rng is None:
            raise OptimizerError("pycma asked for random numbers before the first ask(gen)")
        return self.rng.standard_normal((int(n), int(d)))

    def state(self) -> dict[str, Any]:
        """Plain, JSON-able state: seed, generation and the bit generator's state."""
        return {"seed": self.seed, "gen": self.gen, "bit_generator": None if self.rng is None else self.rng.bit_generator.state}


def _pycma_mirrors(mirrors: int, popsize: int) -> float:
    """pycma's CMA_mirrors value that gives exactly ``mirrors`` mirrors: below 0.5 it is a fraction of λ,
    above 1 a count, and in [0.5, 1] it selects pycma's own default number."""
    return 0.0 if mirrors == 0 else mirrors / popsize if mirrors == 1 else float(mirrors)


def pycma_options(
    popsize: int,
    diagonal: bool,
    randn: Any,
    cmean: float = 1.0,
    mirrors: int = 0,
    active: bool = True,
    step_size: str = "auto",
) -> dict[str, Any]:
    """The pycma options every rank uses (see the module docstring for why each is pinned)."""
    inf = math.inf
    adapt_sigma: Any = {"auto": True, "csa": cma.sigma_adaptation.CMAAdaptSigmaCSA, "tpa": cma.sigma_adaptation.CMAAdaptSigmaTPA}[step_size]
    return {
        "popsize": popsize,  # λ (Hansen 2016 eq. (48) is pycma's default; ESSA sets it explicitly)
        "CMA_diagonal": bool(diagonal),  # True: sep-CMA (Ros & Hansen 2008), C diagonal, O(d) per update
        # c_m of m ← m + c_m σ Σ w_i y_{i:λ} (eq. (9)); pycma divides it back out of the paths (eqs. (43), (45)),
        # so σ and C adapt as at c_m = 1 while the mean takes a c_m fraction of the selected step
        "CMA_cmean": float(cmean),
        # mirrored sampling (Brockhoff et al. 2010): the last 2m candidates are m pairs (y, −y); method 0
        # mirrors unconditionally inside ask (pycma's default, 2, injects mirrors of the last generation's
        # worst candidates into the next one instead)
        "CMA_mirrors": _pycma_mirrors(mirrors, popsize),
        "CMA_mirrormethod": 0,
        # active CMA (Jastrebski & Arnold 2006; Hansen 2016 eqs. (46)-(47), (53)): the worst candidates'
        # steps enter C's rank-μ update with negative weights, shrinking variance along them; False keeps
        # only the positive weights of the μ best
        "CMA_active": bool(active),
        # σ control: True = pycma's choice (CSA below d 300, TPA from there), or one class at any d
        "AdaptSigma": adapt_sigma,
        "randn": randn,  # z_k ~ N(0, I), eq. (38), from the optimizer's own Generator
        "seed": np.nan,  # "do nothing": pycma neither seeds nor reads the global np.random
        "CMA_eigenmethod": np.linalg.eigh,  # C = B D² Bᵀ (eq. (39)), LAPACK through numpy's BLAS
        "verbose": -9,
        "verb_disp": 0,
        "verb_log": 0,
        "verb_plot": 0,
        "verb_time": False,
        "signals_filename": "",  # '' = no file (None would evaluate the default 'cma_signals.in')
        "timeout": inf,
        "maxiter": inf,
        "maxfevals": inf,
        "ftarget": -inf,
        "tolfun": 0,
        "tolfunhist": 0,
        "tolfunrel": 0,
        "tolx": 0,
        "tolxstagnation": False,
        "tolstagnation": inf,
        "tolflatfitness": inf,
        "tolfacupx": inf,
        "tolupsigma": inf,
        "tolconditioncov": inf,
        "termination_callback": [],
    }


@contextlib.contextmanager
def _keep_global_rng() -> Iterator[None]:
    """Leave the legacy global ``np.random`` state exactly as found (pycma's TPA check draws from it)."""
    saved = np.random.get_state()
    try:
        yield
    finally:
        np.random.set_state(saved)


def _numeric_items(prefix: str, obj: Any, skip: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    """(name, value) for every numeric attribute of ``obj``, by name; for hashing pycma's components."""
    for name in sorted(vars(obj)):
        if name in skip:
            continue
        value = getattr(obj, name)
        if isinstance(value, np.ndarray):
            if value.dtype.kind in "biuf":
                yield f"{prefix}.{name}", value
        elif isinstance(value, (bool, int, float, np.number, np.bool_)):
            yield f"{prefix}.{name}", value


class CMAES:
    """CMA-ES (full covariance or sep-CMA) through pycma, deterministic from ``seed``.

    The initial mean is 0 (the SFT point: candidates are offsets) and the initial step size ``sigma0``.
    Implements :class:`essa_hpc.search.base.Optimizer`.
    """

    name = "cma"

    def __init__(
        self,
        dim: int,
        popsize: int,
        sigma0: float,
        seed: int,
        *,
        diagonal: bool = True,
        fitness_shaping: str = "none",
        blas_threads: int = 1,
        cmean: float = 1.0,
        mirrors: int = 0,
        active: bool = True,
        step_size: str = "auto",
    ) -> None:
        for key, value in (("dim", dim), ("search.popsize", popsize), ("seed", seed), ("blas_threads", blas_threads)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{key}: expected an integer, got {value!r}")
        if dim < 1:
            raise ValueError(f"dim: expected a solution length >= 1, got {dim}")
        if step_size not in STEP_SIZES:
            raise ValueError(f"search.step_size: expected one of {STEP_SIZES}, got {step_size!r}")
        if not isinstance(active, bool):
            raise ValueError(f"search.active: expected true or false, got {active!r}")
        tpa = uses_tpa(int(dim), step_size)
        floor = MIN_POPSIZE if tpa else MIN_POPSIZE_CSA
        if popsize < floor:
            raise ValueError(
                f"search.popsize: expected at least {floor} for d = {dim} (pycma needs λ >= 3; TPA step-size control, "
                f"pycma's from d = {TPA_FROM_DIM} on or search.step_size=tpa, spends two candidates per generation on "
                f"line samples, so λ >= {MIN_POPSIZE}), got {popsize}"
            )
        if not (isinstance(sigma0, (int, float)) and math.isfinite(sigma0) and sigma0 > 0):
            raise ValueError(f"search.sigma0: expected a finite step size > 0, got {sigma0!r}")
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed: expected 0 <= seed < 2**63, got {seed}")
        if fitness_shaping not in FITNESS_SHAPINGS:
            raise ValueError(f"search.fitness_shaping: expected one of {FITNESS_SHAPINGS}, got {fitness_shaping!r}")
        if blas_threads < 1:
            raise ValueError(f"blas_threads: expected >= 1, got {blas_threads}")
        if not (isinstance(cmean, (int, float)) and 0 < cmean <= 1):
            raise ValueError(f"search.cmean: expected a mean learning rate 0 < c_m <= 1, got {cmean!r}")
        free = popsize - (2 if tpa else 0)  # TPA's two line samples are never mirrored
        if isinstance(mirrors, bool) or not isinstance(mirrors, (int, np.integer)) or not 0 <= 2 * mirrors <= free:
            raise ValueError(
                f"search.mirrors: expected 0 to {free // 2} mirrored candidates for λ = {popsize} and d = {dim}, got {mirrors!r}"
            )
        self.dim: Final[int] = int(dim)  # the Optimizer protocol's read-only d and λ
        self.popsize: Final[int] = int(popsize)
        self._sigma0 = float(sigma0)
        self._seed = int(seed)
        self._diagonal = bool(diagonal)
        self._fitness_shaping = fitness_shaping
        self._blas_threads = int(blas_threads)
        self._cmean = float(cmean)
        self._mirrors = int(mirrors)
        self._active = active
        self._step_size = step_size
        self._randn = GenerationNormals(self._seed)
        with self._pinned():
            # m^(0) = 0 (the SFT adapter), σ^(0) = sigma0, C^(0) = I (pycma adds a 1e-4/d spread to the diagonal)
            options = pycma_options(self.popsize, self._diagonal, self._randn, self._cmean, self._mirrors, self._active, self._step_size)
            self._es = cma.CMAEvolutionStrategy(np.zeros(self.dim), self._sigma0, options)
        took = (
            self._es.sm.randn is self._randn
            and self._es.popsize == self.popsize
            and self._es.sp.lam_mirr == self._mirrors
            and isinstance(self._es.adapt_sigma, cma.sigma_adaptation.CMAAdaptSigmaTPA) == tpa
            and bool(self._es.opts["CMA_active"]) == active
        )
        if not took:
            raise RuntimeError(
                "pycma did not take the pinned sampler, population size, mirrors, step-size rule or active flag; check the pycma version"
            )
        self._asked = Handshake()

    # -- read-only views ---------------------------------------------------------------------------

    @property
    def diagonal(self) -> bool:
        return self._diagonal

    @property
    def generation(self) -> int:
        return int(self._es.countiter)

    @property
    def sigma(self) -> float:
        return float(self._es.sigma)

    @property
    def mean(self) -> np.ndarray:
        return np.array(self._es.gp.pheno(self._es.mean), dtype=np.float64, copy=True)

    @property
    def stds(self) -> np.ndarray:
        """Per-coordinate standard deviations σ·sqrt(diag C) (times sep-CMA's scaling), float64 [d]."""
        return np.array(self._es.stds, dtype=np.float64, copy=True)

    def __repr__(self) -> str:
        kind = "sep-CMA" if self._diagonal else "CMA"
        return f"CMAES({kind}, dim={self.dim}, popsize={self.popsize}, generation={self.generation}, sigma={self.sigma:.4g})"

    # -- the generation ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _pinned(self) -> Iterator[None]:
        with _keep_global_rng(), _blas_limit(self._blas_threads):
            yield

    def ask(self, gen: int) -> np.ndarray:
        """Candidates x_k = m + σ y_k, y_k = B D z_k (eqs. (38)-(40)) of generation ``gen``: float64 [λ, d].

        ``gen`` must equal :attr:`generation`; asking again for the pending generation returns the same
        candidates (a copy) without drawing anything.
        """
        gen = operator.index(gen)
        again = self._asked.asked(gen, self.generation)
        if again is not None:
            return again
        self._randn.start(gen)
        with self._pinned():
            X = np.array(self._es.ask(), dtype=np.float64)
        if X.shape != (self.popsize, self.dim):
            raise RuntimeError(f"pycma returned candidates of shape {X.shape}, expected {(self.popsize, self.dim)}")
        return self._asked.hold(gen, X)

    def tell(self, X: np.ndarray, fitness: np.ndarray) -> None:
        """Rank the candidates by ``fitness`` (minimized) and update m, σ, C and the paths (eqs. (41)-(47)).

        ``X`` must be exactly the array ``ask`` returned for the pending generation (ranks never exchange
        candidates, so anything else is a bug); ``fitness`` must be finite.
        """
        gen, pending = self._asked.check(X, self.generation)
        f = check_fitness(fitness, self.popsize, gen)
        # Only the ordering x_{1:λ} <= ... <= x_{λ:λ} enters eqs. (41)-(47) (and TPA's rank comparison), so
        # centered ranks change nothing in the update; they keep ties tied, as raw values do.
        values = shape_fitness(f, self._fitness_shaping)
        with self._pinned():
            self._es.tell(list(pending), list(values))
        self._asked.done()

    # -- checkpoints and cross-rank checks ---------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        return {
            "optimizer": self.name,
            "dim": self.dim,
            "popsize": self.popsize,
            "sigma0": self._sigma0,
            "seed": self._seed,
            "diagonal": self._diagonal,
            "fitness_shaping": self._fitness_shaping,
            "cmean": self._cmean,
            "mirrors": self._mirrors,
            "active": self._active,
            "step_size": self._step_size,
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain picklable data: settings, versions, the pickled pycma object (which carries the
        Generator), the RNG state spelled out, and the pending generation's candidates if any."""
        return {
            "format": STATE_FORMAT,
            **self._settings(),
            "cma_version": cma.__version__,
            "numpy_version": np.__version__,
            "generation": self.generation,
            "rng": self._randn.state(),
            **self._asked.state_dict(),
            "es": self._pickle_es(),
        }

    # pycma attributes holding the last population (3 x λ x d floats) for its own reports; nothing in
    # ask/tell reads them (``ary`` is reset by the next ask), so checkpoints leave them out
    _TRANSIENT = ("_tell2_args", "ary", "pop_sorted")

    def _pickle_es(self) -> bytes:
        es = self._es
        saved = {name: es.__dict__[name] for name in self._TRANSIENT if name in es.__dict__}
        try:
            for name in saved:
                setattr(es, name, None)
            return pickle.dumps(es, protocol=pickle.HIGHEST_PROTOCOL)
        finally:
            for name, value in saved.items():
                setattr(es, name, value)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; the settings and the pycma version must match this optimizer.

        The state is unpickled: load checkpoints you wrote yourself only.
        """
        if isinstance(state, dict):
            state = {**SETTINGS_BEFORE_THEIR_KEYS, **state}
        check_state(state, STATE_FORMAT, self._settings())
        if state.get("cma_version") != cma.__version__:
            raise ValueError(
                f"optimizer state: written with pycma {state.get('cma_version')}, this environment has pycma {cma.__version__}; "
                "a bit-identical resume needs the same version"
            )
        es = pickle.loads(state["es"])
        randn = es.opts["randn"]
        if not isinstance(randn, GenerationNormals) or es.sm.randn is not randn or int(es.countiter) != state["generation"]:
            raise ValueError("optimizer state: the pickled pycma object is inconsistent with the checkpoint's metadata")
        if randn.state() != state["rng"]:
            raise ValueError("optimizer state: the pickled RNG state differs from the checkpoint's 'rng' entry")
        self._es, self._randn = es, randn
        self._asked.load_state_dict(state)

    def _digest_items(self) -> Iterator[tuple[str, Any]]:
        es = self._es
        yield "settings", json.dumps(self._settings(), sort_keys=True)
        yield "counters", np.array([es.countiter, es.countevals, self._asked.digest_counter()], dtype=np.int64)
        yield "rng", json.dumps(self._randn.state(), sort_keys=True)
        yield "mean", es.mean  # m (eq. (42))
        yield "sigma", float(es.sigma)  # σ (eq. (44) / TPA)
        yield "pc", es.pc  # p_c (eq. (45))
        yield "pc2", es.pc2
        yield from _numeric_items("adapt_sigma", es.adapt_sigma)  # CSA: p_σ (eq. (43)); TPA: s, Δ
        yield from _numeric_items("sigma_vec", es.sigma_vec)  # sep-CMA: the diagonal of C lives here
        # full CMA: C (eq. (47)), and its eigendecomposition B, D (eq. (39)) with the lazy-update counters;
        # _inverse_root_C is a cache derived from them
        yield from _numeric_items("sm", es.sm, skip=("_inverse_root_C",))
        yield from _numeric_items("gp", es.gp)

    def digest(self) -> str:
        """sha256 hex over settings, counters, RNG state, m, σ, the paths, C (or its diagonal), B, D."""
        h = hashlib.sha256()
        for name, value in self._digest_items():
            h.update(name.encode())
            if isinstance(value, str):
                h.update(b"s" + value.encode())
            else:
                a = np.asarray(value)
                a = a.astype("<f8" if a.dtype.kind == "f" else "<i8", copy=False)
                if a.ndim == 2 and a.flags.f_contiguous and not a.flags.c_contiguous:
                    a = a.T  # pycma's B is column-sorted (Fortran order): hash its transpose without a copy
                    h.update(b"T")
                h.update(f"{a.dtype.str}{a.shape}".encode())
                h.update(np.ascontiguousarray(a).data)
            h.update(b"\x00")
        return h.hexdigest()
