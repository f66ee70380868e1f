"""Atomic checkpoints and resume (DESIGN.md step 6, issue 7).

A checkpoint is one pickle holding everything the loop needs to continue bit-identically: the next
generation, the optimizer state (which owns its RNG), the best validation point so far, the elapsed
wall time and the config digest. Minibatches and sampling seeds are pure functions of (run.seed,
generation), so they need no state. Written by rank 0 only: temp file, fsync, rename, fsync of the
folder; the previous checkpoint is kept as ``previous.pkl`` until the new one is in place.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

FORMAT = 1
NAME = "latest.pkl"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for this run; the message says why and what to do."""


def path_in(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / NAME


def save(run_dir: Path, state: dict[str, Any]) -> Path:
    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / NAME
    tmp = folder / f".{NAME}.tmp"
    with open(tmp, "wb") as fh:
        pickle.dump({"format": FORMAT, **state}, fh, protocol=pickle.HIGHEST_PROTOCOL)
        fh.flush()
        os.fsync(fh.fileno())
    if target.exists():
        os.replace(target, folder / "previous.pkl")
    os.replace(tmp, target)
    dirfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
    return target


def load(run_dir: Path, config_digest: str) -> dict[str, Any]:
    p = path_in(run_dir)
    try:
        with open(p, "rb") as fh:
            state = pickle.load(fh)
    except FileNotFoundError:
        raise CheckpointError(f"--resume: no checkpoint at {p}") from None
    except (pickle.UnpicklingError, EOFError) as e:
        raise CheckpointError(f"{p}: unreadable checkpoint ({e}); {p.parent / 'previous.pkl'} may hold the one before") from None
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{p}: checkpoint format {state.get('format')}, this version reads {FORMAT}")
    if state["config_digest"] != config_digest:
        raise CheckpointError(
            f"{p}: written under another configuration (digest {state['config_digest']}, now {config_digest}); "
            "resume with the run's config.yaml, or start a new run.name"
        )
    return state


def exists(run_dir: Path) -> bool:
    return path_in(run_dir).is_file()
