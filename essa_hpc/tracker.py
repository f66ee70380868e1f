"""Optional experiment trackers on rank 0: TensorBoard event files or Weights & Biases (offline by default).

``log.report_to`` picks one (``none`` by default). The tracker is a mirror of the HDF5 log, never a
second source of truth (docs/design.md, Trackers): :class:`essa_hpc.runlog.RunLog` hands it each row
as it writes it, with the HDF5 dataset paths as tag names, and the generation index as the step:

- ``gen/reward_mean``, ``gen/reward_max``, ``gen/reward_min``, ``gen/reward_std``, ``gen/sigma``,
  ``gen/wall_time``, ``gen/tokens`` (summed over ranks), ``gen/failures``, ``gen/timeouts``;
- ``gen/timings/<phase>``: the slowest rank's seconds in that phase. Phases measured after the
  Allgather (essa_hpc/phases.py, LATE) reach the log one generation later, and so reach the tracker;
- ``eval/<metric>`` at the generation the validation ran after (the ``eval/gen`` column).

On a resume the rewound generations are written again at the same steps (TensorBoard shows the last
value; W&B keeps the first). Only rank 0 opens a tracker, so no other rank needs the package.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    """Event files under ``<run_dir>/tensorboard`` (``tensorboard --logdir runs/``)."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), global_step=int(step))
        self.writer.flush()  # once per row: a live `tensorboard --logdir` sees every generation

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """One W&B run per ESSA run, offline unless ``WANDB_MODE`` says otherwise (``wandb sync`` uploads it).

    Steps go through a ``generation`` metric (``define_metric``), because the late phases of a
    generation arrive after the next generation was logged and W&B's own step only moves forward.
    """

    def __init__(self, run_dir: Path, name: str, project: str, config: dict[str, Any]) -> None:
        import wandb

        self.wandb = wandb
        mode: Any = os.environ.get("WANDB_MODE", "offline")  # wandb validates it (online, offline, disabled, ...)
        self.run = wandb.init(
            project=project,
            name=name,
            id=name,
            resume="allow",
            dir=str(run_dir),
            config=config,
            mode=mode,
        )
        self.run.define_metric("generation")
        self.run.define_metric("*", step_metric="generation")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log({"generation": int(step), **{k: float(v) for k, v in values.items()}})

    def close(self) -> None:
        self.run.finish()


def make_tracker(report_to: str, run_dir: Path, name: str, project: str, config: dict[str, Any]) -> Tracker | None:
    """The tracker ``log.report_to`` asks for, or None. Config validation already checked the package is there."""
    if report_to == "tensorboard":
        return TensorBoardTracker(Path(run_dir) / "tensorboard")
    if report_to == "wandb":
        return WandbTracker(Path(run_dir), name, project, config)
    return None
