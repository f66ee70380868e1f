"""Run logs (``log.h5``, docs/design.md "HDF5 log", essa_hpc/runlog.py) into tidy pandas tables.

    runs = load_runs(["runs/a/log.h5", "runs/b"])     # files, run directories or glob patterns
    runs.generations()   # run, gen, wall_time, train_time, reward stats, sigma, failures, tokens, times
    runs.validation()    # run, gen, wall_time, train_time, one column per metric
    runs.timings()       # run, gen, rank, phase, seconds          (long format, one row per cell)
    runs.rank_stats()    # run, gen, rank, tokens, generate_s      (what η_gen is fitted from)
    runs.metadata()      # one row per run: world_size, popsize, d, batch_size, config, hosts, ...

Logs are opened read-only in SWMR mode, so a log that a running job is still writing loads too: the
rows flushed so far are read, and rows whose datasets are not all written yet are left out.

Conventions. ``wall_time`` counts seconds since the job started (setup included, as logged);
``train_time`` counts from the start of the first generation, i.e. after setup and the warm-start
validation (the gen-0 validation's wall time; 0 when there is none). ``gen`` in the per-generation
tables is the generation index g (0-based, the HDF5 row); ``gen`` in the validation table is the
number of generations completed when validation ran (0 = the warm start, g + 1 = after generation
g), as in /eval/gen. The phases measured after a generation's Allgather (allgather, tell, log,
checkpoint, eval) are written into that row one generation later (runlog.py); for the last row of a
log that is still being written they are unknown and NaN here.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from essa_hpc.runlog import LogFileError, open_live

LATE_PHASES = ("allgather", "tell", "log", "checkpoint", "eval")  # filled one generation later (runlog.py)
WORK_PHASES = ("generate", "reward")  # the useful work; everything else is overhead
QUANTILES = {"reward_q10": 0.10, "reward_q25": 0.25, "reward_median": 0.5, "reward_q75": 0.75, "reward_q90": 0.90}


class LogError(ValueError):
    """A file that is not a readable ESSA run log; the message names the file."""


def open_log(path: str | Path) -> h5py.File:
    """Open read-only, in SWMR mode when possible (a live run, or one whose writer was killed and left
    the file's "open for write" flag set), plainly otherwise. A file that is not HDF5 or was cut short
    is refused from its superblock before the HDF5 library reads it (essa_hpc.runlog.check_file): the
    library would otherwise retry its reads for minutes, deaf to Ctrl-C."""
    try:
        return open_live(path)
    except LogFileError as e:
        raise LogError(str(e)) from None


def find_logs(items: Iterable[str | Path]) -> list[Path]:
    """log.h5 files from file paths, run directories (their log.h5, or log.h5 files below) and globs."""
    out: list[Path] = []
    for item in items:
        s = str(item)
        matches = sorted(glob.glob(s)) if any(c in s for c in "*?[") else [s]
        if not matches:
            raise LogError(f"{s}: no file matches")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                found = [p / "log.h5"] if (p / "log.h5").is_file() else sorted(p.glob("*/log.h5"))
                if not found:
                    raise LogError(f"{p}: no log.h5 in this folder or its run directories")
                out.extend(found)
            elif p.is_file():
                out.append(p)
            else:
                raise LogError(f"{p}: no such file or folder")
    return list(dict.fromkeys(p.resolve() for p in out))


def _attr(f: h5py.File, key: str, default: Any = None) -> Any:
    v = f.attrs.get(key, default)
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, np.generic):
        v = v.item()
    return v


def _json_attr(f: h5py.File, key: str, default: Any) -> Any:
    v = _attr(f, key)
    if v in (None, ""):
        return default
    try:
        return json.loads(v)
    except (TypeError, ValueError):
        return default


@dataclass
class Run:
    """One run log, read into arrays and tables (see the module docstring for the conventions)."""

    name: str
    path: Path
    meta: dict[str, Any]
    gen: pd.DataFrame
    validation: pd.DataFrame
    timings: pd.DataFrame
    ranks: pd.DataFrame
    rewards: np.ndarray  # (G, λ) as in /gen/rewards
    phase_array: np.ndarray = field(repr=False)  # (G, R, K) as in /gen/timings, NaN where not yet known
    phases: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> list[str]:
        return list(self.meta["metrics"])


def read_run(path: str | Path, name: str | None = None) -> Run:
    """Read one log (also while it is being written); a damaged one is a LogError naming the file."""
    try:
        return _read_run(Path(path), name)
    except LogError:
        raise
    except (OSError, KeyError, ValueError, TypeError, IndexError) as e:
        raise LogError(f"{path}: not a readable ESSA run log ({type(e).__name__}: {str(e)[:160]})") from None


def _read_run(path: Path, name: str | None) -> Run:
    with open_log(path) as f:
        if "gen" not in f or "gen/rewards" not in f:
            raise LogError(f"{path}: not an ESSA run log (no /gen/rewards)")
        g = f["gen"]
        for ds in g.values():
            if f.swmr_mode:
                ds.refresh()
        n = min(ds.shape[0] for ds in g.values())  # rows every dataset holds (a live writer resizes one by one)
        data = {k: ds[:n] for k, ds in g.items()}
        phases = _json_attr_ds(g["timings"], "phases") or [f"phase{i}" for i in range(g["timings"].shape[-1])]
        ev: dict[str, np.ndarray] = {}
        if "eval" in f:
            e = f["eval"]
            for ds in e.values():
                if f.swmr_mode:
                    ds.refresh()
            ne = min((ds.shape[0] for ds in e.values()), default=0)
            ev = {k: ds[:ne] for k, ds in e.items()}
        finished = bool("final/written" in f and f["final/written"][()] == 1)
        config = _json_attr(f, "config", {})
        meta = {
            "path": str(path),
            "world_size": int(_attr(f, "world_size", data["timings"].shape[1] if n else 0)),
            "popsize": int(_attr(f, "popsize", data["rewards"].shape[1])),
            "d": int(_attr(f, "solution_length", -1)),
            "batch_size": _cfg(config, "task", "batch_size"),
            "generations": n,
            "finished": finished,
            "hostnames": _json_attr(f, "hostnames", []),
            "started_at": _attr(f, "started_at", ""),
            "resumed_at": _attr(f, "resumed_at", ""),
            "version": _attr(f, "version", ""),
            "git_sha": _attr(f, "git_sha", ""),
            "schema_version": _attr(f, "schema_version", None),
            "library_versions": _json_attr(f, "library_versions", {}),
            "backend": _cfg(config, "backend", "name"),
            "task": _cfg(config, "task", "name"),
            "model": _cfg(config, "model", "path"),
            "eval_k": _cfg(config, "eval", "k"),
            "target_metric": _cfg(config, "run", "target_metric"),
            "config": config,
            "metrics": [k for k in ev if k not in ("gen", "wall_time")],
        }
        meta["n_hosts"] = len(set(meta["hostnames"]))
    name = name or _cfg(config, "run", "name") or path.parent.name
    return _tables(name, path, meta, data, ev, list(phases), finished)


def _json_attr_ds(ds: h5py.Dataset, key: str) -> list[str] | None:
    v = ds.attrs.get(key)
    if v is None:
        return None
    return json.loads(v.decode() if isinstance(v, bytes) else str(v))


def _cfg(config: dict[str, Any], section: str, key: str) -> Any:
    sec = config.get(section)
    return sec.get(key) if isinstance(sec, dict) else None


def _tables(
    name: str, path: Path, meta: dict[str, Any], data: dict[str, np.ndarray], ev: dict[str, np.ndarray], phases: list[str], finished: bool
) -> Run:
    meta = {"run": name, **meta}
    rewards = np.asarray(data["rewards"], dtype=np.float64)
    G = rewards.shape[0]
    timings = np.array(data["timings"], dtype=np.float64)  # (G, R, K)
    R = timings.shape[1] if timings.ndim == 3 else int(meta["world_size"])
    P = {p: i for i, p in enumerate(phases)}
    if G and not finished:  # the late phases of a live log's last row arrive with the next generation
        for p in LATE_PHASES:
            if p in P:
                timings[G - 1, :, P[p]] = np.nan
    tokens = np.asarray(data["tokens"], dtype=np.int64).reshape(G, R)
    wall = np.asarray(data["wall_time"], dtype=np.float64)

    # validation
    vt = pd.DataFrame(
        {
            "run": name,
            "gen": np.asarray(ev.get("gen", []), dtype=np.int64),
            "wall_time": np.asarray(ev.get("wall_time", []), dtype=np.float64),
        }
    )
    for m in meta["metrics"]:
        vt[m] = np.asarray(ev[m], dtype=np.float64)

    # per generation
    gt = pd.DataFrame({"run": name, "gen": np.arange(G, dtype=np.int64), "wall_time": wall})
    if G:
        gt["reward_mean"] = rewards.mean(axis=1)
        gt["reward_max"] = rewards.max(axis=1)
        gt["reward_min"] = rewards.min(axis=1)
        gt["reward_std"] = rewards.std(axis=1)
        for col, q in QUANTILES.items():
            gt[col] = np.quantile(rewards, q, axis=1)
    else:
        for col in ("reward_mean", "reward_max", "reward_min", "reward_std", *QUANTILES):
            gt[col] = np.empty(0)
    gt["sigma"] = np.asarray(data["sigma"], dtype=np.float64)
    for col in ("failures", "timeouts"):
        gt[col] = np.asarray(data[col], dtype=np.int64) if col in data else 0
    gt["tokens"] = tokens.sum(axis=1)
    gen_idx = P.get("generate")
    gt["generate_s"] = timings[:, :, gen_idx].max(axis=1) if gen_idx is not None and G else np.nan
    # seconds per generation from the wall clock; the first generation starts after the warm-start validation
    start = float(vt.loc[vt["gen"] == 0, "wall_time"].iloc[0]) if (vt["gen"] == 0).any() else np.nan
    prev = np.concatenate([[start], wall[:-1]]) if G else np.empty(0)
    gt["gen_s"] = wall - prev
    t0 = start if np.isfinite(start) else 0.0
    gt.insert(3, "train_time", wall - t0)
    vt.insert(3, "train_time", vt["wall_time"] - t0)
    # without the validation and checkpoint that ran between two generations (slowest rank)
    side = np.zeros(G)
    for p in ("eval", "checkpoint"):
        if p in P and G:
            side += np.nan_to_num(timings[:, :, P[p]].max(axis=1))
    gt["iter_s"] = gt["gen_s"] - np.concatenate([[0.0], side[:-1]]) if G else np.empty(0)

    # per rank and phase (long) and per rank
    gg, rr, kk = np.meshgrid(np.arange(G), np.arange(R), np.arange(len(phases)), indexing="ij")
    tt = pd.DataFrame(
        {
            "run": name,
            "gen": gg.ravel().astype(np.int64),
            "rank": rr.ravel().astype(np.int64),
            "phase": pd.Categorical(np.asarray(phases, dtype=object)[kk.ravel()], categories=phases),
            "seconds": timings.ravel(),
        }
    )
    g2, r2 = np.meshgrid(np.arange(G), np.arange(R), indexing="ij")
    rt = pd.DataFrame(
        {
            "run": name,
            "gen": g2.ravel().astype(np.int64),
            "rank": r2.ravel().astype(np.int64),
            "tokens": tokens.ravel(),
            "generate_s": timings[:, :, gen_idx].ravel() if gen_idx is not None else np.nan,
        }
    )
    return Run(
        name=name, path=path, meta=meta, gen=gt, validation=vt, timings=tt, ranks=rt, rewards=rewards, phase_array=timings, phases=phases
    )


class Runs:
    """Several runs; every table concatenates the runs' tables (column ``run`` tells them apart)."""

    def __init__(self, runs: Sequence[Run]) -> None:
        self.runs = list(runs)

    def __len__(self) -> int:
        return len(self.runs)

    def __iter__(self) -> Iterator[Run]:
        return iter(self.runs)

    def __getitem__(self, name: str) -> Run:
        for r in self.runs:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.runs]

    def _concat(self, attr: str) -> pd.DataFrame:
        frames = [getattr(r, attr) for r in self.runs]
        frames = [f for f in frames if len(f)] or frames[:1]
        if not frames:
            return pd.DataFrame()
        out = pd.concat(frames, ignore_index=True)
        if attr == "timings":  # keep the logged phase order even where runs' categories differ
            phases = list(dict.fromkeys(p for r in self.runs for p in r.phases))
            out["phase"] = pd.Categorical(out["phase"].astype(str), categories=phases)
        return out

    def generations(self) -> pd.DataFrame:
        return self._concat("gen")

    def validation(self) -> pd.DataFrame:
        return self._concat("validation")

    def timings(self) -> pd.DataFrame:
        return self._concat("timings")

    def rank_stats(self) -> pd.DataFrame:
        return self._concat("ranks")

    def metadata(self) -> pd.DataFrame:
        rows = []
        for r in self.runs:
            m = dict(r.meta)
            rows.append(m)
        return pd.DataFrame(rows)

    @property
    def metrics(self) -> list[str]:
        return list(dict.fromkeys(m for r in self.runs for m in r.metrics))


