"""Evaluate a model (optionally with a PEFT LoRA adapter) on a task's validation split.

    python -m essa_hpc.evaluate --task gsm8k [--adapter runs/x/adapter] [--size 200] [--k 4 --temperature 0.7]
                                [--compare [--sft adapters/sft]] [--config FILE.yaml] [--set key=value ...]
                                [--out metrics.json] [--samples out.jsonl]

It loads the model (model.*), builds the task exactly as a run does (``make_task``), generates k
completions per validation prompt with the configured backend (hf or vllm) and prints the metrics
of essa_hpc.metrics as one JSON object: accuracy, mean reward, avg@k, pass@k. Sampling seeds are
the run loop's validation seeds, so the metrics of a run's final adapter match its last validation.
Under mpiexec the prompts are sharded over ranks and rank 0 prints. ``--samples`` writes every
(prompt id, sample, completion, reward) as JSON Lines. ``--compare`` adds the base model's (and the
SFT adapter's, with ``--sft``) metrics on the same prompts and seeds under "comparison".
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from essa_hpc.exit_codes import BAD_INPUT, OK


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="essa-evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML config (default: the embedded default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted config override (repeatable)")
    p.add_argument("--task", help="task.name (arithmetic, gsm8k, math, ifeval, reward_model, module:function)")
    p.add_argument("--adapter", help="PEFT LoRA adapter folder; default: the base model alone")
    p.add_argument("--split", help="eval.split: validation (default) or train")
    p.add_argument("--size", type=int, help="eval.size: number of prompts")
    p.add_argument("--k", type=int, help="eval.k: samples per prompt")
    p.add_argument("--temperature", type=float, help="eval.temperature (needed > 0 for k > 1)")
    p.add_argument("--max-new-tokens", type=int, help="backend.max_new_tokens")
    p.add_argument("--out", help="also write the metrics JSON to this file")
    p.add_argument("--samples", help="write every completion with its reward to this JSONL file")
    p.add_argument("--compare", action="store_true", help="also score the base model alone (and --sft) on the same prompts and seeds")
    p.add_argument("--sft", help="with --compare: the SFT warm-start adapter to score as well")
    return p.parse_args(argv)


FLAGS = {  # config key -> the option that sets it
    "task.name": "task",
    "lora.adapter": "adapter",
    "eval.split": "split",
    "eval.size": "size",
    "eval.k": "k",
    "eval.temperature": "temperature",
    "backend.max_new_tokens": "max_new_tokens",
}


def overrides(args: argparse.Namespace) -> list[str]:
    out = list(args.set)
    for key, attr in FLAGS.items():
        value = getattr(args, attr)
        if value is not None:
            out.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    return out


def name_the_option(message: str, args: argparse.Namespace) -> str:
    """A config error about a key that an option set names the option: '--size 0 (eval.size): ...'."""
    for key, attr in FLAGS.items():
        value = getattr(args, attr)
        if value is not None and message.startswith(f"{key}:"):
            return f"--{attr.replace('_', '-')} {value} ({key}):{message[len(key) + 1 :]}"
    return message


def evaluate(cfg: Any, comm: Any = None, samples_path: str | None = None, examples: Sequence[Any] | None = None) -> dict[str, float]:
    """Metrics of the model (plus cfg.lora.adapter, when set) on cfg's task validation split, or on ``examples``.

    The run's own evaluation path (essa_hpc.evaluation) with the adapter as saved, at x = 0.
    """
    from essa_hpc import dist, evaluation

    comm = comm or dist.init()
    ev = evaluation.adapter_evaluator(cfg, comm, examples)
    v = evaluation.validation_scores(ev, cfg, comm, np.zeros(ev.dim), keep_samples=bool(samples_path))
    ev.backend.close()
    result = ev.summarize(v.per_prompt)
    result["prompts"] = float(len(v.per_prompt))
    result["reward_failures"] = float(v.failures)
    result["reward_timeouts"] = float(v.timeouts)
    if samples_path and comm.rank == 0:
        with Path(samples_path).open("w") as f:
            for row in v.samples:
                f.write(json.dumps(row) + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    from essa_hpc import dist
    from essa_hpc.config import ConfigError, load_config

    args = parse_args(argv)
    try:
        cfg = load_config(args.config, overrides(args))
    except ConfigError as e:
        print(f"essa-evaluate: {name_the_option(str(e), args)}", file=sys.stderr)
        return BAD_INPUT
    comm = dist.init()
    try:
        result = evaluate(cfg, comm, args.samples)
    except ValueError as e:  # TaskError, ModelError, AdapterError and bad settings are ValueErrors
        if comm.rank == 0:
            print(f"essa-evaluate: {e}", file=sys.stderr)
        return BAD_INPUT
    report: dict[str, Any] = {"task": cfg.task.name, "adapter": cfg.lora.adapter, **result}
    if args.compare:
        # the same prompts and sampling seeds, so the differences are the adapters' alone
        others = [("base", None)] + ([("sft", args.sft)] if args.sft else [])
        try:
            report["comparison"] = {label: evaluate(cfg.replace(**{"lora.adapter": path}), comm) for label, path in others}
        except ValueError as e:
            if comm.rank == 0:
                print(f"essa-evaluate: {e}", file=sys.stderr)
            return BAD_INPUT
    if comm.rank == 0:
        text = json.dumps(report, sort_keys=True)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
    return OK


if __name__ == "__main__":
    sys.exit(main())
