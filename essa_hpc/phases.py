"""Where a generation's time goes on one rank: seconds per phase, and when each phase is reported.

A generation's timings travel to rank 0 inside its Allgather records (dist.py), so they cost no extra
collective. The records leave at the Allgather, before the phases after it have been measured, so
those *late* phases (allgather, tell, log, checkpoint, eval) ride in the next generation's records
and rank 0 writes them into the previous row of ``/gen/timings`` one generation later; the last
generation's are gathered once more after the loop (runlog.RunLog.patch_late_timings; the log's
schema is in docs/design.md, "HDF5 log").
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import numpy as np

PHASES = ("generate", "reward", "allgather", "tell", "log", "checkpoint", "eval", "other")
LATE = ("allgather", "tell", "log", "checkpoint", "eval")  # measured after the Allgather: reported one generation later
INDEX = {p: i for i, p in enumerate(PHASES)}
_LATE = np.isin(np.arange(len(PHASES)), [INDEX[p] for p in LATE])


class Phases:
    """This rank's seconds per phase: the current generation's, and the late ones of the previous one."""

    def __init__(self) -> None:
        self.now = np.zeros(len(PHASES))  # the current generation, phase by phase
        self.previous_late = np.zeros(len(PHASES))  # the previous generation's late phases (zeros elsewhere)
        self.started = time.perf_counter()

    def begin(self) -> None:
        """A new generation: the finished one's late phases wait for this generation's records."""
        self.previous_late = self.late()
        self.now = np.zeros(len(PHASES))
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def time(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - t0)

    def add(self, phase: str, seconds: float) -> None:
        self.now[INDEX[phase]] += seconds

    def seconds(self, phase: str) -> float:
        return float(self.now[INDEX[phase]])

    def since_begin(self) -> float:
        return time.perf_counter() - self.started

    def outgoing(self) -> np.ndarray:
        """What this generation's record carries: its own early phases and the previous generation's late ones."""
        return np.where(_LATE, self.previous_late, self.now)

    def late(self) -> np.ndarray:
        """The current generation's late phases (zeros elsewhere); after the loop, the last generation's."""
        return np.where(_LATE, self.now, 0.0)


def split(per_rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gathered [world, PHASES] timings -> (this generation's early phases, the previous generation's late ones)."""
    return np.where(_LATE, 0.0, per_rank), np.where(_LATE, per_rank, 0.0)