def load_runs(items: Iterable[str | Path]) -> Runs:
    """Load logs (files, run directories, globs); run names are config run.name, made unique."""
    runs: list[Run] = []
    seen: dict[str, int] = {}
    for p in find_logs(items):
        run = read_run(p)
        name = run.name
        if name in seen:
            alt = f"{p.parent.parent.name}/{p.parent.name}"
            name = alt if alt not in seen else f"{name}#{seen[name] + 1}"
        seen[name] = seen.get(name, 0) + 1
        if name != run.name:
            run = read_run(p, name=name)
        runs.append(run)
    return Runs(runs)


def load_run(path: str | Path) -> Run:
    return read_run(next(iter(find_logs([path]))))


# ----------------------------------------------------------------------------------------------------
# derived per-run numbers used by plots and the report


SIGNATURE_IGNORE = {
    "run": ("name", "dir", "generations", "time_budget_s", "overwrite", "target_metric", "target_value"),
    "model": ("threads", "device", "cache_dir"),
    "log": ("checkpoint_every", "progress"),
    "eval": ("every",),
}


def signature(config: dict[str, Any]) -> str:
    """What makes runs comparable across world sizes: the config without identity, stop and I/O keys."""
    d = json.loads(json.dumps(config))
    for sec, keys in SIGNATURE_IGNORE.items():
        for k in keys:
            if isinstance(d.get(sec), dict):
                d[sec].pop(k, None)
    return json.dumps(d, sort_keys=True)


