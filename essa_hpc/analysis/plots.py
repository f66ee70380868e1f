"""Figures from loaded runs (matplotlib, Agg backend; every figure saved as PNG and PDF).

    curves(runs, "mean_reward", out)      reward and validation vs generation and vs wall clock (paper Figs 4-7)
    phase_breakdown(run, out)             stacked seconds per phase per generation, mean over ranks
    phase_shares(runs, out)               share of each phase per run, side by side
    scaling(table, out)                   time-to-target, speed-up, parallel efficiency vs ranks (paper Fig 3)
    latency_projection(proj, out)         Appendix B model: GRPO vs ESSA iteration time, speed-up, N_pop bound
    predicted_vs_measured(table, ..., out)

Every function returns the list of files it wrote.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from essa_hpc.analysis.load import Run, Runs

FORMATS: tuple[str, ...] = ("png", "pdf")
DPI = 110
PHASE_COLORS = {
    "generate": "#4c72b0",
    "reward": "#55a868",
    "allgather": "#c44e52",
    "tell": "#8172b2",
    "log": "#ccb974",
    "checkpoint": "#64b5cd",
    "eval": "#dd8452",
    "other": "#8c8c8c",
}


def save(fig: plt.Figure, out: Path, stem: str, formats: Sequence[str] = FORMATS) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    paths = []
    for ext in formats:
        p = out / f"{stem}.{ext}"
        fig.savefig(p, dpi=DPI, bbox_inches="tight")
        paths.append(p)
    plt.close(fig)
    return paths


def _legend(ax: plt.Axes, **kw: object) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def run_label(run: Run) -> str:
    return f"{run.name} ({run.meta['world_size']} rank{'s' if run.meta['world_size'] != 1 else ''})"


def _colors(n: int) -> list[tuple[float, ...]]:
    cmap = plt.get_cmap("tab10" if n <= 10 else "viridis")
    return [cmap(i if n <= 10 else i / max(1, n - 1)) for i in range(n)]


def curves(runs: Runs, metric: str | None, out: Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Training reward (mean over the population, band q25-q75, dashed max) and the validation metric,
    overlaid for all runs, against generations and against wall-clock seconds since the first generation
    (setup and the warm-start validation left out, so runs with different start-up costs line up)."""
    written: list[Path] = []
    colors = _colors(len(runs))
    for x, xlabel, tag in (("gen", "generation", "generation"), ("train_time", "wall-clock seconds since the first generation", "time")):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for run, c in zip(runs, colors):
            g = run.gen
            if g.empty:
                continue
            xs = g["gen"] + 1 if x == "gen" else g["train_time"]
            ax.plot(xs, g["reward_mean"], color=c, label=run_label(run))
            ax.fill_between(xs, g["reward_q25"], g["reward_q75"], color=c, alpha=0.15, linewidth=0)
            ax.plot(xs, g["reward_max"], color=c, linestyle="--", linewidth=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training reward (population mean; -- max)")
        ax.set_title(f"Reward vs {tag}")
        ax.grid(alpha=0.3)
        _legend(ax, fontsize=7)
        written += save(fig, out, f"reward_vs_{tag}", formats)

        if metric is None:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for run, c in zip(runs, colors):
            v = run.validation
            if v.empty or metric not in v.columns:
                continue
            ax.plot(v[x], v[metric], color=c, marker="o", markersize=3, label=run_label(run))
        ax.set_xlabel(xlabel if x != "gen" else "generations completed")
        ax.set_ylabel(f"validation {metric}")
        ax.set_title(f"Validation {metric} vs {tag}")
        ax.grid(alpha=0.3)
        _legend(ax, fontsize=7)
        written += save(fig, out, f"validation_{_safe(metric)}_vs_{tag}", formats)
    return written


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def phase_breakdown(run: Run, out: Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Seconds per generation, stacked by phase (mean over ranks), with the slowest rank's total as a line."""
    t = run.timings
    if t.empty:
        return []
    mean = t.groupby(["gen", "phase"], observed=False)["seconds"].mean().unstack("phase").reindex(columns=run.phases)
    slowest = t.groupby(["gen", "rank"])["seconds"].sum().groupby("gen").max()
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    bottom = np.zeros(len(mean))
    xs = mean.index.to_numpy() + 1
    for p in run.phases:
        vals = np.nan_to_num(mean[p].to_numpy())
        if not vals.any():
            continue
        ax.bar(xs, vals, bottom=bottom, color=PHASE_COLORS.get(p), label=p, width=0.85)
        bottom += vals
    ax.plot(xs, slowest.reindex(mean.index).to_numpy(), color="black", linewidth=0.8, marker=".", label="slowest rank, total")
    ax.set_xlabel("generation")
    ax.set_ylabel("seconds (mean over ranks)")
    ax.set_title(f"Time per phase: {run_label(run)}")
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    ax.grid(alpha=0.3, axis="y")
    return save(fig, out, f"phases_{_safe(run.name)}", formats)


def phase_shares(runs: Runs, out: Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Share of the ranks' measured time per phase, one horizontal stacked bar per run."""
    from essa_hpc.analysis.load import phase_totals

    runs_list = [r for r in runs if not r.timings.empty]
    if not runs_list:
        return []
    fig, ax = plt.subplots(figsize=(7.0, 0.5 * len(runs_list) + 1.6))
    phases = list(dict.fromkeys(p for r in runs_list for p in r.phases))
    left = np.zeros(len(runs_list))
    for p in phases:
        shares = []
        for r in runs_list:
            tot = phase_totals(r)
            shares.append(float(tot.get(p, 0.0)) / max(float(tot.sum()), 1e-300))
        shares_a = np.array(shares)
        ax.barh(range(len(runs_list)), shares_a, left=left, color=PHASE_COLORS.get(p), label=p)
        left += shares_a
    ax.set_yticks(range(len(runs_list)), [run_label(r) for r in runs_list], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of measured rank time")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    ax.set_title("Where the time goes")
    return save(fig, out, "phase_shares", formats)


def scaling(table: pd.DataFrame, out: Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Paper Fig 3 style: per comparable group, time vs ranks (with ideal 1/G), speed-up, efficiency.

    `table` is analysis.report.scaling_table's output: group, world_size, time_to_target_s, iter_s and
    speedup_* / efficiency_* columns for both.
    """
    if table.empty or table["world_size"].nunique() < 2:
        return []
    fig, axes = plt.subplots(1, 3, figsize=(13.0, 3.8))
    colors = _colors(table["group"].nunique())
    for (group, g), c in zip(table.groupby("group", sort=False), colors):
        g = g.sort_values("world_size")
        G = g["world_size"].to_numpy(dtype=float)
        for col, style, what in (("time_to_target_s", "-", "time to target"), ("iter_s", ":", "s / generation")):
            y = g[col].to_numpy(dtype=float)
            ok = np.isfinite(y)
            if ok.sum() == 0:
                continue
            axes[0].plot(G[ok], y[ok], style, marker="o", color=c, label=f"{group}: {what}")
            axes[0].plot(G[ok], y[ok][0] * G[ok][0] / G[ok], color=c, alpha=0.3, linewidth=3)
            key = "ttt" if col == "time_to_target_s" else "iter"
            axes[1].plot(G[ok], g[f"speedup_{key}"].to_numpy()[ok], style, marker="o", color=c, label=f"{group}: {what}")
            axes[2].plot(G[ok], g[f"efficiency_{key}"].to_numpy()[ok], style, marker="o", color=c, label=f"{group}: {what}")
    Gs = np.sort(table["world_size"].unique().astype(float))
    axes[1].plot(Gs, Gs / Gs[0], color="gray", linestyle="--", label="ideal")
    axes[2].axhline(1.0, color="gray", linestyle="--")
    for ax, yl, title in (
        (axes[0], "seconds", "Time (thick: ideal 1/G)"),
        (axes[1], "speed-up", "Speed-up"),
        (axes[2], "parallel efficiency", "Parallel efficiency"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(Gs, [str(int(x)) for x in Gs])
        ax.set_xlabel("ranks")
        ax.set_ylabel(yl)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[2].set_ylim(0, 1.25)
    axes[1].legend(fontsize=6)
    return save(fig, out, "scaling", formats)


def latency_projection(proj: pd.DataFrame, out: Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Appendix B: predicted T*_grad and T_essa vs G, speed-up T*_grad / T_essa, and the N_pop bound."""
    if proj.empty:
        return []
    fig, axes = plt.subplots(1, 3, figsize=(13.0, 3.8))
    n = proj["preset"].nunique()
    for i, ((preset, g), c) in enumerate(zip(proj.groupby("preset", sort=False), _colors(n))):
        axes[0].plot(g["G"], g["t_grad_star"], "-", marker="o", color=c, label=f"{preset}: GRPO T*_grad")
        axes[0].plot(g["G"], g["t_essa"], "--", marker="s", color=c, label=f"{preset}: ESSA T_essa")
        # presets whose numbers all scale with the model size give identical ratios: keep every line visible
        size = 4 + 3 * (n - 1 - i)
        axes[1].plot(g["G"], g["speedup"], "-", marker="o", markersize=size, color=c, label=preset, alpha=0.8)
        axes[2].plot(g["G"], g["n_pop_bound"], "-", marker="o", markersize=size, color=c, label=preset, alpha=0.8)
    axes[1].axhline(1.0, color="gray", linestyle="--")
    for ax, yl, title in (
        (axes[0], "seconds per iteration", "Predicted iteration time"),
        (axes[1], "T*_grad / T_essa", "Predicted speed-up of ESSA vs GRPO"),
        (axes[2], "N_pop bound", "Largest N_pop with T_essa <= T*_grad (Thm B.2)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("GPUs G")
        ax.set_ylabel(yl)
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=6)
    axes[1].legend(fontsize=7)
    axes[2].set_title(axes[2].get_title(), fontsize=9)
    return save(fig, out, "latency_projection", formats)


def predicted_vs_measured(
    table: pd.DataFrame, curves_by_group: dict[str, tuple[np.ndarray, np.ndarray]], out: Path, formats: Sequence[str] = FORMATS
) -> list[Path]:
    """Measured seconds per generation (whole iteration and slowest rank's generate phase) against the
    T_essa the fitted model predicts, over the ranks of the measured runs."""
    if table.empty:
        return []
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for (group, g), c in zip(table.groupby("group", sort=False), _colors(table["group"].nunique())):
        G, pred = curves_by_group[group]
        ax.plot(G, pred, "-", color=c, label=f"{group}: model T_essa")
        ax.plot(g["world_size"], g["iter_s"], "o", color=c, label=f"{group}: measured iteration")
        ax.plot(g["world_size"], g["generate_s"], "x", color=c, label=f"{group}: measured generate")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    Gs = np.sort(table["world_size"].unique())
    ax.set_xticks(Gs, [str(int(x)) for x in Gs])
    ax.set_xlabel("ranks G")
    ax.set_ylabel("seconds per generation (median)")
    ax.set_title("Latency model vs measured")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6)
    return save(fig, out, "predicted_vs_measured", formats)


def method_overlay(curves: pd.DataFrame, metric: str, out: Path, formats: Sequence[str] = FORMATS, stem: str = "methods") -> list[Path]:
    """Held-out metric of ESSA and GRPO runs against training time (validation excluded) and against
    generated tokens, one line per run, ESSA solid and GRPO dashed (analysis.methods has the time rule)."""
    if curves.empty or metric not in curves.columns:
        return []
    written: list[Path] = []
    runs = list(dict.fromkeys(curves["run"]))
    colors = dict(zip(runs, _colors(len(runs))))
    for x, xlabel, tag in (
        ("train_time", "training minutes (validation excluded)", "train_time"),
        ("tokens", "generated tokens", "tokens"),
    ):
        fig, ax = plt.subplots(figsize=(6.8, 4.2))
        for run in runs:
            c = curves[curves["run"] == run]
            method = str(c["method"].iloc[0])
            xs = c[x] / 60.0 if x == "train_time" else c[x]
            ax.plot(
                xs,
                c[metric],
                color=colors[run],
                linestyle="-" if method == "essa" else "--",
                marker="o",
                markersize=3,
                label=f"{run} ({method})",
            )
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"held-out {metric}")
        ax.set_title(f"ESSA vs GRPO: held-out {metric}")
        ax.grid(alpha=0.3)
        _legend(ax, fontsize=7)
        written += save(fig, out, f"{stem}_{_safe(metric)}_vs_{tag}", formats)
    return written
