"""The communicator's pure parts: work assignment, exact fixed-point sums, record checks, seeds."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from essa_hpc import dist


@given(st.integers(1, 40), st.integers(1, 50), st.integers(1, 9))
def test_assign_covers_every_prompt_of_every_candidate_once(lam: int, batch: int, world: int) -> None:
    table = dist.assign(lam, batch, world)
    assert len(table) == world
    seen = np.zeros((lam, batch), dtype=int)
    for works in table:
        for w in works:
            seen[w.cand, w.lo : w.hi] += 1
    assert (seen == 1).all()
    if lam >= world:  # round-robin, whole candidates
        assert all(w.lo == 0 and w.hi == batch for ws in table for w in ws)
        assert max(len(ws) for ws in table) - min(len(ws) for ws in table) <= 1


def test_assign_splits_candidates_when_world_is_larger() -> None:
    table = dist.assign(2, 10, 4)
    assert [(w.cand, w.lo, w.hi) for ws in table for w in ws] == [(0, 0, 5), (1, 0, 5), (0, 5, 10), (1, 5, 10)]


def test_fixed_point_sums_are_split_independent() -> None:
    rng = np.random.default_rng(0)
    v = rng.normal(size=101) * 3.7
    whole = dist.to_fixed(v)
    for cut in (1, 17, 50, 100):
        assert dist.to_fixed(v[:cut]) + dist.to_fixed(v[cut:]) == whole
    assert abs(whole / dist.FIXED_POINT - v.sum()) < 1e-7


def test_fixed_point_refuses_nan_and_huge() -> None:
    with pytest.raises(dist.DistError, match="NaN"):
        dist.to_fixed(np.array([1.0, np.nan]))
    with pytest.raises(dist.DistError, match="too large"):
        dist.to_fixed(np.array([1e12]))


def _records(table: list[list[dist.Work]], seeds: np.ndarray, values: np.ndarray) -> np.ndarray:
    slots = max(1, max(len(w) for w in table))
    recs = np.zeros((len(table), slots), dtype=dist.RECORD)
    for r, works in enumerate(table):
        for i, w in enumerate(works):
            recs[r, i]["valid"], recs[r, i]["cand"], recs[r, i]["part"] = 1, w.cand, w.part
            recs[r, i]["seed"], recs[r, i]["n"] = seeds[w.cand], w.hi - w.lo
            recs[r, i]["reward_fx"] = dist.to_fixed(values[w.cand, w.lo : w.hi])
    return recs


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_combine_identical_for_every_world_size(world: int) -> None:
    lam, batch = 5, 12
    values = np.random.default_rng(1).normal(size=(lam, batch))
    seeds = np.arange(lam, dtype=np.uint64) + 10
    ref, _, _ = dist.combine(_records(dist.assign(lam, batch, 1), seeds, values), lam)
    table = dist.assign(lam, batch, world)
    recs = _records(table, seeds, values)
    dist.check_records(recs, table, lam, seeds)
    mean, n, _ = dist.combine(recs, lam)
    assert np.array_equal(mean, ref) and (n == batch).all()


def test_check_records_names_what_is_wrong() -> None:
    table = dist.assign(4, 3, 2)
    seeds = np.arange(4, dtype=np.uint64)
    recs = _records(table, seeds, np.zeros((4, 3)))
    bad = recs.copy()
    bad[1, 0]["seed"] = 99
    with pytest.raises(dist.DistError, match="rank 1: seed of candidate 1"):
        dist.check_records(bad, table, 4, seeds)
    bad = recs.copy()
    bad[0, 1]["valid"] = 0
    with pytest.raises(dist.DistError, match="rank 0 sent 1 records, expected 2"):
        dist.check_records(bad, table, 4, seeds)


def test_seeds_are_stable_and_distinct() -> None:
    s = {dist.candidate_seed(1234, g, c) for g in range(20) for c in range(50)}
    assert len(s) == 1000
    assert dist.candidate_seed(1234, 3, 4) == dist.candidate_seed(1234, 3, 4)
    assert dist.sample_seed(5, 1) < 2**63


def test_diverged_ranks() -> None:
    assert dist.diverged_ranks([b"a", b"a", b"b", b"a"]) == [2]


def test_single_process_comm() -> None:
    comm = dist.Comm(None)
    recs = np.zeros(2, dtype=dist.RECORD)
    assert comm.allgather_records(recs, 3).shape == (1, 3)
    assert comm.allgather(5) == [5] and comm.bcast(7) == 7
