"""How much signal one ESSA generation sees around a trained SFT adapter: split-half reliability of candidate rewards.

CMA-ES ranks λ candidates by their mean reward on the generation's minibatch. That ranking is only as
good as its reliability: evaluate the same candidates on two disjoint prompt sets A and B (each of
``--prompts`` training questions, shared by all candidates) and correlate the scores across candidates.
A correlation near 0 means the ranking is noise, whatever the optimizer does with it. Candidates are
drawn as CMA-ES draws its first generation, x = σ0·z around the SFT adapter (x = 0), in the run's
parametrization, for three ways of scoring:

- ``greedy``: the default (temperature 0);
- ``sampled``: T > 0 with per-candidate sampling seeds (the run loop without common random numbers);
- ``crn``: T > 0 with the same seeds for every candidate per prompt (``search.common_random_numbers``).

It also reports the share of completions a candidate changes against x = 0 (same prompt, same seed) and
the candidates' mean reward change. Same task, data and SFT adapter as bench/bench_vs_grpo.py.

With ``--set search.space=lowrank`` (or ``full``, with ``--set search.optimizer=es``) it calibrates a
seeded space's σ instead: the start is the SFT merged into the base weights (as bench_vs_grpo.py's weight
variants start), and the candidates are the run's own generation 0 (es: antithetic pairs θ ± σ0·E drawn
from the space's noise), so the share of changed answers and the reward change say whether σ0 moves anything.

    python bench/bench_signal.py --sft-adapter ~/.cache/essa_hpc/bench/sft-<key> [--popsize 12 --prompts 48 --sigma0 1.0]
    python bench/bench_signal.py --sft-adapter … --modes greedy --sigma0 0.001 --set search.space=lowrank --set search.optimizer=es

Writes bench/results/signal.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from bench_vs_grpo import HELD_OUT, common_overrides, start_of, write_data  # noqa: E402

MODES = ("greedy", "sampled", "crn")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sft-adapter", required=True)
    ap.add_argument("--popsize", type=int, default=12)
    ap.add_argument("--prompts", type=int, default=48, help="prompts per half (A and B)")
    ap.add_argument("--sigma0", type=float, default=1.0)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides (e.g. lora.alpha_fraction=1.0)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--modes", type=lambda v: v.split(","), default=list(MODES), help=f"some of {','.join(MODES)}")
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "essa_hpc" / "bench" / "signal"))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "signal.json"))
    args = ap.parse_args()
    if not args.modes or set(args.modes) - set(MODES):
        raise SystemExit(f"--modes: got {args.modes}; expected some of {list(MODES)}")

    from essa_hpc import dist, models
    from essa_hpc.backends.base import Request
    from essa_hpc.config import load_config
    from essa_hpc.evaluation import build_evaluator
    from essa_hpc.search.factory import make_optimizer

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    train, held = write_data(work, HELD_OUT)
    ns = argparse.Namespace(held_out=HELD_OUT, max_new_tokens=args.max_new_tokens)
    start = start_of(args.set, Path(args.sft_adapter))  # lora.adapter, or model.path of the merged SFT
    over = [*common_overrides(train, held, ns), start, f"run.seed={args.seed}", "model.threads=0", *args.set]
    cfg = load_config(None, over)
    models.set_threads(0, 1)
    comm = dist.init()
    ev = build_evaluator(cfg, comm)
    rng = np.random.default_rng(args.seed)
    lam, n, dim = args.popsize, args.prompts, ev.dim
    if ev.space is not None and ev.space.seeded:  # the run's own generation 0 (es: antithetic seed codes); row 0: the merged SFT
        search = dataclasses.replace(cfg.search, popsize=lam, sigma0=args.sigma0)
        X = np.vstack([np.zeros(dim), make_optimizer(search, dim, args.seed, seeded=True).ask(0)])
    else:  # row 0: the SFT adapter itself
        X = np.vstack([np.zeros(dim), args.sigma0 * rng.standard_normal((lam, dim))])
    order = rng.permutation(len(ev.train))[: 2 * n]
    halves = {"A": [ev.train[i] for i in order[:n]], "B": [ev.train[i] for i in order[n:]]}
    result: dict[str, Any] = {}
    t0 = time.perf_counter()
    for mode in args.modes:
        temp = 0.0 if mode == "greedy" else args.temperature
        scores, texts = {}, {}
        for half, exs in halves.items():
            common = dist.common_seed(args.seed, 0 if half == "A" else 1)
            # x = 0 always samples with the shared seeds; candidates share them only under crn
            items = [
                (c, ex, dist.sample_seed(common if mode == "crn" or c == 0 else dist.candidate_seed(args.seed, 0, c), p))
                for c in range(lam + 1)
                for p, ex in enumerate(exs)
            ]
            reqs = [Request(c, ev.render(ex), s) for c, ex, s in items]
            outs = ev.backend.generate(X, reqs, temperature=temp)
            values = ev.task.reward([ex for _, ex, _ in items], [o.text for o in outs]).values
            scores[half] = values.reshape(lam + 1, n)
            texts[half] = np.array([o.text for o in outs], dtype=object).reshape(lam + 1, n)
        a, b = scores["A"].mean(axis=1), scores["B"].mean(axis=1)
        cand_a, cand_b = a[1:], b[1:]
        both = np.concatenate([scores["A"], scores["B"]], axis=1)
        changed = float(np.mean([texts[h][1:] != texts[h][0][None, :] for h in texts]))
        pearson = float(np.corrcoef(cand_a, cand_b)[0, 1]) if cand_a.std() > 0 and cand_b.std() > 0 else float("nan")
        ra, rb = np.argsort(np.argsort(cand_a)), np.argsort(np.argsort(cand_b))
        spearman = float(np.corrcoef(ra, rb)[0, 1]) if ra.std() > 0 and rb.std() > 0 else float("nan")
        delta = both[1:].mean(axis=1) - both[0].mean()
        result[mode] = {
            "temperature": temp,
            "x0_reward": float(both[0].mean()),
            "x0_accuracy": float((both[0] >= 1.0).mean()),
            "candidate_reward_mean": float(both[1:].mean()),
            "delta_points_mean": float(100 * delta.mean()),
            "delta_points_std_across_candidates": float(100 * delta.std()),
            "delta_points_best": float(100 * delta.max()),
            "share_of_completions_changed": float(changed),
            "split_half_pearson": pearson,
            "split_half_spearman": spearman,
            "half_scores": {"A": a.round(4).tolist(), "B": b.round(4).tolist()},
        }
        print(mode, json.dumps({k: v for k, v in result[mode].items() if k != "half_scores"}), flush=True)
    out = {
        "benchmark": "split-half reliability of ESSA candidate rewards around the SFT adapter (one generation's view)",
        "command": "python bench/bench_signal.py " + " ".join(sys.argv[1:]),
        "settings": {
            "popsize": lam,
            "prompts_per_half": n,
            "sigma0": args.sigma0,
            "dim": dim,
            "space": cfg.search.space,
            "parametrization": cfg.lora.parametrization,
            "alpha_fraction": cfg.lora.alpha_fraction,
            "temperature": args.temperature,
            "seed": args.seed,
            "sft_adapter": args.sft_adapter,
            "overrides": args.set,
        },
        "modes": result,
        "seconds": time.perf_counter() - t0,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    ev.backend.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
