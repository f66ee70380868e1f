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
        try:
            self._copy_into(tmp, gen, config_json, hostnames)
        except BaseException:
            partial = getattr(self, "f", None)
            if partial is not None:
                with contextlib.suppress(Exception):
                    partial.close()
            tmp.unlink(missing_ok=True)  # the old log stays as it was; no half-written copy is left
            raise
        tmp.replace(self.path)

    def _copy_into(self, tmp: Path, gen: int, config_json: str, hostnames: list[str]) -> None:
        with open_live(self.path) as old:
            a = old.attrs
            if int(a["popsize"]) != self.popsize or int(a["solution_length"]) != self.dim:
                raise LogFileError(
                    f"{self.path}: log was written with popsize {a['popsize']}, d {a['solution_length']}; "
                    f"this run has popsize {self.popsize}, d {self.dim}"
                )
            if int(a["world_size"]) != self.world:
                raise LogFileError(
                    f"{self.path}: log was written by {a['world_size']} ranks; resume with the same number "
                    f"of ranks (this job has {self.world})"
                )
            missing = [m for m in self.metrics if f"eval/{m}" not in old]
            if missing:
                raise LogFileError(f"{self.path}: log has no datasets for metrics {missing}")
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


class LogFileError(ValueError):
    """A log.h5 that cannot be used (not HDF5, truncated, not an ESSA log, another run's shape); one line."""


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def hdf5_problem(path: str | Path) -> str | None:
    """Why ``path`` is no intact HDF5 file, read from its superblock alone, or None.

    HDF5 records the end-of-file address in the superblock; a file shorter than that was cut off (a
    full disk, a node lost mid-write). Opening such a file makes the HDF5 library retry its metadata
    reads for minutes inside C code, where no Python signal handler runs, so the tools check first
    (docs/design.md, "Faults and hostile inputs"). Superblock layouts: HDF5 file format specification,
    section II.A (versions 0-1: EOF address after the flags and two addresses; versions 2-3: after the
    flags byte, base, and extension addresses).
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with p.open("rb") as fh:
            where = -1
            for off in (0, 512, 1024, 2048):  # the superblock follows an optional user block of 512·2^k bytes
                fh.seek(off)
                if fh.read(8) == HDF5_SIGNATURE:
                    where = off
                    break
            if where < 0:
                return f"cannot open as HDF5: not an HDF5 file ({size} bytes, no HDF5 signature)"
            fh.seek(where)
            sb = fh.read(96)
    except IsADirectoryError:
        return "is a folder, expected an HDF5 file"
    except OSError as e:
        return f"cannot read ({e.strerror})"
    version = sb[8] if len(sb) > 8 else -1
    if version in (0, 1):
        o = sb[13] if len(sb) > 13 else 0
        at = 24 + (4 if version == 1 else 0) + 2 * o  # after base and free-space addresses
    elif version in (2, 3):
        o = sb[9] if len(sb) > 9 else 0
        at = 12 + 2 * o  # after base and superblock-extension addresses
    else:
        return f"unknown HDF5 superblock version {version}"
    if o not in (2, 4, 8) or len(sb) < at + o:
        return f"truncated or damaged HDF5 superblock ({size} bytes)"
    base_at = 24 + (4 if version == 1 else 0) if version in (0, 1) else 12
    base = int.from_bytes(sb[base_at : base_at + o], "little")
    eof = int.from_bytes(sb[at : at + o], "little")
    if where + base + eof > size:
        return (
            f"truncated: {size} bytes on disk, the HDF5 superblock records {where + base + eof} "
            "(cut off by a full disk or a crash mid-write)"
        )
    return None


def check_file(path: str | Path, live_retries: int = 3) -> None:
    """Raise LogFileError when ``path`` is no intact HDF5 file. A live SWMR writer may be extending the
    file this very moment, so a short file is looked at again a few times before it counts as cut off."""
    problem = hdf5_problem(path)
    for _ in range(live_retries if problem and problem.startswith("truncated") else 0):
        time.sleep(0.5)
        problem = hdf5_problem(path)
        if problem is None:
            break
    if problem:
        raise LogFileError(f"{path}: {problem}")


def swmr_writer_flag(path: str | Path) -> bool:
    """True when the superblock says a writer has the file open (a live run, or one killed with SIGKILL):
    a plain ``h5py.File(path, "r")`` then fails with "file is already open for write"; SWMR reading works."""
    try:
        with Path(path).open("rb") as fh:
            sb = fh.read(12)
    except OSError:
        return False
    return sb[:8] == HDF5_SIGNATURE and sb[8] in (2, 3) and sb[11] != 0


def open_live(path: str | Path) -> h5py.File:
    """Open a log for reading, also while the run writes it (SWMR) or after its writer was killed (the
    file's "open for write" flag still set); call ds.refresh() to follow. Checks the file first (check_file).
    """
    check_file(path)
    try:
        return h5py.File(path, "r", libver="latest", swmr=True)
    except OSError as swmr_error:
        try:  # a log written without SWMR (an older one, or another tool's)
            return h5py.File(path, "r", locking=False)
        except OSError:
            raise LogFileError(f"{path}: cannot open as HDF5 ({swmr_error})") from None


def check_resumable(path: Path, *, world_size: int, popsize: int, gen: int) -> None:
    """Before anything is rewritten: the log a resume continues must be intact, an ESSA log of this
    run's shape and rank count, and hold the checkpoint's generations (else its rows would not line up
    with generation numbers). Raises LogFileError naming what is wrong and what to do."""
    if not path.exists():
        if gen > 0:
            raise LogFileError(
                f"{path} is missing but the checkpoint is at generation {gen}: resuming would restart the log at "
                "row 0 without generations 0.."
                f"{gen - 1}; restore log.h5, or start over (delete the checkpoints folder, or pick a new run.name)"
            )
        return
    with open_live(path) as f:
        if "gen/sigma" not in f or "popsize" not in f.attrs:
            raise LogFileError(f"{path}: not an essa_hpc run log (no /gen/sigma); restore the run's log.h5 or pick a new run.name")
        logged_world, logged_pop = int(f.attrs.get("world_size", -1)), int(f.attrs["popsize"])
        if f.swmr_mode:
            f["gen/sigma"].refresh()
        rows = int(f["gen/sigma"].shape[0])
    if logged_world != world_size:
        raise LogFileError(
            f"{path}: written by {logged_world} rank(s), this job has {world_size}; resume with {logged_world} rank(s) "
            "(results do not depend on the rank count, but the log's per-rank timings and tokens do)"
        )
    if logged_pop != popsize:
        raise LogFileError(f"{path}: written with search.popsize={logged_pop}, this run has {popsize}")
    if rows < gen:
        raise LogFileError(
            f"{path}: holds {rows} generation(s) but the checkpoint is at generation {gen}; restore the full log.h5, "
            "or start over (delete the checkpoints folder, or pick a new run.name)"
        )


def monotonic() -> float:
    return time.perf_counter()
