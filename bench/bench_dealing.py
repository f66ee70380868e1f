"""Balanced dealing when world > λ: a fake-backend scaling run over rank counts, one process.

Every simulated rank evaluates its share of one generation (dist.assign, or the earlier per-candidate
rule for comparison) on the fake backend; ranks run in parallel on a cluster, so a generation lasts as
long as its busiest rank. With generation time proportional to samples (the fake backend's
fake_sleep_s per sample), efficiency = (λ·B / world) / the busiest rank's samples, counted from what
the backend actually returned; the latency model's prediction (analysis.latency.dealing_efficiency)
is written beside it, and the rewards combined from the records are checked equal to one rank's.
Wall times per rank are recorded too (``--sleep`` > 0), but on a shared, loaded machine they measure
the machine's contention more than the dealing. docs/design.md, "Balanced dealing".

    python bench/bench_dealing.py [--popsize 48] [--batch 256] [--sleep 0] [--worlds 48,64,96,100,128]
        -> bench/results/dealing.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from essa_hpc import dist
from essa_hpc.analysis import latency
from essa_hpc.backends.base import Request
from essa_hpc.backends.fake import FakeBackend
from essa_hpc.config import BackendSection
from essa_hpc.phases import PHASES

REPO = Path(__file__).resolve().parents[1]


def per_candidate(popsize: int, batch: int, world: int) -> list[list[dist.Work]]:
    """The earlier rule (before balanced dealing): rank r works for candidate r mod λ, splitting it
    evenly with the other ranks of that candidate."""
    table: list[list[dist.Work]] = [[] for _ in range(world)]
    for c in range(popsize):
        ranks = list(range(c, world, popsize))
        bounds = np.linspace(0, batch, len(ranks) + 1).round().astype(int)
        for part, (r, lo, hi) in enumerate(zip(ranks, bounds[:-1], bounds[1:])):
            if hi > lo:
                table[r].append(dist.Work(c, part, int(lo), int(hi)))
    return table


def evaluate(table: list[list[dist.Work]], backend: FakeBackend, population: np.ndarray) -> tuple[int, float, np.ndarray]:
    """(busiest rank's completions, its wall seconds, per-candidate mean rewards from the records)."""
    popsize = population.shape[0]
    seeds = np.arange(popsize, dtype=np.uint64)
    slots = max(1, max(len(ws) for ws in table))
    recs = np.zeros((len(table), slots), dtype=dist.RECORD)
    most, worst = 0, 0.0
    for r, works in enumerate(table):
        mine = sorted({w.cand for w in works})
        row = {c: i for i, c in enumerate(mine)}
        requests = [Request(row[w.cand], "", dist.sample_seed(w.cand, p)) for w in works for p in range(w.lo, w.hi)]
        t0 = time.perf_counter()
        done = backend.generate(population[mine], requests) if requests else []
        worst = max(worst, time.perf_counter() - t0)
        most = max(most, len(done))
        rewards = np.array([float(c.text) for c in done])
        packed = dist.pack(
            dist.scored(works, seeds, rewards, np.ones(len(done), dtype=np.int64)), dist.Report(0, 0, 0, b"\0" * 16, np.zeros(len(PHASES)))
        )
        recs[r, : len(packed)] = packed
    return most, worst, dist.unpack(recs, table, popsize, seeds).rewards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--popsize", type=int, default=48)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--sleep", type=float, default=0.0, help="fake_sleep_s: seconds per sample (0: count samples only)")
    ap.add_argument("--worlds", default="48,64,96,100,128")
    args = ap.parse_args()
    backend = FakeBackend(BackendSection(name="fake", fake_dim=16, fake_noise=0.1, fake_sleep_s=args.sleep))
    population = np.random.default_rng(0).normal(size=(args.popsize, 16))
    mean_load = args.popsize * args.batch
    _, _, reference = evaluate(dist.assign(args.popsize, args.batch, 1), backend, population)
    rows = []
    for world in (int(w) for w in args.worlds.split(",")):
        row: dict[str, object] = {"world": world, "popsize": args.popsize, "batch": args.batch}
        for name, table, rule in (
            ("balanced", dist.assign(args.popsize, args.batch, world), "balanced"),
            ("per_candidate", per_candidate(args.popsize, args.batch, world), "candidate"),
        ):
            most, seconds, rewards = evaluate(table, backend, population)
            if not np.array_equal(rewards, reference):
                raise SystemExit(f"{name} dealing on {world} ranks changed the rewards")
            row[f"{name}_busiest_samples"] = most
            row[f"{name}_efficiency"] = mean_load / world / most
            row[f"{name}_efficiency_model"] = latency.dealing_efficiency(args.popsize, args.batch, world, rule)
            if args.sleep > 0:
                row[f"{name}_busiest_wall_s"] = seconds
        rows.append(row)
        print(json.dumps(row))
    out = REPO / "bench" / "results" / "dealing.json"
    out.write_text(json.dumps({"sleep_s_per_sample": args.sleep, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
