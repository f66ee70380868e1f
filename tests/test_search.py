"""The optimizer: determinism across instances (= ranks), resume, digest, pycma equivalence, errors."""

from __future__ import annotations

import pickle

import cma
import numpy as np
import pytest

from essa_hpc.config import SearchSection
from essa_hpc.search import CMAES, Optimizer, OptimizerError, centered_ranks, make_optimizer
from essa_hpc.search.cma_es import GenerationNormals, _blas_limit, pycma_options

# d = 40 uses CSA step-size control, d = 320 pycma's TPA (d >= 300), which injects line samples
MODES = [(False, 40), (True, 40), (False, 320), (True, 320)]
MODE_IDS = ["full-d40", "diag-d40", "full-d320", "diag-d320"]


def sphere(X: np.ndarray, shift: float = 0.3) -> np.ndarray:
    return ((X - shift) ** 2).sum(axis=1)


def run(opt: CMAES, gens: int, f=sphere, start: int = 0) -> list[tuple[np.ndarray, np.ndarray, float, str]]:
    out = []
    for g in range(start, start + gens):
        X = opt.ask(g)
        opt.tell(X, f(X))
        out.append((X, opt.mean, opt.sigma, opt.digest()))
    return out


def assert_same_trace(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ma, sa, da), (xb, mb, sb, db) in zip(a, b):
        assert np.array_equal(xa, xb)
        assert np.array_equal(ma, mb)
        assert sa == sb
        assert da == db


@pytest.mark.parametrize(("diagonal", "dim"), MODES, ids=MODE_IDS)
def test_same_seed_same_candidates_and_digest(diagonal: bool, dim: int) -> None:
    a = CMAES(dim, 12, 0.5, seed=7, diagonal=diagonal)
    b = CMAES(dim, 12, 0.5, seed=7, diagonal=diagonal)
    assert isinstance(a, Optimizer)
    assert a.digest() == b.digest()
    gens = 30 if dim < 300 else 12  # full CMA at d = 320 costs an eigendecomposition every ~5 generations
    ta, tb = run(a, gens), run(b, gens)
    assert_same_trace(ta, tb)
    assert ta[0][0].shape == (12, dim) and ta[0][0].dtype == np.float64
    assert a.generation == gens
    c = CMAES(dim, 12, 0.5, seed=8, diagonal=diagonal)
    assert not np.array_equal(c.ask(0), ta[0][0])


def test_candidates_depend_only_on_seed_and_generation() -> None:
    a = CMAES(10, 8, 0.5, seed=3)
    X0 = a.ask(0)
    a.tell(X0, sphere(X0))
    # generation 0 of a second instance matches, whatever the global RNG does in between
    np.random.seed(99)
    np.random.rand(5)
    assert np.array_equal(CMAES(10, 8, 0.5, seed=3).ask(0), X0)


@pytest.mark.parametrize("diagonal", [False, True], ids=["full", "diag"])
def test_global_numpy_rng_untouched(diagonal: bool) -> None:
    np.random.seed(1234)
    before = np.random.get_state()
    opt = CMAES(320, 8, 0.5, seed=1, diagonal=diagonal)  # TPA: pycma's consistency check draws from np.random
    run(opt, 8)
    after = np.random.get_state()
    assert isinstance(before, tuple) and isinstance(after, tuple)
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and before[2:] == after[2:]


def test_pycma_alone_would_touch_the_global_rng() -> None:
    """Why the wrapper guards np.random: pycma's TPA check (d >= 300) draws from it in tell."""
    saved = np.random.get_state()
    np.random.seed(5)
    before = np.random.get_state()
    randn = GenerationNormals(1)
    es = cma.CMAEvolutionStrategy(np.zeros(320), 0.5, pycma_options(8, True, randn))
    for g in range(6):
        randn.start(g)
        X = es.ask()
        es.tell(X, list(sphere(np.array(X))))
    after = np.random.get_state()
    np.random.set_state(saved)
    assert isinstance(before, tuple) and isinstance(after, tuple)
    assert not np.array_equal(after[1], before[1])


