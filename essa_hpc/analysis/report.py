"""One command from run logs to figures, tables and a markdown summary.

    essa-report runs/*/log.h5 --out report/ [--metric accuracy --target 0.5]   (python -m essa_hpc.analysis.report)

Writes into --out: summary.md (per run: best and final validation, time to target, throughput, overhead
share; scaling across world sizes; the Appendix B latency model fitted to the logs and projected to
8-1024 GPUs), the figures as PNG and PDF, and the tidy tables as CSV. Logs of running jobs can be
given too (read in SWMR mode); they are marked "live".
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from essa_hpc.analysis import latency, methods, plots
from essa_hpc.analysis.load import (
    LogError,
    Run,
    Runs,
    find_logs,
    load_runs,
    overhead_share,
    signature,
    throughput,
    time_to_target,
    tokens_per_sample,
)
from essa_hpc.exit_codes import BAD_INPUT, FAILURE, OK

TARGET_FRACTION = 0.9  # default target: 90 % of the improvement every run achieved (see default_target)


# ----------------------------------------------------------------------------------------------------
# choices


def choose_metric(runs: Runs, metric: str | None = None) -> str | None:
    """The given metric; else the runs' run.target_metric; else the run loop's primary metric
    (mean_reward for the fake backend, accuracy where tasks check answers); else the first logged."""
    available = runs.metrics
    if metric is not None:
        if metric not in available:
            raise LogError(f"--metric {metric!r}: the logs have validation metrics {available}")
        return metric
    if not available:
        return None
    for r in runs:
        t = r.meta.get("target_metric")
        if t in available:
            return str(t)
    if all(r.meta.get("backend") == "fake" for r in runs) and "mean_reward" in available:
        return "mean_reward"
    for m in ("accuracy", "mean_reward"):
        if m in available:
            return m
    return available[0]


def default_target(runs: Runs, metric: str) -> float | None:
    """start + 0.9·(min over runs of the best value − start): a level every run reached, near the best.

    `start` is the median of the runs' first validation (the warm start). None when no run improved.
    """
    starts, bests = [], []
    for r in runs:
        v = r.validation
        if v.empty or metric not in v.columns or not np.isfinite(v[metric]).any():
            continue
        starts.append(float(v[metric].iloc[0]))
        bests.append(float(np.nanmax(v[metric])))
    if not bests:
        return None
    start, best = float(np.median(starts)), min(bests)
    if not best > start:
        return None
    return start + TARGET_FRACTION * (best - start)


# ----------------------------------------------------------------------------------------------------
# tables


def group_labels(runs: Runs) -> dict[str, str]:
    """Run name -> label of its comparable group (same config except identity, stop and I/O keys)."""
    sigs: dict[str, list[Run]] = {}
    for r in runs:
        sigs.setdefault(signature(r.meta["config"]), []).append(r)
    labels: dict[str, str] = {}
    used: set[str] = set()
    for members in sigs.values():
        m = members[0].meta
        base = f"{m.get('task')}/{m.get('backend')} λ={m['popsize']} d={m['d']} batch={m.get('batch_size')}"
        label, i = base, 2
        while label in used:
            label, i = f"{base} #{i}", i + 1
        used.add(label)
        for r in members:
            labels[r.name] = label
    return labels


def run_summary(runs: Runs, metric: str | None, target: float | None) -> pd.DataFrame:
    groups = group_labels(runs)
    rows = []
    for r in runs:
        v = r.validation
        row: dict[str, Any] = {
            "run": r.name,
            "group": groups[r.name],
            "world_size": r.meta["world_size"],
            "n_hosts": r.meta["n_hosts"],
            "popsize": r.meta["popsize"],
            "d": r.meta["d"],
            "batch_size": r.meta.get("batch_size"),
            "generations": r.meta["generations"],
            "status": "finished" if r.meta["finished"] else "live/incomplete",
            "best": math.nan,
            "best_gen": math.nan,
            "final": math.nan,
            "final_gen": math.nan,
            "time_to_target_s": math.nan,
            "target_gen": math.nan,
            "time_to_target_wall_s": math.nan,
            "tokens_per_s": throughput(r),
            "overhead_share": overhead_share(r),
            "iter_s": float(np.nanmedian(r.gen["iter_s"])) if r.gen["iter_s"].notna().any() else math.nan,
            "generate_s": float(np.nanmedian(r.gen["generate_s"])) if r.gen["generate_s"].notna().any() else math.nan,
            "tokens_per_sample": tokens_per_sample(r),
            "wall_time_s": float(r.gen["wall_time"].iloc[-1]) if len(r.gen) else math.nan,
        }
        if metric and metric in v.columns and v[metric].notna().any():
            i = int(np.nanargmax(v[metric].to_numpy()))
            row.update(
                best=float(v[metric].iloc[i]),
                best_gen=int(v["gen"].iloc[i]),
                final=float(v[metric].iloc[-1]),
                final_gen=int(v["gen"].iloc[-1]),
            )
            if target is not None:
                row["time_to_target_s"], row["target_gen"] = time_to_target(r, metric, target)
                row["time_to_target_wall_s"] = time_to_target(r, metric, target, since_start=True)[0]
        rows.append(row)
    return pd.DataFrame(rows)


def scaling_efficiency(world_size: Sequence[float], seconds: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Speed-up and parallel efficiency relative to the smallest world size with a finite time.

    S(G) = T(G0) / T(G),  E(G) = S(G)·G0 / G   (G0 the baseline's world size; NaN where T is unknown).
    """
    G = np.asarray(world_size, dtype=float)
    T = np.asarray(seconds, dtype=float)
    ok = np.isfinite(T) & (T > 0)
    if not ok.any():
        return np.full(G.shape, np.nan), np.full(G.shape, np.nan)
    base = int(np.flatnonzero(ok)[np.argmin(G[ok])])
    with np.errstate(divide="ignore", invalid="ignore"):
        speedup = np.where(ok, T[base] / T, np.nan)
        efficiency = speedup * G[base] / G
    return speedup, efficiency


