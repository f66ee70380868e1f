"""ESSA and GRPO runs on one axis: held-out metric against training time and against generated tokens.

Both methods' logs carry ``/eval/<metric>`` rows (essa_hpc/runlog.py; essa_hpc/grpo.py). What they are
compared on must be measured by one rule, and the rule here is **training time with validation
excluded**, starting at the first generation / optimizer step (model load, SFT warm start and the
starting validation are left out for both):

- a GRPO log stores it: ``/eval/train_time`` (seconds spent in optimizer steps) and ``/eval/tokens``;
- for an ESSA log it is derived from the per-generation wall clock: the validation after generation
  G−1 (``/eval/gen`` = G) sees ``wall_time[G−1] − t0 − Σ_{h < G−1} eval[h]``, with t0 the wall time of the
  starting validation and eval[h] the slowest rank's validation phase after generation h; its tokens
  are ``Σ_{h ≤ G−1}`` of ``/gen/tokens`` over ranks.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from essa_hpc.analysis.load import LogError, _attr, find_logs, open_log, read_run


def log_method(path: str | Path) -> str:
    """``grpo`` for the GRPO baseline's logs, ``essa`` for the run loop's."""
    with open_log(path) as f:
        return str(_attr(f, "method", "essa") or "essa")


def _grpo_curve(path: Path, name: str) -> pd.DataFrame:
    with open_log(path) as f:
        if "eval" not in f:
            raise LogError(f"{path}: a GRPO log without /eval")
        e = f["eval"]
        n = min((ds.shape[0] for ds in e.values()), default=0)
        cols = {k: np.asarray(ds[:n]) for k, ds in e.items()}
    df = pd.DataFrame({"run": name, "method": "grpo", "step": cols.pop("gen").astype(np.int64)})
    for key in ("wall_time", "train_time", "tokens"):
        df[key] = cols.pop(key)
    for k, v in sorted(cols.items()):
        df[k] = v.astype(np.float64)
    return df


def _essa_curve(path: Path, name: str) -> pd.DataFrame:
    run = read_run(path, name=name)
    v, g = run.validation, run.gen
    t0 = float(v.loc[v["gen"] == 0, "wall_time"].iloc[0]) if (v["gen"] == 0).any() else 0.0
    wall = g["wall_time"].to_numpy(dtype=np.float64)
    P = {p: i for i, p in enumerate(run.phases)}
    eval_s = np.nan_to_num(run.phase_array[:, :, P["eval"]].max(axis=1)) if "eval" in P and len(wall) else np.zeros(len(wall))
    eval_before = np.concatenate([[0.0], np.cumsum(eval_s)[:-1]]) if len(wall) else np.empty(0)
    tokens = np.cumsum(g["tokens"].to_numpy(dtype=np.int64)) if len(wall) else np.empty(0, dtype=np.int64)
    gens = v["gen"].to_numpy(dtype=np.int64)
    rows = np.clip(gens - 1, 0, max(0, len(wall) - 1))
    has = (gens > 0) & (gens <= len(wall))
    train_time = np.where(has, wall[rows] - t0 - eval_before[rows], 0.0) if len(wall) else np.zeros(len(gens))
    tok = np.where(has, tokens[rows], 0) if len(wall) else np.zeros(len(gens), dtype=np.int64)
    df = pd.DataFrame({"run": name, "method": "essa", "step": gens, "wall_time": v["wall_time"].to_numpy(), "train_time": train_time})
    df["tokens"] = tok.astype(np.int64)
    for m in run.metrics:
        df[m] = v[m].to_numpy(dtype=np.float64)
    return df


def eval_curve(path: str | Path, name: str | None = None) -> pd.DataFrame:
    """One run's validation rows: run, method, step, wall_time, train_time (validation excluded), tokens, metrics."""
    p = Path(path)
    label = name or p.parent.name
    return _grpo_curve(p, label) if log_method(p) == "grpo" else _essa_curve(p, label)


def eval_curves(items: Iterable[str | Path]) -> pd.DataFrame:
    """Every log's validation rows (files, run directories, globs), run names made unique by their folder."""
    frames, seen = [], set()
    for p in find_logs(items):
        name = p.parent.name if p.parent.name not in seen else f"{p.parent.parent.name}/{p.parent.name}"
        seen.add(name)
        frames.append(eval_curve(p, name))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def value_at(curve: pd.DataFrame, metric: str, train_time: float) -> float:
    """The metric of the last validation at or before ``train_time`` seconds of training (NaN if none)."""
    rows = curve[curve["train_time"] <= train_time + 1e-9]
    return float(rows[metric].iloc[-1]) if len(rows) else float("nan")


def time_to(curve: pd.DataFrame, metric: str, level: float) -> float:
    """Training seconds until the metric first reaches ``level`` (inf if never)."""
    hit = curve[curve[metric] >= level - 1e-12]
    return float(hit["train_time"].iloc[0]) if len(hit) else float("inf")