@pytest.mark.parametrize(("diagonal", "dim"), MODES, ids=MODE_IDS)
def test_state_dict_round_trip_continues_identically(diagonal: bool, dim: int) -> None:
    a = CMAES(dim, 10, 0.4, seed=11, diagonal=diagonal)
    run(a, 7)
    state = pickle.loads(pickle.dumps(a.state_dict()))
    b = CMAES(dim, 10, 0.4, seed=11, diagonal=diagonal)
    b.load_state_dict(state)
    assert b.generation == 7 and b.digest() == a.digest()
    assert_same_trace(run(a, 8, start=7), run(b, 8, start=7))


def test_state_dict_mid_generation_reproduces_the_pending_candidates() -> None:
    a = CMAES(30, 8, 0.5, seed=2)
    run(a, 3)
    X3 = a.ask(3)
    state = a.state_dict()
    b = CMAES(30, 8, 0.5, seed=2)
    b.load_state_dict(state)
    assert np.array_equal(b.ask(3), X3)
    assert b.digest() == a.digest()
    a.tell(X3, sphere(X3))
    b.tell(X3, sphere(X3))
    assert_same_trace(run(a, 4, start=4), run(b, 4, start=4))


def test_load_state_dict_rejects_other_settings() -> None:
    state = CMAES(30, 8, 0.5, seed=2).state_dict()
    with pytest.raises(ValueError, match="popsize"):
        CMAES(30, 10, 0.5, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        CMAES(30, 8, 0.5, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="diagonal"):
        CMAES(30, 8, 0.5, seed=2, diagonal=False).load_state_dict(state)
    with pytest.raises(ValueError, match="format"):
        CMAES(30, 8, 0.5, seed=2).load_state_dict({"es": b""})
    with pytest.raises(ValueError, match="pycma"):
        CMAES(30, 8, 0.5, seed=2).load_state_dict({**state, "cma_version": "0.0"})


@pytest.mark.parametrize("diagonal", [False, True], ids=["full", "diag"])
def test_digest_sees_tiny_changes(diagonal: bool) -> None:
    opt = CMAES(20, 8, 0.5, seed=4, diagonal=diagonal)
    run(opt, 3)
    ref = opt.digest()
    assert len(ref) == 64 and int(ref, 16) >= 0
    es = opt._es
    es.mean[5] += 1e-12
    assert opt.digest() != ref
    es.mean[5] -= 1e-12
    assert opt.digest() == ref
    es.sigma *= 1 + 1e-15
    assert opt.digest() != ref


def test_ask_protocol_errors() -> None:
    opt = CMAES(10, 6, 0.5, seed=0)
    with pytest.raises(OptimizerError, match="tell"):
        opt.tell(np.zeros((6, 10)), np.zeros(6))
    with pytest.raises(OptimizerError, match="generation 0"):
        opt.ask(1)
    X = opt.ask(0)
    X[0, 0] = 123.0  # the caller's copy; the optimizer keeps its own
    again = opt.ask(0)
    assert again[0, 0] != 123.0 and np.array_equal(again, opt.ask(0))
    with pytest.raises(OptimizerError, match="not told"):
        opt.ask(1)
    with pytest.raises(OptimizerError, match=r"candidates \[0\] differ"):
        opt.tell(X, np.zeros(6))
    with pytest.raises(ValueError, match="shape"):
        opt.tell(again[:5], np.zeros(5))
    opt.tell(again, sphere(again))
    with pytest.raises(OptimizerError, match="generation 1"):
        opt.ask(0)
    assert opt.ask(1).shape == (6, 10)


def test_non_finite_fitness_names_the_candidates() -> None:
    opt = CMAES(10, 6, 0.5, seed=0)
    X = opt.ask(0)
    f = sphere(X)
    f[2] = np.nan
    f[4] = np.inf
    with pytest.raises(ValueError, match=r"candidate 2: nan, candidate 4: inf"):
        opt.tell(X, f)
    with pytest.raises(ValueError, match=r"fitness of shape \(6,\)"):
        opt.tell(X, f[:5])
    opt.tell(X, sphere(X))  # nothing was consumed by the failed calls
    assert opt.generation == 1


def test_validation_messages() -> None:
    with pytest.raises(ValueError, match=r"search\.popsize"):
        CMAES(10, 2, 0.5, seed=0)  # pycma's minimum is 3
    with pytest.raises(ValueError, match=r"search\.popsize: expected at least 4 for d = 300"):
        CMAES(300, 3, 0.5, seed=0)  # TPA spends two candidates on line samples
    assert CMAES(10, 3, 0.5, seed=0).popsize == 3
    with pytest.raises(ValueError, match="dim"):
        CMAES(0, 8, 0.5, seed=0)
    with pytest.raises(ValueError, match=r"search\.sigma0"):
        CMAES(10, 8, float("nan"), seed=0)
    with pytest.raises(ValueError, match=r"search\.sigma0"):
        CMAES(10, 8, 0.0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        CMAES(10, 8, 0.5, seed=-1)
    with pytest.raises(ValueError, match=r"search\.fitness_shaping"):
        CMAES(10, 8, 0.5, seed=0, fitness_shaping="z")
    with pytest.raises(ValueError, match=r"search\.optimizer"):
        make_optimizer(SearchSection(optimizer="nes"), 10, 0)


def test_make_optimizer_from_config() -> None:
    cfg = SearchSection(popsize=16, sigma0=0.25, diagonal=False, fitness_shaping="centered_ranks")
    opt = make_optimizer(cfg, 24, seed=1234)
    assert isinstance(opt, CMAES) and isinstance(opt, Optimizer)
    assert (opt.dim, opt.popsize, opt.sigma, opt.diagonal) == (24, 16, 0.25, False)
    assert np.array_equal(opt.mean, np.zeros(24))  # the SFT point
    assert opt.ask(0).shape == (16, 24)


@pytest.mark.parametrize("diagonal", [False, True], ids=["full", "diag"])
def test_cmean_moves_the_mean_a_fraction_and_adapts_sigma_alike(diagonal: bool) -> None:
    """search.cmean = c_m: the first mean is c_m times the c_m = 1 mean (both start at 0, same candidates),
    while σ adapts identically (pycma divides c_m back out of the evolution paths)."""
    full = make_optimizer(SearchSection(popsize=10, sigma0=0.5, diagonal=diagonal, cmean=1.0), 30, seed=3)
    part = make_optimizer(SearchSection(popsize=10, sigma0=0.5, diagonal=diagonal, cmean=0.25), 30, seed=3)
    X, Xp = full.ask(0), part.ask(0)
    assert np.array_equal(X, Xp)
    full.tell(X, sphere(X, 1.0))
    part.tell(Xp, sphere(Xp, 1.0))
    assert np.allclose(part.mean, 0.25 * full.mean, rtol=1e-12, atol=1e-15) and np.linalg.norm(full.mean) > 0.1
    assert part.sigma == pytest.approx(full.sigma, rel=1e-12)
    assert part.digest() != full.digest()
    with pytest.raises(ValueError, match=r"cmean = 1\.0 in the checkpoint"):
        part.load_state_dict(full.state_dict())
    older = {k: v for k, v in full.state_dict().items() if k != "cmean"}  # written before search.cmean
    resumed = make_optimizer(SearchSection(popsize=10, sigma0=0.5, diagonal=diagonal, cmean=1.0), 30, seed=3)
    resumed.load_state_dict(older)
    assert resumed.digest() == full.digest()
    with pytest.raises(ValueError, match="cmean"):
        part.load_state_dict(older)
    with pytest.raises(ValueError, match=r"search\.cmean"):
        CMAES(10, 8, 0.5, seed=0, cmean=0.0)


@pytest.mark.parametrize("dim", [30, 320])
def test_mirrors_pair_the_last_candidates_and_resume(dim: int) -> None:
    """search.mirrors = m: the last 2m candidates of every generation are m pairs m ± σy (pycma's
    unconditional mirroring), the rest independent; TPA's line samples (d >= 300) come first; the
    setting is part of the checkpoint, and a checkpoint from before the key resumes as m = 0."""
    cfg = SearchSection(popsize=8, sigma0=0.5, diagonal=False, cmean=0.25, mirrors=3)
    opt = make_optimizer(cfg, dim, seed=5)
    for g in range(3):
        mean = opt.mean
        X = opt.ask(g)
        Y = X - mean
        pairs = [np.allclose(Y[-1 - 2 * i], -Y[-2 - 2 * i], rtol=0, atol=1e-12) for i in range(4)]
        tpa = dim >= 300 and g > 0  # TPA's two line samples m ± σ·(mean shift) are a ± pair of their own
        assert pairs == [True, True, True, tpa], (g, pairs)
        opt.tell(X, sphere(X, 1.0))
    again = make_optimizer(cfg, dim, seed=5)
    again.load_state_dict(opt.state_dict())
    assert again.digest() == opt.digest() and np.array_equal(again.ask(3), opt.ask(3))
    plain = make_optimizer(SearchSection(popsize=8, sigma0=0.5, diagonal=False, cmean=0.25), dim, seed=5)
    with pytest.raises(ValueError, match="mirrors"):
        plain.load_state_dict(opt.state_dict())
    older = {k: v for k, v in plain.state_dict().items() if k != "mirrors"}  # written before search.mirrors
    make_optimizer(SearchSection(popsize=8, sigma0=0.5, diagonal=False, cmean=0.25), dim, seed=5).load_state_dict(older)
    with pytest.raises(ValueError, match=r"search\.mirrors"):
        CMAES(dim, 8, 0.5, seed=0, mirrors=4 if dim >= 300 else 5)


@pytest.mark.parametrize("dim", [30, 320])
def test_active_and_step_size_pin_pycma_and_resume(dim: int) -> None:
    """search.active and search.step_size reach pycma (CMA_active, AdaptSigma) and change the run;
    step_size=auto is pycma's choice by d and so equals the rule it picks; both are checkpoint settings,
    and a checkpoint from before the keys resumes as active with auto."""
    import cma

    def run(**kw: object) -> CMAES:
        opt = make_optimizer(SearchSection(popsize=8, sigma0=0.5, diagonal=False, cmean=0.25, **kw), dim, seed=7)  # type: ignore[arg-type]
        for g in range(4):
            X = opt.ask(g)
            opt.tell(X, sphere(X, 1.0))
        assert isinstance(opt, CMAES)
        return opt

    auto, passive = run(), run(active=False)
    assert auto._es.opts["CMA_active"] is True and passive._es.opts["CMA_active"] is False
    assert auto.digest() != passive.digest()  # negative weights change C once the worst steps count
    pinned = run(step_size="tpa" if dim >= 300 else "csa")
    other = run(step_size="csa" if dim >= 300 else "tpa")
    tpa = cma.sigma_adaptation.CMAAdaptSigmaTPA
    assert isinstance(auto._es.adapt_sigma, tpa) == (dim >= 300) and isinstance(other._es.adapt_sigma, tpa) == (dim < 300)
    assert np.array_equal(pinned.mean, auto.mean) and pinned.sigma == auto.sigma  # the rule auto picks
    assert other.sigma != auto.sigma
    again = make_optimizer(SearchSection(popsize=8, sigma0=0.5, diagonal=False, cmean=0.25, active=False), dim, seed=7)
    again.load_state_dict(passive.state_dict())
    assert again.digest() == passive.digest() and np.array_equal(again.ask(4), passive.ask(4))
    with pytest.raises(ValueError, match="active"):
        run().load_state_dict(passive.state_dict())
    older = {k: v for k, v in auto.state_dict().items() if k not in ("active", "step_size")}  # before the keys
    fresh = make_optimizer(SearchSection(popsize=8, sigma0=0.5, diagonal=False, cmean=0.25), dim, seed=7)
    fresh.load_state_dict(older)
    assert fresh.digest() == auto.digest()
    with pytest.raises(ValueError, match=r"search\.step_size"):
        CMAES(dim, 8, 0.5, seed=0, step_size="median")
    with pytest.raises(ValueError, match=r"search\.popsize"):
        CMAES(dim, 3, 0.5, seed=0, step_size="tpa")
    with pytest.raises(ValueError, match=r"search\.mirrors"):
        CMAES(dim, 8, 0.5, seed=0, step_size="tpa", mirrors=4)


def test_centered_ranks() -> None:
    assert np.array_equal(centered_ranks(np.array([3.0, 1.0, 2.0])), [0.5, -0.5, 0.0])
    r = centered_ranks(np.array([1.0, 0.0, 1.0, 5.0, 1.0]))
    assert np.array_equal(r, [0.0, -0.5, 0.0, 0.5, 0.0])
    assert np.array_equal(centered_ranks(np.ones(4)), np.zeros(4))


@pytest.mark.parametrize("dim", [40, 320])
def test_centered_ranks_change_nothing_in_cma(dim: int) -> None:
    """CMA is rank-based: raw and centered-rank fitness give bit-identical runs, ties included."""

    def tied(X: np.ndarray) -> np.ndarray:  # discrete rewards, like accuracy on a small minibatch
        return -np.floor(8 * np.exp(-sphere(X) / dim))

    a = CMAES(dim, 12, 0.5, seed=9, fitness_shaping="none")
    b = CMAES(dim, 12, 0.5, seed=9, fitness_shaping="centered_ranks")
    for g in range(15):
        Xa, Xb = a.ask(g), b.ask(g)
        assert np.array_equal(Xa, Xb)
        a.tell(Xa, tied(Xa))
        b.tell(Xb, tied(Xb))
    assert np.array_equal(a.mean, b.mean) and a.sigma == b.sigma


@pytest.mark.parametrize(("diagonal", "dim"), MODES, ids=MODE_IDS)
def test_bit_identical_to_pycma_driven_directly(diagonal: bool, dim: int) -> None:
    opt = CMAES(dim, 10, 0.5, seed=21, diagonal=diagonal)
    randn = GenerationNormals(21)
    es = cma.CMAEvolutionStrategy(np.zeros(dim), 0.5, pycma_options(10, diagonal, randn))
    for g in range(25 if dim < 300 else 12):
        X = opt.ask(g)
        randn.start(g)
        with _blas_limit(1):  # the wrapper's BLAS pinning: eigh's bits depend on the thread count
            Y = np.array(es.ask())
        assert np.array_equal(X, Y)
        opt.tell(X, sphere(X))
        with _blas_limit(1):
            es.tell(list(Y), list(sphere(Y)))
        assert np.array_equal(opt.mean, es.mean) and opt.sigma == es.sigma


def _generations_to(opt_ask_tell, target: float, shift: np.ndarray, limit: int) -> int:
    for g in range(limit):
        mean = opt_ask_tell(g)
        if ((mean - shift) ** 2).sum() < target:
            return g + 1
    return limit


@pytest.mark.parametrize("diagonal", [False, True], ids=["full", "diag"])
def test_converges_like_stock_pycma_on_shifted_sphere(diagonal: bool) -> None:
    """d = 20: generations to f(mean) < 1e-8 match pycma with its own (global-RNG) sampling."""
    d, lam, shift = 20, 12, np.linspace(-1.0, 1.0, 20)

    def f(X):
        return ((np.asarray(X) - shift) ** 2).sum(axis=1)

    ours, stock = [], []
    saved = np.random.get_state()  # stock pycma seeds and draws from the global np.random
    for seed in (1, 2, 3):
        opt = CMAES(d, lam, 0.5, seed=seed, diagonal=diagonal)

        def step(g, opt=opt):
            X = opt.ask(g)
            opt.tell(X, f(X))
            return opt.mean

        ours.append(_generations_to(step, 1e-8, shift, 2000))
        es = cma.CMAEvolutionStrategy(
            np.zeros(d), 0.5, {"popsize": lam, "CMA_diagonal": diagonal, "seed": seed, "verbose": -9, "verb_log": 0}
        )

        def stock_step(g, es=es):
            X = es.ask()
            es.tell(X, list(f(X)))
            return es.mean

        stock.append(_generations_to(stock_step, 1e-8, shift, 2000))
    np.random.set_state(saved)
    assert max(ours) < 2000 and max(stock) < 2000
    assert 0.8 < np.mean(ours) / np.mean(stock) < 1.25, (ours, stock)


def test_keeps_going_past_pycma_termination_and_writes_no_files(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    opt = CMAES(3, 6, 0.5, seed=0, diagonal=False)
    run(opt, 400, f=lambda X: np.round(sphere(X), 3))  # flat fitness and tiny sigma: pycma would stop
    assert opt.generation == 400 and np.isfinite(opt.sigma)
    assert list(tmp_path.iterdir()) == []


def test_blas_threads_are_pinned_inside_ask_and_tell() -> None:
    threadpoolctl = pytest.importorskip("threadpoolctl")
    seen: list[int] = []

    class Spy(GenerationNormals):
        def __call__(self, n: int, d: int) -> np.ndarray:
            seen.extend(i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas")
            return super().__call__(n, d)

    opt = CMAES(20, 6, 0.5, seed=0, blas_threads=1)
    spy = Spy(0)
    opt._es.opts["randn"] = opt._es.sm.randn = opt._randn = spy
    opt.ask(0)
    assert seen and set(seen) == {1}