def phase_totals(run: Run) -> pd.Series:
    """Seconds per phase summed over generations and ranks (cells not yet known are skipped)."""
    s = run.timings.groupby("phase", observed=False)["seconds"].sum(min_count=0)
    return s.reindex(run.phases).fillna(0.0)


def overhead_share(run: Run) -> float:
    """Share of the ranks' measured time spent outside generate and reward (allgather, tell, log,
    checkpoint, eval, other), summed over ranks and generations."""
    t = phase_totals(run)
    total = float(t.sum())
    if total <= 0:
        return float("nan")
    work = float(sum(t.get(p, 0.0) for p in WORK_PHASES))
    return (total - work) / total


def throughput(run: Run) -> float:
    """Generated tokens per second of wall-clock time over the logged generations (all ranks together)."""
    seconds = float(np.nansum(run.gen["gen_s"].to_numpy()))
    return float(run.gen["tokens"].sum()) / seconds if seconds > 0 else float("nan")


def time_to_target(run: Run, metric: str, target: float, since_start: bool = False) -> tuple[float, float]:
    """(seconds, generations completed) at the first validation with metric ≥ target; (nan, nan) if never.

    Seconds count from the start of the first generation (setup and the warm-start validation left
    out: they do not shrink with more ranks and would hide the scaling), or from the job's start with
    since_start=True.
    """
    v = run.validation
    if metric not in v.columns or v.empty:
        return float("nan"), float("nan")
    hit = v[v[metric] >= target]
    if hit.empty:
        return float("nan"), float("nan")
    first = hit.iloc[0]
    return float(first["wall_time" if since_start else "train_time"]), float(first["gen"])


def tokens_per_sample(run: Run) -> float:
    """Generated tokens per (candidate, prompt) sample: tokens / (λ · batch) per generation."""
    b = run.meta.get("batch_size")
    if not b or run.gen.empty:
        return float("nan")
    return float(run.gen["tokens"].mean()) / (run.meta["popsize"] * float(b))
