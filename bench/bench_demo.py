"""The embedded default's gain over its SFT start, per seed: the figures behind the README's demo claim.

For each seed S, ``python -m essa_hpc.run --set run.seed=S`` (everything else the embedded default, in
its own run directory) is timed end to end, and its summary.json gives the validation accuracy of the
SFT adapter (x = 0, generation 0) and of the final mean. The validation split is also what the run
picks ``adapter_best`` by, so a second check scores the SFT adapter and the final exported PEFT adapter
(``adapter/``, loaded back from disk: what a user ships) on ``--fresh`` further questions of the same
distribution that the run never saw (not in its validation split, not in its training split, from which
the SFT examples and every minibatch come), greedy, paired: both adapters answer the same questions.

Next to it, from the same start: GRPO (``python -m essa_hpc.grpo``, the same config with the same seed,
so the same cached SFT adapter) at each ``--grpo-lrs`` learning rate, for as many seconds of training as
the ESSA run's training time (validation excluded for both, essa_hpc.analysis.methods), its final
adapter scored on the same fresh questions. GRPO validates only at its start and end here
(``eval.every=0``): its curve is not what is compared, and validation would double its wall clock.

    python bench/bench_demo.py                      # seeds 1234 (the default), 1, 2; writes bench/results/demo.json
    python bench/bench_demo.py --seeds 7 --fresh 200 --grpo-lrs ''

Each seed is a full default run (11-12 minutes on 2 CPU cores, its own SFT included), the fresh check
(~2 minutes) and one GRPO run of the same training time per learning rate.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FRESH_SALT = 0xF4E5
SECTIONS = ("model", "lora", "sft", "search", "task", "run", "eval")


def fresh_questions(cfg: Any, n: int) -> list[Any]:
    """n arithmetic examples outside the run's validation and training splits (same distribution)."""
    from essa_hpc.tasks import arithmetic

    t = cfg.task
    train, val = arithmetic.generate(cfg.run.seed, t.digits, list(t.operations), arithmetic.TRAIN_SIZE, cfg.eval.size)
    seen = set(train) | set(val)
    _, pool = arithmetic.generate(cfg.run.seed + FRESH_SALT, t.digits, list(t.operations), 0, n + len(seen))
    picked = [q for q in pool if q not in seen][:n]
    if len(picked) < n:
        raise SystemExit(f"only {len(picked)} unseen questions exist for these task settings; lower --fresh")
    return [arithmetic.make_example(*q) for q in picked]


def score_adapter(cfg: Any, adapter: Path, examples: list[Any], samples: Path) -> list[float]:
    """Per-question rewards of the base model + this PEFT adapter (essa_hpc.evaluate, greedy), in order."""
    from essa_hpc.evaluate import evaluate

    evaluate(cfg.replace(**{"lora.adapter": str(adapter)}), samples_path=str(samples), examples=examples)
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    by_id = {r["id"]: float(r["reward"]) for r in rows}
    return [by_id[e.id] for e in examples]


def paired(before: list[float], after: list[float], who: str) -> dict[str, Any]:
    """Accuracy of ``after`` on the same questions as ``before``, its gain, and the discordant pairs."""
    n = len(before)
    return {
        "final": sum(after) / n,
        "gain_points": 100 * (sum(after) - sum(before)) / n,
        f"only_{who}_right": sum(1 for a, b in zip(before, after) if b > a),
        "only_sft_right": sum(1 for a, b in zip(before, after) if a > b),
    }


def spread(xs: list[float]) -> dict[str, float]:
    """Mean, min and max over seeds."""
    return {"mean": sum(xs) / len(xs), "min": min(xs), "max": max(xs)}


