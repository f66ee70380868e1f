"""Atomic checkpoints and resume (docs/design.md, "Run directory").

A checkpoint is one pickle holding everything the loop needs to continue bit-identically: the
``State`` below (the next generation, the optimizer state, which owns its RNG, the validations and the
best validation point so far, the elapsed wall time) and the config digest. Minibatches and sampling
seeds are pure functions of (run.seed, generation), so they need no state. On disk the state is a
plain dict of builtins and numpy arrays, not a pickled class, so a checkpoint stays readable when the
code around it moves. Written by rank 0 only: temp file, fsync, rename, fsync of the folder; the
previous checkpoint is kept as ``previous.pkl`` until the new one is in place.
"""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = 1
NAME = "latest.pkl"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for this run; the message says why and what to do."""


@dataclass
class Best:
    """The best validation so far: its primary metric, the vector that scored it and its generation."""

    value: float = -math.inf
    vector: np.ndarray | None = None
    gen: int = -1


@dataclass
class State:
    """What a run carries from one generation to the next beyond what (run.seed, generation) determines."""

    gen: int = 0  # the next generation to run
    optimizer: dict[str, Any] = field(default_factory=dict)  # Optimizer.state_dict()
    elapsed: float = 0.0  # wall seconds spent before this start (the time budget counts them)
    trained: float = 0.0  # training seconds before this start, validation excluded (run.train_budget_s)
    best: Best = field(default_factory=Best)
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (generation, metrics) per validation
    space: dict[str, Any] = field(default_factory=dict)  # Space.state_dict() (empty for vector spaces)

    def record_validation(self, gen: int, metrics: dict[str, float], vector: np.ndarray, primary: str) -> None:
        self.evals.append((gen, metrics))
        if metrics[primary] > self.best.value:
            self.best = Best(metrics[primary], vector.copy(), gen)

    def to_dict(self) -> dict[str, Any]:
        best = {"value": self.best.value, "vector": self.best.vector, "gen": self.best.gen}
        return {
            "gen": self.gen,
            "optimizer": self.optimizer,
            "elapsed": self.elapsed,
            "trained": self.trained,
            "best": best,
            "evals": self.evals,
            "space": self.space,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> State:
        # "trained" is absent in checkpoints written before run.train_budget_s existed, "space" before search.space
        trained, space = float(d.get("trained", 0.0)), dict(d.get("space") or {})
        return cls(d["gen"], d["optimizer"], d["elapsed"], trained, Best(**d["best"]), d["evals"], space)


def save_state(run_dir: Path, state: State, config_digest: str, config: dict[str, Any] | None = None) -> Path:
    """Write the state; ``config`` (the run's Config.to_dict()) lets a refused resume name the keys that differ."""
    return save(run_dir, {**state.to_dict(), "config_digest": config_digest, **({"config": config} if config is not None else {})})


def load_state(run_dir: Path, config_digest: str, *, accept: tuple[str, ...] = (), config: dict[str, Any] | None = None) -> State:
    d = load(run_dir, config_digest, accept=accept, config=config)
    try:
        return State.from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path_in(run_dir)}: not a checkpoint of this version (missing or bad field {e})") from None


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


def load(run_dir: Path, config_digest: str | None, *, accept: tuple[str, ...] = (), config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint's dict, refused (CheckpointError, one line) when unreadable or written under
    another configuration: its digest must be config_digest or one of ``accept`` (digests older
    versions computed; None: any). With ``config`` (this run's Config.to_dict()) the message names the keys that
    differ, from the config the checkpoint stored (or the run directory's config.yaml)."""
    p = path_in(run_dir)
    try:
        with open(p, "rb") as fh:
            state = pickle.load(fh)
    except FileNotFoundError:
        raise CheckpointError(f"--resume: no checkpoint at {p}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{p}: is a folder, expected a checkpoint file") from None
    except Exception as e:  # UnpicklingError, EOFError, but also what a damaged or foreign pickle raises
        raise CheckpointError(
            f"{p}: unreadable checkpoint ({type(e).__name__}: {str(e)[:120]}); {p.parent / 'previous.pkl'} may hold the one before"
        ) from None
    if not isinstance(state, dict) or "config_digest" not in state:
        raise CheckpointError(
            f"{p}: not an essa_hpc checkpoint (it holds a {type(state).__name__}); {p.parent / 'previous.pkl'} may hold the one before"
        )
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{p}: checkpoint format {state.get('format')}, this version reads {FORMAT}")
    written = state["config_digest"]
    if config_digest is not None and written != config_digest and written not in accept:
        diff = _config_diff(Path(run_dir), state.get("config"), config) or f"digest {written}, now {config_digest}"
        raise CheckpointError(
            f"{p}: written under another configuration ({diff}); resume with the run's config.yaml, or start a new run.name"
        )
    return state


def _config_diff(run_dir: Path, stored: Any, config: dict[str, Any] | None) -> str:
    """'key: checkpoint value -> this run's value; ...' for the keys that change results, or ''."""
    if config is None:
        return ""
    from essa_hpc.config import digest_diff

    old = stored
    if not isinstance(old, dict):
        try:
            import yaml

            old = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        except Exception:  # no usable config.yaml: the digest alone must do
            return ""
        if not isinstance(old, dict):
            return ""
    diff = digest_diff(old, config)
    return f"differs in {diff}" if diff else ""


def exists(run_dir: Path) -> bool:
    return path_in(run_dir).is_file()
