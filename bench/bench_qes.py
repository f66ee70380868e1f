"""QES cost next to plain quantized inference (essa_hpc/spaces/qes.py; docs/design.md, QES).

For one quantized model (int8 or int4, the hf backend's torchao layouts) and one population, each in
its own process so that peak memory is the process's own:

* ``plain``: the λ candidates' generate calls (one call of ``batch`` prompts per candidate) on the
  unperturbed quantized model; peak RSS (VmHWM) and seconds.
* ``replay`` / ``stored``: the same calls with each candidate applied to the codes before its call and
  restored after it, then the integer ES update with the residual replayed from seeds or stored; per
  generation: seconds (generate, perturb + restore, update), code flips; peak RSS over all generations.

The figures: peak memory ÷ plain, seconds per generation ÷ plain, flips per generation, and replay
against stored (the final residuals' largest difference, the bytes each keeps, update seconds).
Rewards are random numbers (the bench measures cost, not learning), drawn from a fixed seed.

    .venv/bin/python bench/bench_qes.py [--model embedded:smollm2-135m-instruct|tiny] [--scheme int8]
        [--popsize 8] [--batch 4] [--tokens 16] [--generations 6] [--window 4]   -> bench/results/qes.json

Timings on a shared machine are noisy; each figure is from one process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPTS = [
    f"What is {a} + {b}? Answer with the number." for a, b in ((12, 7), (30, 45), (8, 91), (66, 23), (5, 5), (71, 18), (40, 2), (13, 88))
]


def peak_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024
    return float("nan")


def load(model: str, scheme: str) -> Any:
    import torch

    from essa_hpc import models
    from essa_hpc.config import ModelSection
    from essa_hpc.quantize import quantize_model

    torch.set_num_threads(1)
    if model == "tiny":
        loaded = models.tiny_model(seed=0, hidden_size=64, layers=2)
    else:
        models.resolve_source(ModelSection(path=model))
        loaded = models.load(ModelSection(path=model, device="cpu", dtype="float32"))
    quantize_model(loaded.model, scheme)
    return loaded


def child(args: argparse.Namespace) -> dict[str, Any]:
    from essa_hpc import models
    from essa_hpc.backends.base import Request
    from essa_hpc.backends.hf import HFBackend
    from essa_hpc.search.es import ES
    from essa_hpc.spaces import qes
    from essa_hpc.spaces.base import SEED_CODE_WIDTH

    loaded = load(args.model, args.scheme)
    hf = HFBackend(loaded.model, loaded.tokenizer, None, max_new_tokens=args.tokens, ignore_eos=True)
    prompts = [models.render_chat(loaded.tokenizer, p) for p in PROMPTS[: args.batch]]
    requests = [Request(0, p, 0) for p in prompts]
    space = None
    if args.child != "plain":
        space = qes.QESSpace(qes.find_codes(loaded.model), 1, window=args.window, residual=args.child)
    opt = ES(SEED_CODE_WIDTH, args.popsize, args.sigma, args.lr, 1, fitness_shaping="centered_ranks", seeded=True)
    hf.generate(None, requests[:1], max_new_tokens=2)  # warm-up (first-call allocations)
    rows = []
    for g in range(args.generations):
        t_gen = t_pert = t_upd = 0.0
        X = opt.ask(g)
        for c in range(args.popsize):
            t0 = time.perf_counter()
            p = space.perturb(X[c]) if space is not None else None
            t1 = time.perf_counter()
            hf.generate(None, requests)
            t2 = time.perf_counter()
            if space is not None and p is not None:
                space.restore(p)
            t3 = time.perf_counter()
            t_gen += t2 - t1
            t_pert += (t1 - t0) + (t3 - t2)
        opt.tell(X, np.random.default_rng((5, g)).normal(size=args.popsize))  # random rewards: cost, not learning
        flips = 0
        if space is not None:
            t0 = time.perf_counter()
            space.apply(opt)
            t_upd = time.perf_counter() - t0
            flips = space.last.flipped if space.last is not None else 0
        rows.append({"generate_s": t_gen, "perturb_restore_s": t_pert, "update_s": t_upd, "flips": flips})
    out: dict[str, Any] = {"mode": args.child, "peak_rss_mb": peak_mb(), "generations": rows}
    if space is not None:
        out["codes"] = sum(c.numel for c in space.codes)
        out["weight_digest"] = space.weight_digest()
        res = space.residual()
        out["residual_path"] = str(Path(args.scratch) / f"residual_{args.child}.npz")
        np.savez(out["residual_path"], *[r.numpy() for r in res])
        out["kept_bytes"] = sum(r.numel() * 4 for r in space.stored) if space.stored is not None else sum(h.nbytes for h in space.history)
    return out


def summarize(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    def per_gen(mode: str) -> float:
        rows = results[mode]["generations"][1:] or results[mode]["generations"]
        return float(np.median([r["generate_s"] + r["perturb_restore_s"] + r["update_s"] for r in rows]))

    plain = per_gen("plain")
    res = {m: np.load(results[m]["residual_path"]) for m in ("replay", "stored")}
    diff = max(float(np.abs(res["replay"][k] - res["stored"][k]).max()) for k in res["replay"].files)
    summary: dict[str, Any] = {
        "peak_memory_over_plain": {m: results[m]["peak_rss_mb"] / results["plain"]["peak_rss_mb"] for m in ("replay", "stored")},
        "seconds_per_generation_over_plain": {m: per_gen(m) / plain for m in ("replay", "stored")},
        "flips_per_generation": [r["flips"] for r in results["replay"]["generations"]],
        "codes": results["replay"]["codes"],
        "replay_vs_stored": {
            "max_abs_residual_difference": diff,
            "same_codes": results["replay"]["weight_digest"] == results["stored"]["weight_digest"],
            "kept_bytes": {m: results[m]["kept_bytes"] for m in ("replay", "stored")},
            "update_s_median": {m: float(np.median([r["update_s"] for r in results[m]["generations"]])) for m in ("replay", "stored")},
        },
    }
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--scheme", default="int8", choices=("int8", "int4"))
    p.add_argument("--popsize", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--generations", type=int, default=6)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--sigma", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=0.3)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "qes.json"))
    p.add_argument("--child", choices=("plain", "replay", "stored"), help=argparse.SUPPRESS)
    p.add_argument("--scratch", default="/tmp", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    results = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for mode in ("plain", "replay", "stored"):
        cmd = [sys.executable, __file__, "--child", mode, *sys.argv[1:]]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if r.returncode != 0:
            raise SystemExit(f"{mode}: exit {r.returncode}\n{r.stderr[-3000:]}")
        results[mode] = json.loads(r.stdout.strip().splitlines()[-1])
        print(mode, json.dumps({k: v for k, v in results[mode].items() if k != "generations"}), flush=True)
    doc = {
        "command": "python bench/bench_qes.py " + " ".join(sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "scratch", "out")},
        "note": "one process per mode on a shared, oversubscribed 2-core machine: timings are noisy",
        "summary": summarize(results, args),
        "runs": {m: {k: v for k, v in r.items() if k != "residual_path"} for m, r in results.items()},
    }
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["summary"], indent=1))


if __name__ == "__main__":
    main()
