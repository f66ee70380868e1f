"""Wall time per generation split by phase, and the overhead share, from a run's HDF5 log.

Overhead = everything except generate and reward (Allgather, tell, log, checkpoint, ask/prep), as a
share of the generation's wall time (validation reported separately: it is work, not overhead).

    .venv/bin/python bench/bench_run_overhead.py runs/default/log.h5   -> bench/results/run_overhead.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def split(path: Path) -> dict[str, object]:
    with h5py.File(path, "r", libver="latest", swmr=True) as f:
        t = f["gen/timings"][()]  # [G, R, K]
        phases = json.loads(f["gen/timings"].attrs["phases"])
        popsize, d, world = int(f.attrs["popsize"]), int(f.attrs["solution_length"]), int(f.attrs["world_size"])
    per_phase = {p: float(t[:, :, i].max(axis=1).mean()) for i, p in enumerate(phases)}  # slowest rank, mean over G
    work = per_phase["generate"] + per_phase["reward"]
    overhead = sum(v for p, v in per_phase.items() if p not in ("generate", "reward", "eval"))
    return {
        "log": str(path),
        "generations": int(t.shape[0]),
        "ranks": world,
        "popsize": popsize,
        "solution_length": d,
        "seconds_per_generation_by_phase": per_phase,
        "overhead_share": overhead / max(1e-12, work + overhead),
        "target": "overhead share < 2%",
    }


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: bench_run_overhead.py LOG.h5 [...]")
    rows = [split(Path(p)) for p in sys.argv[1:]]
    for r in rows:
        print(json.dumps(r, indent=1))
    out = REPO / "bench" / "results" / "run_overhead.json"
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