def grpo_run(over: list[str], lr: float, train_s: float, work: Path, name: str) -> tuple[dict[str, Any], Path]:
    """GRPO from the ESSA run's start (same config and seed: the same cached SFT adapter) for ``train_s``
    seconds of training; its validation accuracy at start and end, steps and training time."""
    sets = [*over[:1], f"run.dir={work}", f"run.name={name}", f"grpo.learning_rate={lr}", f"grpo.time_budget_s={train_s}"]
    sets += ["grpo.max_steps=1000000", "eval.every=0"]
    cmd = [sys.executable, "-m", "essa_hpc.grpo"] + [a for o in sets for a in ("--set", o)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"GRPO {name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    summary = json.loads((work / name / "summary.json").read_text())
    evals = [(int(g), m["accuracy"]) for g, m in summary["evals"]]
    info = {
        "learning_rate": lr,
        "wall_s": time.perf_counter() - t,
        "train_time_s": summary["train_time_s"],
        "steps": summary["steps"],
        "validation_accuracy": evals,
        "start": evals[0][1],
        "final": evals[-1][1],
        "gain_points": 100 * (evals[-1][1] - evals[0][1]),
    }
    return info, work / name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="1234,1,2")
    ap.add_argument("--fresh", type=int, default=400, help="unseen questions for the second check (0: skip it)")
    ap.add_argument(
        "--grpo-lrs",
        type=lambda v: [float(x) for x in v.split(",") if x],
        default=[3e-5],
        help="GRPO learning rates from the same start ('': none; 3e-5: GRPO's best from a trained SFT, vs_grpo_seed1.json)",
    )
    ap.add_argument("--workdir", default=None, help="where the run directories go (default: a temporary folder)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "demo.json"))
    args = ap.parse_args()

    from essa_hpc import models, sft
    from essa_hpc.analysis.methods import eval_curve
    from essa_hpc.config import load_config
    from essa_hpc.tasks import make_task

    work = Path(args.workdir or tempfile.mkdtemp(prefix="essa-bench-demo-"))
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        name = f"seed{seed}"
        over = [f"run.seed={seed}", f"run.dir={work}", f"run.name={name}"]
        cmd = [sys.executable, "-m", "essa_hpc.run"] + [a for o in over for a in ("--set", o)]
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"run for seed {seed} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        summary = json.loads((work / name / "summary.json").read_text())
        evals = [(int(g), m["accuracy"]) for g, m in summary["evals"]]
        row: dict[str, Any] = {
            "seed": seed,
            "wall_s": wall,
            "validation_accuracy": evals,
            "validation_prompts": load_config(None, over).eval.size,
            "start": evals[0][1],
            "final": evals[-1][1],
            "gain_points": 100 * (evals[-1][1] - evals[0][1]),
        }
        row["train_time_s"] = float(eval_curve(work / name / "log.h5")["train_time"].iloc[-1])
        grpo_runs = {lr: grpo_run(over, lr, row["train_time_s"], work, f"{name}-grpo-lr{lr:g}") for lr in args.grpo_lrs}
        if grpo_runs:
            row["grpo"] = {f"{lr:g}": info for lr, (info, _) in grpo_runs.items()}
        if args.fresh:
            cfg = load_config(None, over)
            task = make_task(cfg)
            loaded = models.load(cfg.model)
            sft_dir = sft.cached_sft_adapter(cfg, loaded, task.train(), task.system_prompt, log=lambda *_: None)
            del loaded
            fresh = fresh_questions(cfg, args.fresh)
            r_sft = score_adapter(cfg, sft_dir, fresh, work / f"{name}-fresh-sft.jsonl")
            r_fin = score_adapter(cfg, work / name / "adapter", fresh, work / f"{name}-fresh-final.jsonl")
            row["fresh"] = {"questions": len(fresh), "sft": sum(r_sft) / len(fresh), **paired(r_sft, r_fin, "final")}
            for info, run_dir in grpo_runs.values():
                r_g = score_adapter(cfg, run_dir / "adapter", fresh, work / f"{run_dir.name}-fresh.jsonl")
                info["fresh"] = paired(r_sft, r_g, "grpo")
        results.append(row)
        print(json.dumps(row), flush=True)

    out: dict[str, Any] = {
        "benchmark": "embedded default (python -m essa_hpc.run, no other arguments) per seed: "
        "held-out accuracy of the SFT start vs after ESSA",
        "config": {k: v for k, v in json.loads(load_config(None).to_json()).items() if k in SECTIONS},
        "results": results,
        "validation_gain_points": spread([r["gain_points"] for r in results]),
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg": os.getloadavg(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if args.fresh:
        out["fresh_gain_points"] = spread([r["fresh"]["gain_points"] for r in results])
    for lr in args.grpo_lrs:
        key = f"{lr:g}"
        out.setdefault("grpo_validation_gain_points", {})[key] = spread([r["grpo"][key]["gain_points"] for r in results])
        if args.fresh:
            out.setdefault("grpo_fresh_gain_points", {})[key] = spread([r["grpo"][key]["fresh"]["gain_points"] for r in results])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
