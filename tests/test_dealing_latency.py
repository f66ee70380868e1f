"""Balanced dealing when world > λ (dist.assign) and the latency model's eq. (1) with its exact form
(analysis/latency.py); docs/design.md, "Balanced dealing" and "The paper's settings"."""

from __future__ import annotations

import math

import numpy as np
import pytest

from essa_hpc import dist
from essa_hpc.analysis import latency as L
from essa_hpc.phases import PHASES

P = {"B_grad": 100.0, "m_fb": 2.0, "eta_fb": 0.5, "m_gen": 3.0, "eta_gen": 1.0, "M_params": 1e9, "peak_bw": 1e9}


def per_candidate_rule(popsize: int, batch: int, world: int) -> list[int]:
    """Items per rank under the earlier rule: rank r works for candidate r mod λ, sharing it evenly."""
    ranks_of = [len(range(c, world, popsize)) for c in range(popsize)]
    load = [0] * world
    for r in range(world):
        c = r % popsize
        bounds = np.linspace(0, batch, ranks_of[c] + 1).round().astype(int)
        j = r // popsize
        load[r] = int(bounds[j + 1] - bounds[j])
    return load


@pytest.mark.parametrize(("lam", "batch", "world"), [(48, 256, 64), (48, 256, 128), (48, 256, 100), (5, 3, 7), (3, 10, 8), (7, 1, 9)])
def test_every_rank_gets_floor_or_ceil_of_the_mean(lam: int, batch: int, world: int) -> None:
    table = dist.assign(lam, batch, world)
    loads = [sum(w.hi - w.lo for w in ws) for ws in table]
    mean = lam * batch / world
    assert sum(loads) == lam * batch
    assert all(math.floor(mean) <= n <= math.ceil(mean) for n in loads)
    seen = np.zeros((lam, batch), dtype=int)
    for ws in table:
        for w in ws:
            seen[w.cand, w.lo : w.hi] += 1
    assert (seen == 1).all()
    parts = {}
    for ws in table:  # part numbers count a candidate's pieces from 0 in prompt order
        for w in ws:
            parts.setdefault(w.cand, []).append((w.lo, w.part))
    assert all([p for _, p in sorted(v)] == list(range(len(v))) for v in parts.values())
    assert max(loads) == L.busiest_items(lam, batch, world)


def test_world_a_multiple_of_lambda_keeps_one_candidate_per_rank() -> None:
    table = dist.assign(48, 256, 96)
    assert all(len(ws) == 1 and ws[0].cand == r % 48 and ws[0].part == r // 48 for r, ws in enumerate(table))


def test_efficiency_at_128_ranks_for_lambda_48_batch_256() -> None:
    assert L.dealing_efficiency(48, 256, 128) == 1.0
    assert L.busiest_items(48, 256, 128, "candidate") == max(per_candidate_rule(48, 256, 128)) == 128
    assert L.dealing_efficiency(48, 256, 128, "candidate") == pytest.approx(0.75)
    assert L.dealing_efficiency(48, 256, 64, "candidate") == pytest.approx(0.75)  # no faster than 48 ranks
    for world in (50, 64, 100, 128, 200):
        assert L.busiest_items(48, 256, world, "candidate") == max(per_candidate_rule(48, 256, world))
        assert L.dealing_efficiency(48, 256, world) >= 0.95


def test_sums_are_exact_whatever_the_dealing() -> None:
    lam, batch = 5, 12
    values = np.random.default_rng(3).normal(size=(lam, batch))
    seeds = np.arange(lam, dtype=np.uint64) + 7
    ref = None
    for world in (1, 6, 7, 11, 60):
        table = dist.assign(lam, batch, world)
        tokens = np.zeros(lam * batch, dtype=np.int64)
        scored = [
            dist.scored(ws, seeds, np.concatenate([values[w.cand, w.lo : w.hi] for w in ws] or [np.zeros(0)]), tokens) for ws in table
        ]
        report = dist.Report(0, 0, 0, b"\0" * dist.DIGEST_BYTES, np.zeros(len(PHASES)))
        slots = max(1, max(len(ws) for ws in table))
        recs = np.zeros((world, slots), dtype=dist.RECORD)
        for r, s in enumerate(scored):
            packed = dist.pack(s, report)
            recs[r, : len(packed)] = packed
        got = dist.unpack(recs, table, lam, seeds).rewards
        ref = got if ref is None else ref
        assert np.array_equal(got, ref)


def test_eq1_and_exact_form_hand_computed() -> None:
    # eq. (1): (100/5)·(1 + 1/3) + 2e9·9/(5·3·1e9)
    eq1 = L.population_bound_eq1(10, **P, B_essa=5)
    assert eq1 == pytest.approx(20 * 4 / 3 + 18 / 15, rel=1e-12)
    # exact: [100·4 + 2e9·9/1e9] / [5·3 + 8·9/1e9]
    exact = L.population_bound_exact(10, **P, B_essa=5)
    assert exact == pytest.approx((400 + 18) / (15 + 72e-9), rel=1e-12)
    assert exact < eq1 and exact == pytest.approx(eq1, rel=1e-8)
    assert L.M_ESSA_PAPER_BYTES == 8.0


@pytest.mark.parametrize("G", [2, 16, 128])
def test_exact_form_is_tight(G: int) -> None:
    n = L.population_bound_exact(G, **P, B_essa=7)
    t = L.t_essa(G, N_pop=n, B_essa=7, m_gen=P["m_gen"], eta_gen=P["eta_gen"], peak_bw=P["peak_bw"], M_essa=n * L.M_ESSA_PAPER_BYTES)
    assert t == pytest.approx(L.t_grad_star(G, **P), rel=1e-12)


def test_projection_shows_both_bounds_and_the_dealing() -> None:
    proj = L.project(L.PRESETS["32b-h100"], L.Workload(), [16, 64, 128])
    assert {"n_pop_eq1", "n_pop_exact", "dealing_efficiency", "dealing_efficiency_candidate"} <= set(proj.columns)
    assert (proj["n_pop_exact"] <= proj["n_pop_eq1"]).all()
    row = proj[proj["G"] == 128].iloc[0]
    assert row["dealing_efficiency"] == 1.0 and row["dealing_efficiency_candidate"] == pytest.approx(0.75)