def scaling_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Per group and world size: median time to target and seconds per generation, speed-ups, efficiencies."""
    rows = []
    for group, g in summary.groupby("group", sort=False):
        agg = (
            g.groupby("world_size")
            .agg(
                runs=("run", "count"),
                time_to_target_s=("time_to_target_s", "median"),
                iter_s=("iter_s", "median"),
                tokens_per_s=("tokens_per_s", "median"),
            )
            .reset_index()
        )
        agg = agg.sort_values("world_size")
        agg["speedup_ttt"], agg["efficiency_ttt"] = scaling_efficiency(agg["world_size"], agg["time_to_target_s"])
        agg["speedup_iter"], agg["efficiency_iter"] = scaling_efficiency(agg["world_size"], agg["iter_s"])
        agg.insert(0, "group", group)
        rows.append(agg)
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


# ----------------------------------------------------------------------------------------------------
# latency model against the logs


Curves = dict[str, tuple[np.ndarray, np.ndarray]]


def latency_fit(runs: Runs, summary: pd.DataFrame) -> tuple[dict[str, latency.EtaFit], pd.DataFrame, Curves]:
    """η_gen fitted per group; predicted vs measured per run; model curves over 1..2·max G per group."""
    stats = runs.rank_stats()
    fits: dict[str, latency.EtaFit] = {}
    tables, curves = [], {}
    for group, g in summary.groupby("group", sort=False):
        members = set(g["run"])
        st = stats[stats["run"].isin(members)]
        try:
            fit = latency.fit_eta_gen(st)
        except ValueError:
            continue
        fits[group] = fit
        m = g[["run", "group", "world_size", "popsize", "batch_size", "tokens_per_sample", "iter_s", "generate_s"]].copy()
        m = m[m["batch_size"].notna() & np.isfinite(m["tokens_per_sample"].astype(float))]
        if m.empty:
            continue
        tables.append(latency.predict_measured(m, fit.eta_gen))
        Gmax = int(m["world_size"].max())
        Gs = np.unique(np.concatenate([2 ** np.arange(0, int(math.log2(max(1, 2 * Gmax))) + 1), m["world_size"].to_numpy()])).astype(int)
        first = m.iloc[0]
        curves[group] = (
            Gs,
            latency.predict_curve(
                Gs,
                N_pop=float(first["popsize"]),
                B_essa=float(first["batch_size"]),
                m_gen=float(m["tokens_per_sample"].mean()),
                eta_gen=fit.eta_gen,
            ),
        )
    pvm = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    return fits, pvm, curves


# ----------------------------------------------------------------------------------------------------
# markdown


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if not math.isfinite(v):
            return "–"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    return str(v).replace("|", "\\|")


def md_table(df: pd.DataFrame, columns: dict[str, str], digits: int = 4) -> str:
    """A markdown table of the given columns (key: column, value: header)."""
    cols = [c for c in columns if c in df.columns]
    lines = ["| " + " | ".join(columns[c] for c in cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c], digits) for c in cols) + " |")
    return "\n".join(lines)


def write_summary(
    out: Path,
    *,
    runs: Runs,
    metric: str | None,
    target: float | None,
    target_source: str,
    summary: pd.DataFrame,
    scaling: pd.DataFrame,
    fits: dict[str, latency.EtaFit],
    pvm: pd.DataFrame,
    proj: pd.DataFrame,
    presets: Sequence[latency.Preset],
    workload: latency.Workload,
    figures: list[Path],
) -> Path:
    s: list[str] = []
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    s.append("# ESSA run report\n")
    s.append(f"Generated {now} by `python -m analysis.report` from {len(runs)} log(s).\n")
    if metric:
        tgt = _fmt(target) if target is not None else "none (no run improved on its first validation)"
        s.append(f"Validation metric: **{metric}**; target: **{tgt}** ({target_source}).\n")
    else:
        s.append("The logs hold no validation metrics.\n")

    s.append("## Runs\n")
    s.append(
        md_table(
            summary,
            {
                "run": "run",
                "world_size": "ranks",
                "n_hosts": "hosts",
                "popsize": "λ",
                "d": "d",
                "batch_size": "batch",
                "generations": "gens",
                "status": "status",
                "best": f"best {metric}",
                "best_gen": "at gen",
                "final": f"final {metric}",
                "time_to_target_s": "time to target (s)",
                "target_gen": "at gen",
                "tokens_per_s": "tokens/s",
                "overhead_share": "overhead",
                "iter_s": "s/gen (median)",
            },
        )
    )
    s.append(
        "\n`gen` counts completed generations (0 = the warm start). Time to target: wall-clock seconds from the "
        "start of the first generation (after setup and the warm-start validation) to the end of the first "
        "validation with the metric ≥ target (runs.csv `time_to_target_wall_s` counts from the job's start). "
        "Tokens/s: tokens generated by all ranks over the logged generations' wall time. Overhead: share of the "
        "ranks' measured time outside the `generate` and `reward` phases (allgather, tell, log, checkpoint, eval, "
        "other), summed over ranks and generations. s/gen: median seconds per generation without the validation "
        "and checkpoint between generations.\n"
    )
    live = summary[summary["status"] != "finished"]
    if len(live):
        s.append(
            f"Live or incomplete logs (no final vectors yet): {', '.join(live['run'])}; their last row's after-Allgather "
            "phases are unknown and left out.\n"
        )

    s.append("## Scaling across world sizes\n")
    if scaling.empty or scaling.groupby("group")["world_size"].nunique().max() < 2:
        s.append("Fewer than two world sizes of the same configuration: no scaling figures.\n")
    else:
        for group, g in scaling.groupby("group", sort=False):
            s.append(f"**{group}**\n")
            s.append(
                md_table(
                    g,
                    {
                        "world_size": "ranks",
                        "runs": "runs",
                        "time_to_target_s": "time to target (s)",
                        "speedup_ttt": "speed-up",
                        "efficiency_ttt": "efficiency",
                        "iter_s": "s/gen",
                        "speedup_iter": "speed-up (s/gen)",
                        "efficiency_iter": "efficiency (s/gen)",
                        "tokens_per_s": "tokens/s",
                    },
                )
            )
            s.append("")
        s.append(
            "Speed-up S(G) = T(G0)/T(G) against the smallest world size G0 of the group; parallel efficiency "
            "E(G) = S(G)·G0/G (1 = perfect). Runs compare when their configs agree except run identity, stop "
            "criteria, logging and threads. Several runs at one world size: their median.\n"
        )

    s.append("## Latency model (paper Appendix B)\n")
    s.append(
        "GRPO with a fraction θ of G GPUs training: T_grad(θ) = (B_grad/G)·max(m_fb·η_fb/θ, m_gen·η_gen/(1−θ)) + "
        "2·M_params·(G−1)/(G·bw). Optimum (Lemma B.1): θ* = m_fb·η_fb/(m_fb·η_fb + m_gen·η_gen), "
        "T*_grad = (B_grad/G)·(m_fb·η_fb + m_gen·η_gen) + 2·M_params·(G−1)/(G·bw). ESSA: "
        "T_essa = N_pop·B_essa·m_gen·η_gen/G + M_essa·(G−1)/(G·bw), M_essa = 8 bytes. Population bound "
        "(Theorem B.2): T_essa ≤ T*_grad ⇔ N_pop ≤ [B_grad·(m_fb·η_fb + m_gen·η_gen) + (2·M_params − M_essa)·(G−1)/bw] / "
        "(B_essa·m_gen·η_gen).\n"
    )
    s.append("### Fitted to these logs\n")
    if fits:
        rows = pd.DataFrame(
            [{"group": g, "eta_gen": f.eta_gen, "tokens": f.tokens, "seconds": f.seconds, "cells": f.cells} for g, f in fits.items()]
        )
        s.append(
            md_table(
                rows,
                {
                    "group": "group",
                    "eta_gen": "η_gen (s/token/rank)",
                    "tokens": "tokens",
                    "seconds": "generate s",
                    "cells": "(gen, rank) cells",
                },
            )
        )
        s.append(
            "\nη_gen = Σ generate seconds / Σ tokens over every (generation, rank) of the group (/gen/timings `generate`, /gen/tokens).\n"
        )
        if not pvm.empty:
            s.append(
                md_table(
                    pvm,
                    {
                        "run": "run",
                        "world_size": "ranks",
                        "popsize": "λ",
                        "batch_size": "batch",
                        "tokens_per_sample": "tokens/sample",
                        "predicted_s": "T_essa predicted (s)",
                        "generate_s": "generate measured (s)",
                        "iter_s": "iteration measured (s)",
                        "generate_over_predicted": "generate/pred",
                        "iter_over_predicted": "iteration/pred",
                    },
                )
            )
            s.append(
                "\nMeasured: medians over generations; `generate` is the slowest rank's generate phase, the iteration "
                "adds reward, Allgather, tell, logging and Python overhead the model leaves out. A ratio above 1 for "
                "`generate` at more ranks shows work that does not divide evenly (λ not a multiple of G) or contention "
                "for shared cores.\n"
            )
    else:
        s.append("No (generation, rank) cell with tokens and a generate time: η_gen not fitted.\n")
    s.append("### Projection to 8-1024 GPUs\n")
    w = workload
    s.append(
        f"Workload: B_grad = {_fmt(w.B_grad)} sequences per GRPO step, m_fb = {_fmt(w.m_fb)} tokens per sequence in "
        f"forward+backward, m_gen = {_fmt(w.m_gen)} generated tokens per sequence, N_pop = {_fmt(w.N_pop)}, "
        f"B_essa = {_fmt(w.B_essa)} prompts per candidate, M_essa = {_fmt(w.M_essa)} bytes.\n"
    )
    for p in presets:
        g = proj[proj["preset"] == p.name]
        s.append(
            f"**{p.name}**: η_fb = {_fmt(p.eta_fb)} s/token, η_gen = {_fmt(p.eta_gen)} s/token, "
            f"M_params = {_fmt(p.M_params)} bytes. Assumptions: {p.notes}.\n"
        )
        s.append(
            md_table(
                g,
                {
                    "G": "G",
                    "peak_bw": "bw (B/s)",
                    "theta_star": "θ*",
                    "t_grad_star": "T*_grad (s)",
                    "t_grad_allreduce": "of which all-reduce (s)",
                    "t_essa": "T_essa (s)",
                    "speedup": "T*_grad/T_essa",
                    "n_pop_bound": "N_pop bound",
                    "n_pop_eq1": "N_pop, eq. (1)",
                    "n_pop_exact": "N_pop, exact",
                    "dealing_efficiency": "dealing eff.",
                    "dealing_efficiency_candidate": "eff., per-candidate dealing",
                },
            )
        )
        s.append("")
    s.append(
        "The speed-up is per iteration; it leaves out how many iterations each method needs to reach a given "
        "quality (the paper's time-to-target comparisons include that). The N_pop bound is the largest population "
        "whose ESSA iteration is no slower than one GRPO step at θ*. Eq. (1) is the paper's bound as we read it "
        "(ESSA's own communication left out): N_pop ≤ (B_grad/B_essa)·(1 + m_fb·η_fb/(m_gen·η_gen)) + "
        "2·M_params·(G − 1)/(B_essa·m_gen·η_gen·bw); the exact form keeps the Allgather of N_pop records of "
        "2 × 4 bytes: N_pop ≤ [B_grad·(m_fb·η_fb + m_gen·η_gen) + 2·M_params·(G − 1)/bw] / "
        "[B_essa·m_gen·η_gen + 8·(G − 1)/bw] (analysis/latency.py). The dealing efficiencies are mean over busiest "
        "rank's (candidate, prompt) items at one GPU per rank: balanced dealing, and the earlier rule (rank r takes "
        "candidate r mod λ).\n"
    )

    s.append("## Files\n")
    for f in figures:
        s.append(f"- [{f.name}]({f.name})")
    s.append(
        "- tables (CSV): runs.csv, generations.csv, validation.csv, timings.csv, rank_stats.csv, scaling.csv, "
        "latency_projection.csv, predicted_vs_measured.csv\n"
    )
    path = out / "summary.md"
    path.write_text("\n".join(s) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------
# the command


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="essa-report", description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", help="log.h5 files, run directories, or glob patterns")
    p.add_argument("--out", default="report", help="output folder (created)")
    p.add_argument("--metric", help="validation metric (default: run.target_metric, else the run loop's primary metric)")
    p.add_argument("--target", type=float, help="threshold for time to target (default: 90%% of the improvement every run achieved)")
    p.add_argument("--formats", default="png,pdf", help="figure formats, comma-separated")
    p.add_argument("--preset", action="append", choices=sorted(latency.PRESETS), help="latency-model presets (default: all)")
    p.add_argument("--gpus", default=",".join(map(str, latency.DEFAULT_G)), help="GPU counts for the projection")
    g = p.add_argument_group("latency model: a custom preset (built on the first --preset) when any of these is given")
    g.add_argument("--eta-fb", type=float, help="s per token, forward+backward, one GPU")
    g.add_argument("--eta-gen", help="s per generated token, one GPU, or 'fit' (the value fitted from the logs)")
    g.add_argument("--m-params", type=float, help="bytes all-reduced per GRPO step (2 × parameters for bf16)")
    g.add_argument("--peak-bw", type=float, help="bottleneck bandwidth in bytes/s (replaces NVLink and InfiniBand)")
    wk = p.add_argument_group("latency model: workload")
    d = latency.Workload()
    wk.add_argument("--b-grad", type=float, default=d.B_grad)
    wk.add_argument("--m-fb", type=float, default=d.m_fb)
    wk.add_argument("--m-gen", type=float, default=d.m_gen)
    wk.add_argument("--n-pop", type=float, default=d.N_pop)
    wk.add_argument("--b-essa", type=float, default=d.B_essa)
    wk.add_argument("--m-essa", type=float, default=d.M_essa)
    return p.parse_args(argv)


def build_presets(args: argparse.Namespace, fits: dict[str, latency.EtaFit]) -> list[latency.Preset]:
    presets = [latency.PRESETS[n] for n in (args.preset or list(latency.PRESETS))]
    if any(v is not None for v in (args.eta_fb, args.eta_gen, args.m_params, args.peak_bw)):
        base = presets[0]
        changes: dict[str, Any] = {"name": f"custom({base.name})"}
        notes = [f"{base.name} with"]
        if args.eta_fb is not None:
            changes["eta_fb"] = args.eta_fb
            notes.append(f"eta_fb={args.eta_fb}")
        if args.eta_gen is not None:
            if args.eta_gen == "fit":
                if not fits:
                    raise LogError("--eta-gen fit: the logs give no η_gen (no tokens with generate time)")
                changes["eta_gen"] = float(np.median([f.eta_gen for f in fits.values()]))
                notes.append(f"eta_gen={changes['eta_gen']:.4g} fitted from the logs")
            else:
                changes["eta_gen"] = float(args.eta_gen)
                notes.append(f"eta_gen={args.eta_gen}")
        if args.m_params is not None:
            changes["params"], changes["bytes_per_param"] = args.m_params, 1.0
            notes.append(f"M_params={args.m_params} bytes")
        if args.peak_bw is not None:
            changes["intra_bw"] = changes["inter_bw"] = args.peak_bw
            notes.append(f"bw={args.peak_bw} B/s at every G")
        presets.append(replace(base, notes=notes[0] + " " + ", ".join(notes[1:]) + "; otherwise: " + base.notes, **changes))
    return presets


def check_out(out: Path) -> None:
    """--out must be a folder this process can create and write, checked before any log is read."""
    if out.exists() and not out.is_dir():
        raise LogError(f"--out {out}: is a file, expected a folder (it is created when missing)")
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise LogError(f"--out {out}: {probe} is a file, expected a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise LogError(f"--out {out}: {probe} is not writable")


def build_report(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    check_out(out)
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    paths = find_logs(args.logs)
    grpo = [p for p in paths if methods.log_method(p) == "grpo"]
    comparison = methods.eval_curves(paths) if grpo else pd.DataFrame()
    if grpo and len(grpo) == len(paths):
        return method_report(out, comparison, args.metric, formats)
    runs = load_runs([p for p in paths if p not in grpo])
    metric = choose_metric(runs, args.metric)
    if args.target is not None:
        target, source = args.target, "given with --target"
    elif metric is not None:
        target = default_target(runs, metric)
        source = f"default: first validation + {TARGET_FRACTION:.0%} of the smallest improvement any run reached"
    else:
        target, source = None, ""
    out.mkdir(parents=True, exist_ok=True)
    summary = run_summary(runs, metric, target)
    scaling = scaling_table(summary)
    fits, pvm, curves = latency_fit(runs, summary)
    presets = build_presets(args, fits)
    workload = latency.Workload(
        B_grad=args.b_grad, m_fb=args.m_fb, m_gen=args.m_gen, N_pop=args.n_pop, B_essa=args.b_essa, M_essa=args.m_essa
    )
    Gs = [int(x) for x in args.gpus.split(",") if x.strip()]
    proj = pd.concat([latency.project(p, workload, Gs) for p in presets], ignore_index=True)

    figures: list[Path] = []
    if grpo and metric is not None:
        figures += plots.method_overlay(comparison, metric, out, formats)
        comparison.to_csv(out / "methods.csv", index=False)
    figures += plots.curves(runs, metric, out, formats)
    for r in runs:
        figures += plots.phase_breakdown(r, out, formats)
    figures += plots.phase_shares(runs, out, formats)
    figures += plots.scaling(scaling, out, formats)
    figures += plots.latency_projection(proj, out, formats)
    figures += plots.predicted_vs_measured(pvm, curves, out, formats)

    summary.to_csv(out / "runs.csv", index=False)
    runs.generations().to_csv(out / "generations.csv", index=False)
    runs.validation().to_csv(out / "validation.csv", index=False)
    runs.timings().to_csv(out / "timings.csv", index=False)
    runs.rank_stats().to_csv(out / "rank_stats.csv", index=False)
    scaling.to_csv(out / "scaling.csv", index=False)
    proj.to_csv(out / "latency_projection.csv", index=False)
    pvm.to_csv(out / "predicted_vs_measured.csv", index=False)
    md = write_summary(
        out,
        runs=runs,
        metric=metric,
        target=target,
        target_source=source,
        summary=summary,
        scaling=scaling,
        fits=fits,
        pvm=pvm,
        proj=proj,
        presets=presets,
        workload=workload,
        figures=figures,
    )
    return {
        "runs": runs,
        "metric": metric,
        "target": target,
        "summary": summary,
        "scaling": scaling,
        "fits": fits,
        "predicted_vs_measured": pvm,
        "projection": proj,
        "figures": figures,
        "summary_md": md,
    }


def method_report(out: Path, comparison: pd.DataFrame, metric: str | None, formats: Sequence[str]) -> dict[str, Any]:
    """Only GRPO logs were given: the overlay, its table and a short summary (no ESSA generations to analyse)."""
    available = [c for c in comparison.columns if c not in ("run", "method", "step", "wall_time", "train_time", "tokens")]
    if metric is None:
        metric = "accuracy" if "accuracy" in available else (available[0] if available else None)
    if metric is None or metric not in available:
        raise LogError(f"--metric {metric!r}: the logs have validation metrics {available}")
    out.mkdir(parents=True, exist_ok=True)
    figures = plots.method_overlay(comparison, metric, out, formats)
    comparison.to_csv(out / "methods.csv", index=False)
    lines = ["# Run report (GRPO logs)\n", "| run | method | first | last | training s | tokens |", "| --- | --- | --- | --- | --- | --- |"]
    for run, c in comparison.groupby("run", sort=False):
        first, last = c[metric].iloc[0], c[metric].iloc[-1]
        lines.append(
            f"| {run} | {c['method'].iloc[0]} | {first:.4f} | {last:.4f} | {c['train_time'].iloc[-1]:.1f} | {int(c['tokens'].iloc[-1])} |"
        )
    md = out / "summary.md"
    md.write_text("\n".join(lines) + "\n")
    return {
        "runs": list(dict.fromkeys(comparison["run"])),
        "metric": metric,
        "figures": figures,
        "summary_md": md,
        "comparison": comparison,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        res = build_report(args)
    except LogError as e:
        print(f"analysis.report: {e}", file=sys.stderr)
        return BAD_INPUT
    except OSError as e:  # writing --out failed part way (a full disk, a folder made read-only)
        print(f"analysis.report: cannot write {e.filename or args.out}: {e.strerror}", file=sys.stderr)
        return FAILURE
    print(f"analysis.report: {len(res['runs'])} run(s) -> {res['summary_md']} and {len(res['figures'])} figure files")
    return OK


if __name__ == "__main__":
    raise SystemExit(main())
