"""SFT throughput of the warm start on the embedded default model (SmolLM2-135M-Instruct).

~64 generated 2-digit addition/subtraction examples in the arithmetic task's format ("What is 23 + 45?"
-> "23 + 45 = 68. The answer is \\boxed{68}.") with the math system prompt, LoRA rank 8 on q/k/v/o,
a few optimizer steps. Reports tokens/s (prompt + response tokens through forward and backward),
seconds per step and the loss. ``python bench/bench_sft.py`` writes bench/results/sft.json.

Timings are wall-clock on this machine; the file records CPU count, threads, device and load average.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from essa_hpc import models, sft
from essa_hpc.config import LoraSection, ModelSection, SftSection
from essa_hpc.tasks.base import Example

SYSTEM = "Please reason step by step and place your final answer in \\boxed{}."


def arithmetic_examples(n: int, seed: int = 0) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a, b = (int(v) for v in rng.integers(10, 100, 2))
        op = "+" if rng.random() < 0.5 else "-"
        r = a + b if op == "+" else a - b
        out.append(
            Example(id=str(i), prompt=f"What is {a} {op} {b}?", answer=r, response=f"{a} {op} {b} = {r}. The answer is \\boxed{{{r}}}.")
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = cores available)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "sft.json"))
    args = ap.parse_args(argv)
    threads = models.set_threads(args.threads, 1)
    load_before = os.getloadavg()
    t = time.perf_counter()
    loaded = models.load(ModelSection(device=args.device))
    load_s = time.perf_counter() - t
    examples = arithmetic_examples(args.examples)
    lora = LoraSection(rank=args.rank, lora_alpha=2.0 * args.rank)
    cfg = SftSection(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, max_length=256, examples=args.examples)
    with tempfile.TemporaryDirectory() as tmp:
        stats = sft.train_sft(loaded, examples, SYSTEM, lora, cfg, Path(tmp) / "adapter", seed=0)
    result = {
        "benchmark": "LoRA SFT on the embedded SmolLM2-135M-Instruct, arithmetic examples",
        "settings": {
            "examples": args.examples,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "rank": args.rank,
            "lr": args.lr,
            "targets": lora.targets,
            "dtype": str(next(loaded.model.parameters()).dtype),
        },
        "model_load_s": round(load_s, 2),
        "sft": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in stats.items()},
        "seconds_per_step": round(stats["seconds"] / stats["steps"], 3),
        "tokens_per_example": round(stats["tokens"] / (stats["steps"] * args.batch_size), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": threads,
            "device": str(loaded.device),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "torch": torch.__version__,
            "note": "shared machine (other engineers' jobs running): timings are upper bounds",
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["sft"]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
