"""The Appendix B latency model (analysis/latency.py): formulas against hand-computed values, Lemma B.1's
optimum against a grid search, Theorem B.2's bound at equality, presets, and the η_gen fit."""

from __future__ import annotations

import math

import numpy as np
import pytest

pd = pytest.importorskip("pandas", reason="the latency model needs the analysis extra: pip install 'essa_hpc[analysis]'")

from essa_hpc.analysis import latency as L  # noqa: E402

# a = m_fb·η_fb = 2·0.5 = 1, b = m_gen·η_gen = 3·1 = 3; G = 10; M = 1e9 bytes at 1e9 B/s
P = {"B_grad": 100.0, "m_fb": 2.0, "eta_fb": 0.5, "m_gen": 3.0, "eta_gen": 1.0, "M_params": 1e9, "peak_bw": 1e9}


def test_t_grad_hand_computed() -> None:
    # allreduce: 2·1e9·9/(10·1e9) = 1.8 s
    assert L.allreduce_time(10, 1e9, 1e9) == pytest.approx(1.8)
    # θ = 0.25: max(1/0.25, 3/0.75) = 4 -> (100/10)·4 + 1.8 = 41.8
    assert L.t_grad(0.25, 10, **P) == pytest.approx(41.8)
    # θ = 0.5: max(2, 6) = 6 -> 61.8 ; θ = 0.1: max(10, 3.33) = 10 -> 101.8
    assert L.t_grad(0.5, 10, **P) == pytest.approx(61.8)
    assert L.t_grad(0.1, 10, **P) == pytest.approx(101.8)
    # one GPU: no all-reduce
    assert L.t_grad(0.25, 1, **P) == pytest.approx(400.0)
    with pytest.raises(ValueError, match="theta"):
        L.t_grad(1.0, 10, **P)


def test_lemma_b1_hand_computed() -> None:
    kw = {k: P[k] for k in ("m_fb", "eta_fb", "m_gen", "eta_gen")}
    assert L.theta_star(**kw) == pytest.approx(0.25)
    # (100/10)·(1 + 3) + 1.8
    assert L.t_grad_star(10, **P) == pytest.approx(41.8)
    assert L.t_grad_star(10, **P) == pytest.approx(L.t_grad(L.theta_star(**kw), 10, **P))


