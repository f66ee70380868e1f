"""The HDF5 run log (``log.h5``), written by rank 0 only; schema in docs/design.md ("HDF5 log").

Every dataset is created up front, resizable and chunked, and the file is then switched to SWMR mode,
so ``h5py.File(path, "r", libver="latest", swmr=True)`` can follow a live run and the file stays
readable after a crash up to the last flushed generation. SWMR forbids creating datasets or attributes
later; that is why validation metric names are declared when the log is opened.

Datasets beyond the design document's table (documented here):
    /gen/failures, /gen/timeouts  (G,) int64   reward-function failures / timeouts per generation
    /gen/reward_mean, /gen/reward_max (G,)     convenience summaries of /gen/rewards
    /gen/digest    (G,) S16                    optimizer-state digest checked at that generation
    /eval/<metric> (E,)                        metric names given at creation (accuracy, pass@k, ...)
/gen/timings phases are phases.PHASES. The phases measured after the generation's Allgather
(phases.LATE) travel in the next generation's records, so row g's late phases are filled when
generation g+1 is logged (the last row after the loop); phases.py owns that rule.

The other ranks hold a ``NullLog``: the loop calls the same methods on every rank, and only rank 0's
calls write.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from essa_hpc import __version__
from essa_hpc.dist import DIGEST_BYTES
from essa_hpc.phases import INDEX as PHASE_INDEX
from essa_hpc.phases import LATE, PHASES
from essa_hpc.tracker import Tracker

SCHEMA_VERSION = 1


def git_sha() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "cma", "numpy", "h5py", "mpi4py", "vllm"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


class RunLog:
    """Append-only per-generation log; ``truncate`` rewinds it for a resume."""

    def __init__(
        self,
        path: Path,
        *,
        config_json: str,
        world_size: int,
        hostnames: list[str],
        popsize: int,
        solution_length: int,
        metrics: Iterable[str],
        resume_gen: int | None = None,
        tracker: Tracker | None = None,
    ) -> None:
        self.path = Path(path)
        self.tracker = tracker  # essa_hpc/tracker.py: a mirror of the rows below, never read back
        self.popsize, self.dim, self.world = popsize, solution_length, world_size
        self.metrics = list(dict.fromkeys(metrics))
        if resume_gen is not None and self.path.exists():
            self._rewrite_truncated(resume_gen, config_json, hostnames)
        else:
            self.f = h5py.File(self.path, "w", libver="latest")
            self._create(config_json, hostnames)
        self.f.swmr_mode = True
        self.f.flush()

    def _rewrite_truncated(self, gen: int, config_json: str, hostnames: list[str]) -> None:
        """Resume: copy generations < gen (and the validations logged up to the checkpoint) into a fresh file, then rename.

        Rewriting instead of editing in place works even when the crashed writer left the file's SWMR
        consistency flags set, and the old log stays intact until the new one is complete.
        """
        tmp = self.path.with_suffix(".h5.resume")
        with open_live(self.path) as old:
            a = old.attrs
            if int(a["popsize"]) != self.popsize or int(a["solution_length"]) != self.dim:
                raise ValueError(
                    f"{self.path}: log was written with popsize {a['popsize']}, d {a['solution_length']}; "
                    f"this run has popsize {self.popsize}, d {self.dim}"
                )
            if int(a["world_size"]) != self.world:
                raise ValueError(
                    f"{self.path}: log was written by {a['world_size']} ranks; resume with the same number "
                    f"of ranks (this job has {self.world})"
                )
            missing = [m for m in self.metrics if f"eval/{m}" not in old]
            if missing:
                raise ValueError(f"{self.path}: log has no datasets for metrics {missing}")
            self.f = h5py.File(tmp, "w", libver="latest")
            self._create(config_json, hostnames)
            for key in ("started_at", "hostnames"):
                self.f.attrs[key] = a[key]
            self.f.attrs["resumed_at"] = str(a.get("resumed_at", "")) + f"{_now()}@{gen};"
            for name, ds in old["gen"].items():
                rows = ds[: min(gen, ds.shape[0])]
                self.f["gen"][name].resize(rows.shape[0], axis=0)
                self.f["gen"][name][...] = rows
            keep = int(np.sum(old["eval/gen"][:] <= gen))  # validation at g runs after generation g, before its checkpoint
            for name in self.f["eval"]:
                rows = old["eval"][name][:keep]
                self.f["eval"][name].resize(keep, axis=0)
                self.f["eval"][name][...] = rows
        self.f.flush()
        tmp.replace(self.path)

    def _create(self, config_json: str, hostnames: list[str]) -> None:
        f, popsize, dim, world = self.f, self.popsize, self.dim, self.world
        f.attrs.update(
            {
                "config": config_json,
                "version": __version__,
                "schema_version": SCHEMA_VERSION,
                "git_sha": git_sha(),
                "world_size": world,
                "hostnames": json.dumps(hostnames),
                "popsize": popsize,
                "solution_length": dim,
                "started_at": _now(),
                "library_versions": json.dumps(library_versions()),
                "resumed_at": "",
            }
        )
        g = f.create_group("gen")

        def ds(grp: h5py.Group, name: str, shape: tuple[int, ...], dtype: Any) -> h5py.Dataset:
            return grp.create_dataset(
                name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype, chunks=(64, *shape) if shape else (256,)
            )

        ds(g, "rewards", (popsize,), np.float64)
        ds(g, "seeds", (popsize,), np.uint64)
        ds(g, "sigma", (), np.float64)
        ds(g, "wall_time", (), np.float64)
        ds(g, "timings", (world, len(PHASES)), np.float64).attrs["phases"] = json.dumps(list(PHASES))
        ds(g, "tokens", (world,), np.int64)
        ds(g, "failures", (), np.int64)
        ds(g, "timeouts", (), np.int64)
        ds(g, "reward_mean", (), np.float64)
        ds(g, "reward_max", (), np.float64)
        ds(g, "digest", (), f"S{DIGEST_BYTES}")
        e = f.create_group("eval")
        for name in ("gen", "wall_time", *self.metrics):
            ds(e, name, (), np.int64 if name == "gen" else np.float64)
        fin = f.create_group("final")
        fin.create_dataset("mean", shape=(dim,), dtype=np.float64, fillvalue=np.nan)
        fin.create_dataset("best", shape=(dim,), dtype=np.float64, fillvalue=np.nan)
        fin.create_dataset("written", shape=(), dtype=np.uint8, data=0)

    @property
    def generations(self) -> int:
        return int(self.f["gen/sigma"].shape[0])

    def append_generation(
        self,
        *,
        rewards: np.ndarray,
        seeds: np.ndarray,
        sigma: float,
        wall_time: float,
        timings: np.ndarray,
        tokens: np.ndarray,
        failures: int,
        timeouts: int,
        digest: bytes,
        prev_late_timings: np.ndarray | None = None,
    ) -> None:
        g = self.f["gen"]
        n = g["sigma"].shape[0]
        row = {
            "rewards": rewards,
            "seeds": seeds,
            "sigma": sigma,
            "wall_time": wall_time,
            "timings": timings,
            "tokens": tokens,
            "failures": failures,
            "timeouts": timeouts,
            "reward_mean": float(np.mean(rewards)),
            "reward_max": float(np.max(rewards)),
            "digest": digest,
        }
        for name, value in row.items():
            ds = g[name]
            ds.resize(n + 1, axis=0)
            ds[n] = value
        if prev_late_timings is not None and n > 0:
            self.patch_late_timings(n - 1, prev_late_timings)
        self.f.flush()
        if self.tracker is not None:
            early = ~np.isin(np.arange(len(PHASES)), [PHASE_INDEX[p] for p in LATE])
            rw = np.asarray(rewards, dtype=np.float64)
            values: dict[str, float] = {
                "gen/reward_mean": float(np.mean(rw)),
                "gen/reward_max": float(np.max(rw)),
                "gen/reward_min": float(np.min(rw)),
                "gen/reward_std": float(np.std(rw)),
                "gen/sigma": float(sigma),
                "gen/wall_time": float(wall_time),
                "gen/tokens": float(np.sum(tokens)),
                "gen/failures": float(failures),
                "gen/timeouts": float(timeouts),
            }
            slowest = np.max(np.asarray(timings, dtype=np.float64), axis=0)
            values.update({f"gen/timings/{ph}": float(slowest[i]) for i, ph in enumerate(PHASES) if early[i]})
            self.tracker.scalars(n, values)

    def patch_late_timings(self, gen: int, late: np.ndarray) -> None:
        """Fill the after-Allgather phases of generation `gen` (phases.LATE; see the module docstring)."""
        ds = self.f["gen/timings"]
        row = ds[gen]
        mask = late > 0
        row[mask] = late[mask]
        ds[gen] = row
        self.f.flush()
        if self.tracker is not None:
            slowest = np.max(row, axis=0)
            self.tracker.scalars(gen, {f"gen/timings/{ph}": float(slowest[PHASE_INDEX[ph]]) for ph in LATE})

    def append_eval(self, gen: int, wall_time: float, metrics: dict[str, float]) -> None:
        e = self.f["eval"]
        n = e["gen"].shape[0]
        values = {"gen": gen, "wall_time": wall_time, **{m: metrics.get(m, np.nan) for m in self.metrics}}
        for name, value in values.items():
            ds = e[name]
            ds.resize(n + 1, axis=0)
            ds[n] = value
        self.f.flush()
        if self.tracker is not None:
            self.tracker.scalars(gen, {f"eval/{m}": float(metrics[m]) for m in self.metrics if m in metrics})

    def write_final(self, mean: np.ndarray, best: np.ndarray | None) -> None:
        self.f["final/mean"][:] = mean
        if best is not None:
            self.f["final/best"][:] = best
        self.f["final/written"][()] = 1
        self.f.flush()

    def finish(self, late: np.ndarray, mean: np.ndarray, best: np.ndarray | None) -> None:
        """After the loop: the last generation's late phases (gathered [world, PHASES]), the final vectors, close."""
        if self.generations:
            self.patch_late_timings(self.generations - 1, late)
        self.write_final(mean, best)
        self.close()

    def close(self) -> None:
        if self.f.id.valid:
            self.f.flush()
            self.f.close()
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None


class NullLog:
    """The run log of ranks other than 0: the same calls, nothing written."""

    generations = 0

    def append_generation(self, **row: Any) -> None:
        pass

    def patch_late_timings(self, gen: int, late: np.ndarray) -> None:
        pass

    def append_eval(self, gen: int, wall_time: float, metrics: dict[str, float]) -> None:
        pass

    def write_final(self, mean: np.ndarray, best: np.ndarray | None) -> None:
        pass

    def finish(self, late: np.ndarray, mean: np.ndarray, best: np.ndarray | None) -> None:
        pass

    def close(self) -> None:
        pass


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def open_live(path: str | Path) -> h5py.File:
    """Open a log for reading, also while the run writes it (SWMR); call ds.refresh() to follow."""
    return h5py.File(path, "r", libver="latest", swmr=True)


def monotonic() -> float:
    return time.perf_counter()
