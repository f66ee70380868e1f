"""Population evaluation throughput of the hf backend on the embedded model (CPU).

Generated tokens per second for the same N sequences (fixed prompts, greedy, exactly max_new_tokens
each: EOS ignored / min_new_tokens = max_new_tokens, so token counts are equal):

  (a)  plain base model: transformers ``generate`` on N sequences in one batch; (a') our decode loop on
       the unwrapped base model;
  (b)  our batched population evaluation: the N sequences spread over λ candidates (candidate = i mod λ),
       all in one batched decode loop with per-row singular values (HFBackend);
  (c)  the naive way: per candidate, rebuild its LoRA factors, load them into a peft model, and generate
       its N/λ sequences (timed on the first --naive-max-candidates candidates: a rate needs no more).

Plus the peak RSS growth per phase (VmHWM after resetting it through /proc/self/clear_refs, minus the
RSS before; both models, base and peft copy, stay resident throughout) and a check that a
candidate's greedy tokens are the same alone and inside the population batch. The machine is shared:
runs use one torch thread, rates are given per process-CPU second (the ratios) and per wall second
(ratios_wall), and (a) and (b) at the largest λ are repeated over ``--rounds`` keeping the best.

``--quantization`` (or ``--quantization-only``, merged into an existing result file) adds the dtype /
int8 comparison: accuracy and agreement with float32 on a fixed arithmetic set, and population
throughput, for float32, bfloat16 and torchao int8 weights.

    .venv/bin/python bench/bench_eval.py                       # ~10 min on the busy shared box
    .venv/bin/python bench/bench_eval.py --quantization-only   # ~5 min; both write bench/results/eval.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from essa_hpc import svd_lora
from essa_hpc.backends.base import Request
from essa_hpc.backends.hf import HFBackend
from essa_hpc.config import ModelSection
from essa_hpc.models import load, render_chat

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
SYSTEM = "Answer briefly."  # short prompts (~25 tokens): the figure of merit is generated tokens/s


def reset_peak() -> None:
    with contextlib.suppress(OSError):  # resets VmHWM (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")


def status_mb(field: str) -> float:
    """VmHWM (peak RSS since the last reset) or VmRSS from /proc/self/status, in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_adapter(model: Any, rank: int, seed: int, zero_b: bool = False) -> dict[str, torch.Tensor]:
    """A LoRA state dict on q/k/v/o of every layer (stand-in for an SFT adapter; B = 0 for a random init)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS and isinstance(mod, torch.nn.Linear):
            A = torch.randn(rank, mod.in_features, generator=g) / mod.in_features**0.5
            B = torch.zeros(mod.out_features, rank) if zero_b else torch.randn(mod.out_features, rank, generator=g) * 0.02
            sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = A, B
    return sd


def arithmetic(n: int, seed: int = 0) -> list[tuple[str, int]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a, b = (int(v) for v in rng.integers(10, 100, size=2))
        op = "+" if rng.random() < 0.5 else "-"
        out.append((f"What is {a} {op} {b}?", a + b if op == "+" else a - b))
    return out


def timed(fn: Any, *args: Any, **kw: Any) -> tuple[float, float, float, Any]:
    """(wall s, process CPU s, peak RSS growth MB, fn(*args, **kw)). With one torch thread the CPU time is the work
    done, free of the time other jobs on the shared box held the core; wall time is reported beside it.
    Memory: peak RSS during the call minus RSS before it (the resident models are not counted)."""
    reset_peak()
    before = status_mb("VmRSS")
    t, c = time.perf_counter(), time.process_time()
    result = fn(*args, **kw)
    return time.perf_counter() - t, time.process_time() - c, status_mb("VmHWM") - before, result


def hf_generate(model: Any, tok: Any, prompts: list[str], max_new: int) -> Any:
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    dev = next(model.parameters()).device  # the CPU here; CUDA when bench/gpu_check.py runs it
    enc = {k: v.to(dev) for k, v in enc.items()}
    with torch.inference_mode():
        return model.generate(**enc, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)


def naive(peft_model: Any, tok: Any, svd: Any, X: np.ndarray, prompts: list[str], max_new: int, max_candidates: int) -> int:
    """Per candidate: rebuild (A′, B′), load them into the peft model, generate its share.

    Only the first ``max_candidates`` candidates run (their shares have the size they have at this λ):
    a throughput figure needs no more, and the naive way is the slow one.
    """
    lam = X.shape[0]
    tokens = 0
    inner = peft_model.base_model.model
    for c in range(min(lam, max_candidates)):
        for name, (A, B) in svd.factors(X[c]).items():
            mod = inner.get_submodule(name)
            mod.lora_A["default"].weight.data.copy_(A.to(torch.float32))
            mod.lora_B["default"].weight.data.copy_(B.to(torch.float32))
        share = prompts[c::lam]
        out = hf_generate(peft_model, tok, share, max_new)
        tokens += len(share) * max_new
        del out
    return tokens


def quantization_section(args: argparse.Namespace, rounds: int) -> dict[str, Any]:
    """float32 vs bfloat16 vs torchao int8 weights, the SVD-LoRA wrappers on top (x = 0, B = 0).

    Accuracy: greedy with EOS on small sums (a, b in 1..20; correct when the sum appears as a number in
    the completion); speed: population of 8 candidates, fixed length (EOS ignored), best of ``rounds``.
    """
    import re

    from essa_hpc.quantize import quantize_model

    rng = np.random.default_rng(1)
    qa = [(int(a), int(b)) for a, b in rng.integers(1, 21, size=(args.quant_n, 2))]
    T = args.quant_max_new_tokens
    results: dict[str, Any] = {"n": args.quant_n, "max_new_tokens": T, "task": "What is a + b? (a, b in 1..20), greedy, chat template"}
    models: dict[str, Any] = {}
    for name in ("float32", "bfloat16", "int8"):
        lm = load(ModelSection(dtype="bfloat16" if name == "bfloat16" else "float32", device="cpu"))
        if name == "int8":
            t = time.perf_counter()
            quantize_model(lm.model, "int8")
            results["int8_quantize_s"] = time.perf_counter() - t
        # B = 0 (a random-init adapter): at x = 0 the wrapped model is the base model exactly
        svd = svd_lora.build(random_adapter(lm.model, args.rank, 7, zero_b=True), scaling=2.0, targets=TARGETS)
        models[name] = (lm, HFBackend(lm.model, lm.tokenizer, svd, max_new_tokens=T, max_batch_sequences=256))
    texts: dict[str, list[str]] = {}
    best: dict[str, float] = {}
    best_cpu: dict[str, float] = {}
    for name, (lm, be) in models.items():
        prompts = [render_chat(lm.tokenizer, f"What is {a} + {b}?") for a, b in qa]
        X = np.zeros((8, be.solution_length))
        reqs = [Request(i % 8, p, i) for i, p in enumerate(prompts)]
        texts[name] = [c.text for c in be.generate(X, reqs)]
        for _ in range(rounds):
            dt, cpu, _, _out = timed(lambda be=be, X=X, reqs=reqs: be.generate(X, reqs, ignore_eos=True))
            best[name] = max(best.get(name, 0.0), len(reqs) * T / dt)
            best_cpu[name] = max(best_cpu.get(name, 0.0), len(reqs) * T / cpu)
    for name in models:
        correct = [str(a + b) in re.findall(r"\d+", t) for (a, b), t in zip(qa, texts[name])]
        results[name] = {
            "accuracy": float(np.mean(correct)),
            "same_text_as_float32": int(sum(u == v for u, v in zip(texts[name], texts["float32"]))),
            "tokens_per_s_cpu": best_cpu[name],
            "tokens_per_s_wall": best[name],
        }
    results["example_float32"] = texts["float32"][:2]
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="sequences per measurement")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--lambdas", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0 = all usable cores); on the shared 2-core box 1 thread was 3-4x faster than 2",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="repetitions of (a) and (b) at the largest λ (all variants run in round 1); the best time is kept",
    )
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--naive-max-candidates", type=int, default=8, help="(c) runs the shares of this many candidates at most")
    ap.add_argument("--quantization", action="store_true", help="also compare float32 / bfloat16 / int8")
    ap.add_argument("--quantization-only", action="store_true", help="only the quantization comparison, merged into --out")
    ap.add_argument("--quant-n", type=int, default=48)
    ap.add_argument("--quant-max-new-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "eval.json"))
    args = ap.parse_args()

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    if args.quantization_only:
        out = Path(args.out)
        previous = json.loads(out.read_text()) if out.is_file() else {}
        previous["quantization"] = quantization_section(args, args.rounds)
        previous["quantization"]["machine"] = {"torch_threads": threads, "loadavg_after": os.getloadavg()}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(previous, indent=2) + "\n")
        print(json.dumps(previous["quantization"], indent=2))
        return
    load0 = os.getloadavg()
    t_load = time.perf_counter()
    lm = load(ModelSection(dtype="float32", device="cpu"))
    load_s = time.perf_counter() - t_load
    tok, model = lm.tokenizer, lm.model
    N, T = args.n, args.max_new_tokens
    prompts = [render_chat(tok, q, SYSTEM) for q, _ in arithmetic(N)]
    lens = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]

    sd = random_adapter(model, args.rank, seed=0)
    svd = svd_lora.build(sd, scaling=2.0, targets=TARGETS)
    rng = np.random.default_rng(0)
    pops = {lam: rng.normal(scale=0.3, size=(lam, svd.solution_length)) for lam in args.lambdas}

    peft_model = None
    if not args.no_naive:
        import peft

        peft_model = peft.get_peft_model(
            copy.deepcopy(model), peft.LoraConfig(r=args.rank, lora_alpha=2.0 * args.rank, target_modules=TARGETS)
        ).eval()
    base_be = HFBackend(model, tok, None, max_new_tokens=T)  # (a') before wrapping
    reqs_base = [Request(0, p, i) for i, p in enumerate(prompts)]
    be = HFBackend(model, tok, svd, max_new_tokens=T, max_batch_sequences=256)

    # the plain-model measurements need the unwrapped model: patch/unpatch around them
    def plain(fn: Any) -> Any:
        be.close()
        try:
            return fn()
        finally:
            be._patch(svd)

    # warm-up (allocator, first-call overheads)
    plain(lambda: hf_generate(model, tok, prompts[:4], 2))
    be.generate(pops[args.lambdas[0]], reqs_base[:4], max_new_tokens=2)

    best: dict[str, float] = {}
    peaks: dict[str, float] = {}
    naive_tokens: dict[int, int] = {}

    best_cpu: dict[str, float] = {}

    def record(key: str, dt: float, cpu: float, pk: float) -> None:
        best[key] = min(best.get(key, float("inf")), dt)
        best_cpu[key] = min(best_cpu.get(key, float("inf")), cpu)
        peaks[key] = max(peaks.get(key, 0.0), pk)

    for rnd in range(args.rounds):
        dt, cpu, pk, _ = timed(lambda: plain(lambda: hf_generate(model, tok, prompts, T)))
        record("a_hf_generate", dt, cpu, pk)
        if rnd == 0:
            dt, cpu, pk, out = timed(lambda: plain(lambda: base_be.generate(None, reqs_base, ignore_eos=True)))
            assert all(c.tokens == T for c in out)
            record("a_our_loop_base", dt, cpu, pk)
        for lam in args.lambdas:
            if rnd > 0 and lam != max(args.lambdas):
                continue
            reqs = [Request(i % lam, p, i) for i, p in enumerate(prompts)]
            dt, cpu, pk, out = timed(lambda reqs=reqs, lam=lam: be.generate(pops[lam], reqs, ignore_eos=True))
            assert all(c.tokens == T for c in out)
            record(f"b_population_l{lam}", dt, cpu, pk)
            if peft_model is not None and rnd == 0:
                dt, cpu, pk, n_tok = timed(lambda lam=lam: naive(peft_model, tok, svd, pops[lam], prompts, T, args.naive_max_candidates))
                naive_tokens[lam] = n_tok
                record(f"c_naive_l{lam}", dt, cpu, pk)
        print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(f"{k} {best[k]:.1f} s ({best_cpu[k]:.1f} s cpu)" for k in best), flush=True)

    # batch invariance on the real model: a candidate's greedy tokens alone vs inside the population
    lam = 8 if 8 in pops else args.lambdas[-1]
    reqs = [Request(i % lam, p, i) for i, p in enumerate(prompts)]
    batched = be.generate_ids(pops[lam], reqs, ignore_eos=True)
    probe = list(range(0, N, max(1, N // 4)))[:4]
    alone = [be.generate_ids(pops[lam], [reqs[i]], ignore_eos=True)[0] for i in probe]
    same = [batched[i] == a for i, a in zip(probe, alone)]
    first_diff = [next((k for k, (u, v) in enumerate(zip(batched[i], a)) if u != v), None) for i, a in zip(probe, alone)]

    def rates(times: dict[str, float]) -> dict[str, float]:
        return {k: (naive_tokens[int(k.rsplit("_l", 1)[1])] if k.startswith("c_") else N * T) / v for k, v in times.items()}

    def ratios_of(tps: dict[str, float]) -> dict[str, float]:
        out = {f"b_over_a_l{lam}": tps[f"b_population_l{lam}"] / tps["a_hf_generate"] for lam in args.lambdas}
        out.update({f"b_over_a_our_loop_l{lam}": tps[f"b_population_l{lam}"] / tps["a_our_loop_base"] for lam in args.lambdas})
        if naive_tokens:
            out.update({f"b_over_c_l{lam}": tps[f"b_population_l{lam}"] / tps[f"c_naive_l{lam}"] for lam in args.lambdas})
        return out

    tps, tps_cpu = rates(best), rates(best_cpu)
    ratios, ratios_wall = ratios_of(tps_cpu), ratios_of(tps)
    lmax = max(args.lambdas)
    result: dict[str, Any] = {
        "what": "generated tokens/s, embedded SmolLM2-135M-Instruct float32 on CPU, greedy, fixed length (EOS ignored)",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "usable_cores": len(os.sched_getaffinity(0)),
            "torch_threads": threads,
            "loadavg_before": load0,
            "loadavg_after": os.getloadavg(),
            "note": "2 cores shared with other engineers' jobs (load average above); timings are the best of the rounds. "
            "ratios use process CPU time (one torch thread: the work done, not the time other jobs held the core); "
            "ratios_wall use wall time and carry the contention noise",
        },
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "settings": {
            "n_sequences": N,
            "max_new_tokens": T,
            "lambdas": args.lambdas,
            "lora_rank": args.rank,
            "targets": TARGETS,
            "solution_length": svd.solution_length,
            "prompt_tokens_min_max": [min(lens), max(lens)],
            "rounds": args.rounds,
            "model_load_s": load_s,
        },
        "tokens_per_s_cpu": tps_cpu,
        "tokens_per_s_wall": tps,
        "seconds_cpu": best_cpu,
        "seconds_wall": best,
        "naive_sequences_run": {str(lam): n // T for lam, n in naive_tokens.items()},
        "peak_rss_growth_mb": peaks,
        "rss_mb_resident": status_mb("VmRSS"),
        "ratios": ratios,
        "ratios_wall": ratios_wall,
        "targets": {
            f"b_over_a_l{lmax} >= 0.90": ratios[f"b_over_a_l{lmax}"] >= 0.90,
            **({f"b_over_c_l{lmax} >= 3": ratios[f"b_over_c_l{lmax}"] >= 3} if peft_model is not None else {}),
        },
        "batch_invariance_greedy": {
            "lambda": lam,
            "requests_checked": len(probe),
            "identical_token_ids": int(sum(same)),
            "first_differing_step": first_diff,
        },
    }
    if args.quantization:
        del peft_model, be, base_be, model, lm
        result["quantization"] = quantization_section(args, args.rounds)
    elif Path(args.out).is_file():  # keep an earlier --quantization-only section
        previous = json.loads(Path(args.out).read_text())
        if "quantization" in previous:
            result["quantization"] = previous["quantization"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {
                "tokens_per_s_cpu": tps_cpu,
                "tokens_per_s_wall": tps,
                "ratios": ratios,
                "ratios_wall": ratios_wall,
                "batch_invariance_greedy": result["batch_invariance_greedy"],
                **({"quantization": result["quantization"]} if args.quantization else {}),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