@pytest.mark.parametrize("seed", range(5))
def test_lemma_b1_grid_search(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p = {
        "B_grad": float(rng.integers(16, 4096)),
        "m_fb": float(rng.integers(64, 4096)),
        "eta_fb": 10 ** rng.uniform(-5, -2),
        "m_gen": float(rng.integers(64, 4096)),
        "eta_gen": 10 ** rng.uniform(-5, -2),
        "M_params": 10 ** rng.uniform(9, 12),
        "peak_bw": 10 ** rng.uniform(10, 12),
    }
    G = int(rng.integers(2, 1025))
    grid = np.linspace(1e-4, 1 - 1e-4, 20_001)
    values = np.array([L.t_grad(t, G, **p) for t in grid])
    ts = L.theta_star(m_fb=p["m_fb"], eta_fb=p["eta_fb"], m_gen=p["m_gen"], eta_gen=p["eta_gen"])
    assert abs(grid[np.argmin(values)] - ts) < 2e-4
    best = L.t_grad_star(G, **p)
    assert values.min() >= best * (1 - 1e-12)
    assert values.min() == pytest.approx(best, rel=1e-3)


def test_t_essa_hand_computed() -> None:
    # 4·5·3·1/10 = 6 s + 8·9/(10·1e9)
    assert L.t_essa(10, N_pop=4, B_essa=5, m_gen=3, eta_gen=1.0, peak_bw=1e9) == pytest.approx(6.0 + 7.2e-9, rel=1e-15)
    assert L.t_essa(1, N_pop=4, B_essa=5, m_gen=3, eta_gen=1.0, peak_bw=1e9) == pytest.approx(60.0)
    assert L.M_ESSA_BYTES == 8.0


def test_theorem_b2_hand_computed() -> None:
    # [100·(1 + 3) + (2e9 − 8)·9/1e9] / (5·3)
    expected = (400.0 + (2e9 - 8) * 9 / 1e9) / 15.0
    assert L.population_bound(10, **P, B_essa=5) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(27.866666662, rel=1e-9)


@pytest.mark.parametrize("G", [1, 2, 8, 16, 100, 1024])
def test_theorem_b2_bound_is_tight(G: int) -> None:
    p = dict(P, M_params=3e10, peak_bw=5e10)
    n = L.population_bound(G, **p, B_essa=7)
    at = L.t_essa(G, N_pop=n, B_essa=7, m_gen=p["m_gen"], eta_gen=p["eta_gen"], peak_bw=p["peak_bw"])
    assert at == pytest.approx(L.t_grad_star(G, **p), rel=1e-12)
    above = L.t_essa(G, N_pop=n * 1.001, B_essa=7, m_gen=p["m_gen"], eta_gen=p["eta_gen"], peak_bw=p["peak_bw"])
    assert above > L.t_grad_star(G, **p)
    # the bound grows with G (more all-reduce time for GRPO to hide behind)
    if G > 1:
        assert n > L.population_bound(G - 1, **p, B_essa=7)


def test_presets_and_projection() -> None:
    assert set(L.PRESETS) == {"7b-h100", "32b-h100", "72b-h100"}
    p32 = L.PRESETS["32b-h100"]
    assert p32.M_params == pytest.approx(2 * 32.5e9)
    assert p32.eta_fb == pytest.approx(6 * 32.5e9 / (0.40 * 989e12))
    assert p32.eta_gen == pytest.approx(2 * 32.5e9 / (0.10 * 989e12))
    assert p32.peak_bw(8) == 900e9 and p32.peak_bw(16) == 50e9
    assert all(p.notes for p in L.PRESETS.values())
    w = L.Workload()
    proj = L.project(p32, w)
    assert list(proj["G"]) == [8, 16, 32, 64, 128, 256, 512, 1024]
    for row in proj.itertuples():
        bw = p32.peak_bw(row.G)
        common = {"m_fb": w.m_fb, "eta_fb": p32.eta_fb, "m_gen": w.m_gen, "eta_gen": p32.eta_gen}
        tg = L.t_grad_star(row.G, B_grad=w.B_grad, M_params=p32.M_params, peak_bw=bw, **common)
        te = L.t_essa(row.G, N_pop=w.N_pop, B_essa=w.B_essa, m_gen=w.m_gen, eta_gen=p32.eta_gen, peak_bw=bw)
        assert row.t_grad_star == pytest.approx(tg) and row.t_essa == pytest.approx(te)
        assert row.speedup == pytest.approx(tg / te)
        assert row.n_pop_bound == math.floor(
            L.population_bound(row.G, B_grad=w.B_grad, M_params=p32.M_params, peak_bw=bw, B_essa=w.B_essa, **common)
        )
    assert (np.diff(proj["n_pop_bound"]) >= 0).all()
    assert (np.diff(proj["t_essa"]) < 0).all()


def test_fit_eta_gen() -> None:
    stats = pd.DataFrame({"run": ["a", "a", "a", "b", "b"], "tokens": [10, 20, 0, 30, 40], "generate_s": [1.0, 2.0, 0.5, 6.0, 8.0]})
    fit = L.fit_eta_gen(stats)
    assert fit.eta_gen == pytest.approx(17.0 / 100.0)  # the zero-token cell is skipped
    assert fit.tokens == 100 and fit.cells == 4
    assert fit.per_run == pytest.approx({"a": 0.1, "b": 0.2})
    with pytest.raises(ValueError, match="no"):
        L.fit_eta_gen(stats[stats["tokens"] == 0])


def test_predict_measured() -> None:
    m = pd.DataFrame(
        {
            "world_size": [1, 4],
            "popsize": [8, 8],
            "batch_size": [4, 4],
            "tokens_per_sample": [2.0, 2.0],
            "iter_s": [0.7, 0.2],
            "generate_s": [0.64, 0.17],
        }
    )
    out = L.predict_measured(m, 0.01, peak_bw=1e12)
    assert out["predicted_s"].tolist() == pytest.approx([0.64, 0.16], rel=1e-9)
    assert out["generate_over_predicted"].tolist() == pytest.approx([1.0, 0.17 / 0.16], rel=1e-6)
    curve = L.predict_curve([1, 2, 4], N_pop=8, B_essa=4, m_gen=2.0, eta_gen=0.01, peak_bw=1e12)
    assert curve == pytest.approx([0.64, 0.32, 0.16], rel=1e-9)
