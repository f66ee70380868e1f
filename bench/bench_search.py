"""Optimizer overhead per generation: ask + tell (+ digest, state size) for ESSA-sized problems.

``overhead(d, popsize, diagonal, repeats)`` is importable (the MPI Allgather timing builds on it);
``python bench/bench_search.py`` runs the grid d in {1792, 7168, 20480} x λ in {24, 96, 400} x
{sep-CMA, full CMA} and writes bench/results/search.json. Full CMA keeps C and its eigenvectors B
(2 d² float64) and eigendecomposes C lazily (every ~1/(10 d (c1 + cμ)) generations, O(d³)), so its
per-generation time is reported as mean and max over several generations together with the number of
eigendecompositions that fell into the window. Configurations that cannot run here are recorded with a
reason and an extrapolated cost instead of being timed.

Timings are wall-clock on whatever machine runs this; the figures in search.json say which one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cma

from essa_hpc.search.cma_es import BLAS_PINNING, CMAES, _blas_limit

DIMS = (1792, 7168, 20480)
POPSIZES = (24, 96, 400)
TARGET = {"d": 1792, "popsize": 96, "ask_tell_ms": 50.0}
FULL_MEMORY_LIMIT_BYTES = 4 * 2**30  # C + B (+ eigh workspace of the same size) must fit a shared 24 GiB machine
FULL_EIGH_LIMIT_S = 60.0  # one O(d³) eigendecomposition longer than this is not timed here


def _fitness(X: np.ndarray, shift: np.ndarray) -> np.ndarray:
    return ((X - shift) ** 2).sum(axis=1)


def eigh_seconds(d: int, threads: int = 1, seed: int = 0) -> float:
    """Wall time of one ``np.linalg.eigh`` of a d x d SPD matrix under the optimizer's BLAS pinning."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((d, d)) / np.sqrt(d)
    c = a @ a.T + np.eye(d)
    with _blas_limit(threads):
        t = time.perf_counter()
        np.linalg.eigh(c)
        return time.perf_counter() - t


def lazy_gap(d: int, popsize: int) -> float:
    """Generations between two eigendecompositions of pycma's full CMA (its ``lazy_update_gap``)."""
    opts = cma.CMAOptions({"popsize": popsize, "verbose": -9}).complement()
    opts.evalall({"N": d})
    sp = cma.options_parameters.CMAParameters(d, opts, verbose=False)
    return 1.0 / (sp.c1 + sp.cmu + 1e-23) / d / 10  # as in CMAEvolutionStrategy.__init__


def overhead(
    d: int,
    popsize: int,
    diagonal: bool,
    repeats: int = 10,
    *,
    warmup: int = 2,
    seed: int = 0,
    blas_threads: int = 1,
    digest: bool = True,
) -> dict[str, Any]:
    """Time ``repeats`` generations of ask + tell (fitness excluded) after ``warmup`` generations.

    Returns plain data: per-generation ask, tell and ask+tell milliseconds (mean, max), digest time,
    pickled state size, and (full CMA) the eigendecompositions inside the timed window.
    """
    shift = np.linspace(-1.0, 1.0, d)
    t0 = time.perf_counter()
    opt = CMAES(d, popsize, 0.5, seed, diagonal=diagonal, blas_threads=blas_threads)
    init_s = time.perf_counter() - t0
    for g in range(warmup):
        X = opt.ask(g)
        opt.tell(X, _fitness(X, shift))
    sm = opt._es.sm
    eig0 = int(getattr(sm, "count_eigen", 0))
    ask_ms, tell_ms, digest_ms = [], [], []
    for g in range(warmup, warmup + repeats):
        t0 = time.perf_counter()
        X = opt.ask(g)
        t1 = time.perf_counter()
        f = _fitness(X, shift)
        t2 = time.perf_counter()
        opt.tell(X, f)
        t3 = time.perf_counter()
        if digest:
            opt.digest()
        t4 = time.perf_counter()
        ask_ms.append(1e3 * (t1 - t0))
        tell_ms.append(1e3 * (t3 - t2))
        digest_ms.append(1e3 * (t4 - t3))
    gen_ms = np.add(ask_ms, tell_ms)
    state_bytes = len(opt.state_dict()["es"])
    return {
        "d": d,
        "popsize": popsize,
        "mode": "sep-CMA (diagonal)" if diagonal else "full CMA",
        "diagonal": diagonal,
        "step_size_control": type(opt._es.adapt_sigma).__name__,
        "repeats": repeats,
        "warmup": warmup,
        "init_s": round(init_s, 4),
        "ask_ms_mean": round(float(np.mean(ask_ms)), 3),
        "tell_ms_mean": round(float(np.mean(tell_ms)), 3),
        "ask_tell_ms_mean": round(float(np.mean(gen_ms)), 3),
        "ask_tell_ms_max": round(float(np.max(gen_ms)), 3),
        "digest_ms_mean": round(float(np.mean(digest_ms)), 3) if digest else None,
        "state_bytes": state_bytes,
        "eigendecompositions": int(getattr(sm, "count_eigen", 0)) - eig0 if not diagonal else 0,
        "lazy_gap_generations": None if diagonal else round(lazy_gap(d, popsize), 2),
        "blas_pinning": BLAS_PINNING,
        "blas_threads": blas_threads,
    }


