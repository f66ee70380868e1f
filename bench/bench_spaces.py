"""The search spaces on one model (CPU): evaluation cost against plain generation, update cost, memory,
and what crosses the network per generation (docs/design.md, "Search spaces").

For λ in --popsizes, N = λ · --prompts sequences (greedy, exactly --max-new-tokens each, EOS ignored):

  plain     our decode loop on the unwrapped base model, all N sequences in one batched loop
  lowrank   the same N sequences spread over λ candidates (candidate = i mod λ), one batched loop with
            every row's own rank-r term (spaces/lowrank.py); ratio = plain seconds / lowrank seconds
  full      the same sequences one candidate at a time (perturb in place, decode its share, restore);
            per candidate seconds / plain seconds of the same sequences (timed on --full-candidates)

plus the update cost of one generation (``space.apply`` of λ/2 antithetic rows), the peak RSS growth of
each phase over the resident model (VmHWM after a reset through /proc/self/clear_refs; the model is
loaded before), the bytes a seeded space keeps beside the model (float32 masters, tables), and the
Allgather bytes per generation (dist.RECORD records) next to what es-at-scale broadcasts per step
(every perturbed parameter, in the model's dtype).

The machine this runs on may be shared and busy: timings use one torch thread and process-CPU seconds
for the ratios (wall seconds are reported too); treat them as indicative.

    nice -n 19 env PYTHONPATH=$PWD .venv/bin/python bench/bench_spaces.py --model tiny     # seconds
    nice -n 19 env PYTHONPATH=$PWD .venv/bin/python bench/bench_spaces.py --model embedded # the embedded 135M model
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from essa_hpc import dist, models
from essa_hpc.backends.base import Request
from essa_hpc.backends.hf import HFBackend
from essa_hpc.config import ALL_TARGETS, ModelSection
from essa_hpc.search import ES
from essa_hpc.spaces.full import FullSpace
from essa_hpc.spaces.lowrank import LowRankSpace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval import timed

PROMPTS = ["What is 12 + 7?", "Name a prime number.", "2, 4, 6, what comes next?", "Say hello."]


# (hidden, intermediate, attention heads, kv heads) from the models' published config.json files (the
# ratio is the same in every layer, so the layer count drops out):
# the lowrank tables' size relative to the weights is arithmetic in these, so it is projected, not run
PROJECTED = {
    "Qwen2.5-7B": (3584, 18944, 28, 4),
    "Llama-3.1-8B": (4096, 14336, 32, 8),
    "Qwen2.5-32B": (5120, 27648, 40, 8),
    "Qwen2.5-72B": (8192, 29568, 64, 8),
}


def tables_vs_weights(hidden: int, inter: int, heads: int, kv: int, lam: int, rank: int) -> float:
    """λ·r·Σ(m + n) / Σ m·n over every attention and MLP projection: the lowrank tables (one rank-r pair
    per candidate and matrix, in the model's dtype) against the weights they perturb."""
    kv_out = kv * (hidden // heads)
    shapes = [(hidden, hidden), (kv_out, hidden), (kv_out, hidden), (hidden, hidden), (inter, hidden), (inter, hidden), (hidden, inter)]
    return lam * rank * sum(m + n for m, n in shapes) / sum(m * n for m, n in shapes)


def load(name: str) -> Any:
    if name == "tiny":
        return models.tiny_model(0)
    return models.load(ModelSection(dtype="float32"))


def param_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["tiny", "embedded"], default="tiny")
    ap.add_argument("--popsizes", type=int, nargs="+", default=[32, 96])
    ap.add_argument("--prompts", type=int, default=1, help="sequences per candidate")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--full-candidates", type=int, default=4, help="candidates timed for the full space (a rate needs no more)")
    ap.add_argument("--out", default="bench/results/spaces.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    loaded = load(args.model)
    model, tok = loaded.model, loaded.tokenizer
    model_mb = param_bytes(model) / 2**20
    result: dict[str, Any] = {
        "model": args.model,
        "params": sum(p.numel() for p in model.parameters()),
        "model_MB": model_mb,
        "max_new_tokens": args.max_new_tokens,
        "rank": args.rank,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "note": "shared, busy CPU machine: one torch thread, ratios from process-CPU seconds; indicative only",
        "popsizes": {},
    }
    gen_kw = {"max_new_tokens": args.max_new_tokens, "ignore_eos": True}
    plain = HFBackend(model, tok, None, max_new_tokens=args.max_new_tokens)
    for lam in args.popsizes:
        n = lam * args.prompts
        reqs = [Request(i % lam, PROMPTS[(i // lam) % len(PROMPTS)], i) for i in range(n)]
        row: dict[str, Any] = {"sequences": n}
        w, c, mb, _ = timed(plain.generate, None, [Request(0, r.prompt, r.seed) for r in reqs], **gen_kw)
        row["plain"] = {"wall_s": w, "cpu_s": c, "peak_MB": mb}

        es = ES(3, lam, 0.01, 0.001, seed=0, seeded=True)
        X = es.ask(0)
        low = LowRankSpace(loaded, ALL_TARGETS, args.rank, 0, args.model)
        lb = HFBackend(model, tok, low, max_new_tokens=args.max_new_tokens)
        tables_mb = sum(sum(t.numel() * t.element_size() for t in tab) for tab in low.tables(X, torch.float32, "cpu")) / 2**20
        w, c, mb, _ = timed(lb.generate, X, reqs, **gen_kw)
        row["lowrank"] = {"wall_s": w, "cpu_s": c, "peak_MB": mb, "tables_MB": tables_mb, "throughput_vs_plain": row["plain"]["cpu_s"] / c}
        es.tell(X, -np.random.default_rng(0).normal(size=lam))
        w, c, mb, _ = timed(low.apply, es)
        row["lowrank"]["update"] = {"wall_s": w, "cpu_s": c, "peak_MB": mb}
        lb.close()

        full = FullSpace(loaded, ALL_TARGETS, 0, args.model)
        master_mb = sum(t.master.numel() * 4 for t in full.weights.targets) / 2**20
        fb = HFBackend(model, tok, full, max_new_tokens=args.max_new_tokens)
        k = min(args.full_candidates, lam)
        sub = [r for r in reqs if r.candidate < k]
        w, c, mb, _ = timed(fb.generate, X, sub, **gen_kw)
        _, pc, _, _ = timed(plain.generate, None, [Request(0, r.prompt, r.seed) for r in sub], **gen_kw)
        one = [Request(0, r.prompt, r.seed) for r in sub if r.candidate == 0]
        _, pc1, _, _ = timed(plain.generate, None, one, **gen_kw)
        row["full"] = {
            "candidates_timed": k,
            "cpu_s_per_candidate": c / k,
            "wall_s_per_candidate": w / k,
            "plain_cpu_s_one_candidates_sequences": pc1,
            "per_candidate_vs_plain_same_sequences": (c / k) / pc1,
            "plain_cpu_s_all_timed_sequences_one_batch": pc,
            "sequential_vs_plain_one_batch": c / pc,
            "peak_MB": mb,
            "master_copy_MB": master_mb,
            "memory_vs_model": (model_mb + master_mb) / model_mb,
        }
        es2 = ES(3, lam, 0.01, 0.001, seed=0, seeded=True)
        X2 = es2.ask(0)
        es2.tell(X2, -np.random.default_rng(1).normal(size=lam))
        w, c, mb, _ = timed(full.apply, es2)
        row["full"]["update"] = {"wall_s": w, "cpu_s": c, "peak_MB": mb}
        row["lowrank"]["memory_vs_model"] = (model_mb + tables_mb) / model_mb

        for world in (1, 8):
            slots = -(-lam // world)
            row[f"allgather_bytes_per_generation_world{world}"] = world * slots * dist.RECORD.itemsize
        perturbed = sum(t.param.numel() * t.param.element_size() for t in full.weights.targets)
        row["es_at_scale_broadcast_bytes_per_step"] = perturbed
        result["popsizes"][str(lam)] = row
        print(json.dumps({lam: row}, indent=1), flush=True)
    result["projected_lowrank_tables_vs_weights"] = {
        name: {str(lam): tables_vs_weights(*dims, lam, args.rank) for lam in args.popsizes} for name, dims in PROJECTED.items()
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