def full_skip_reason(d: int, popsize: int, eigh_ref: tuple[int, float]) -> tuple[str, dict[str, Any]] | None:
    """Why full CMA at dimension d is not timed here (None when it is), with extrapolated costs."""
    mem = 2 * d * d * 8
    ref_d, ref_s = eigh_ref
    eigh_est = ref_s * (d / ref_d) ** 3
    est = {
        "C_plus_B_bytes": mem,
        "eigh_s_extrapolated": round(eigh_est, 1),
        "lazy_gap_generations": round(lazy_gap(d, popsize), 2),
        "eigh_s_per_generation_amortized": round(eigh_est / max(lazy_gap(d, popsize), 1.0), 1),
    }
    if mem > FULL_MEMORY_LIMIT_BYTES:
        return (
            f"full CMA keeps C and B: 2·d²·8 B = {mem / 2**30:.1f} GiB (+ eigh workspace), over the "
            f"{FULL_MEMORY_LIMIT_BYTES / 2**30:.0f} GiB allowed on this shared machine"
        ), est
    if eigh_est > FULL_EIGH_LIMIT_S:
        return (
            f"one O(d³) eigendecomposition ≈ {eigh_est:.0f} s single-threaded here (extrapolated from "
            f"{ref_s:.2f} s at d = {ref_d}), over the {FULL_EIGH_LIMIT_S:.0f} s budget per configuration"
        ), est
    return None


def machine() -> dict[str, Any]:
    return {
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cma": cma.__version__,
        "blas_pinning": BLAS_PINNING,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "search.json"))
    ap.add_argument("--dims", type=int, nargs="*", default=list(DIMS))
    ap.add_argument("--popsizes", type=int, nargs="*", default=list(POPSIZES))
    ap.add_argument("--repeats-diag", type=int, default=20)
    ap.add_argument("--repeats-full", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads inside ask/tell (pinned on every rank)")
    args = ap.parse_args(argv)

    info = machine()
    ref_d = min(args.dims)
    eigh_ref = (ref_d, eigh_seconds(ref_d, args.threads))
    info["eigh_s"] = {str(ref_d): round(eigh_ref[1], 3)}
    rows: list[dict[str, Any]] = []
    for d in args.dims:
        for lam in args.popsizes:
            for diagonal in (True, False):
                skip = None if diagonal else full_skip_reason(d, lam, eigh_ref)
                if skip is not None:
                    reason, est = skip
                    rows.append({"d": d, "popsize": lam, "mode": "full CMA", "diagonal": False, "skipped": reason, **est})
                    print(f"d={d:6d} λ={lam:4d} full CMA  skipped: {reason}", flush=True)
                    continue
                r = overhead(d, lam, diagonal, args.repeats_diag if diagonal else args.repeats_full, blas_threads=args.threads)
                rows.append(r)
                print(
                    f"d={d:6d} λ={lam:4d} {r['mode']:18s} ask+tell {r['ask_tell_ms_mean']:9.2f} ms mean "
                    f"{r['ask_tell_ms_max']:9.2f} ms max  digest {r['digest_ms_mean']:7.2f} ms  eigh {r['eigendecompositions']}",
                    flush=True,
                )
    target = next((r for r in rows if r["d"] == TARGET["d"] and r["popsize"] == TARGET["popsize"] and r["diagonal"]), None)
    full = next((r for r in rows if r["d"] == TARGET["d"] and r["popsize"] == TARGET["popsize"] and not r["diagonal"]), None)
    verdict = {
        **TARGET,
        "sep_cma_ms": None if target is None else target["ask_tell_ms_mean"],
        "full_cma_ms": None if full is None or "skipped" in full else full["ask_tell_ms_mean"],
    }
    verdict["met_by"] = [
        m
        for m, v in (("sep-CMA", verdict["sep_cma_ms"]), ("full CMA", verdict["full_cma_ms"]))
        if v is not None and v < TARGET["ask_tell_ms"]
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": info, "target": verdict, "results": rows}, indent=2) + "\n")
    tmp.replace(out)
    print(f"target d={TARGET['d']} λ={TARGET['popsize']} < {TARGET['ask_tell_ms']} ms met by: {verdict['met_by'] or 'none'}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
