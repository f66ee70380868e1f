"""Which GPUs a rank owns: the one placement rule, for every launcher and backend.

A rank owns ``tp`` GPUs (its tensor-parallel size; 1 = one rank per GPU). On a node whose processes
see the devices ``visible`` (CUDA_VISIBLE_DEVICES: indices or UUIDs), the rank with local rank ``L``
owns entries ``[L*tp, (L+1)*tp)``, so ranks per node x tp must equal the node's GPUs. When exactly
``tp`` devices are visible, SLURM (``--gpus-per-task``) or the rank wrapper already bound them to this
rank and they are kept. ``ESSA_GPU_MAP=0`` leaves CUDA_VISIBLE_DEVICES alone (a site that binds GPUs
itself); no visible GPU (a CPU run) means nothing to bind.

The local rank is an argument, never read here: the communicator (or submitit's job environment)
knows it. The rule exists once in Python; ``slurm/essa_rank.sh`` applies the same rule in bash before
Python starts (it mirrors :func:`gpu_slice`, and tests/test_placement.py checks that the two agree).
Nothing here imports MPI or CUDA: binding must happen before either initializes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

NO_DEVICES = "NoDevFiles"  # what SLURM puts in CUDA_VISIBLE_DEVICES when a job step has no GPU


class PlacementError(RuntimeError):
    """The node's visible GPUs do not cover this rank's share; the message names the rank and the devices."""


def rank_gpus(local_rank: int, tp: int, visible: Sequence[str]) -> list[str]:
    """This rank's devices: entries [local_rank·tp, (local_rank+1)·tp) of ``visible``; exactly tp visible: all of them."""
    if len(visible) == tp:
        return list(visible)
    first = local_rank * tp
    if first + tp > len(visible):
        raise PlacementError(
            f"local rank {local_rank} needs GPUs {first}..{first + tp - 1} (tensor-parallel size {tp}) but only {len(visible)} "
            f"are visible (CUDA_VISIBLE_DEVICES={','.join(visible) or 'unset'}): ranks per node x tp must equal the GPUs per "
            "node (or set ESSA_GPU_MAP=0 when the site binds GPUs itself)"
        )
    return list(visible[first : first + tp])


def parse_visible(text: str | None) -> list[str]:
    """The entries of a CUDA_VISIBLE_DEVICES value; [] for unset, empty or SLURM's ``NoDevFiles``."""
    devices = [v.strip() for v in (text or "").split(",") if v.strip()]
    return [] if devices == [NO_DEVICES] else devices


def gpu_slice(visible: str | None, local_rank: int, tp: int) -> str | None:
    """CUDA_VISIBLE_DEVICES for one rank from the node's value; None: leave it unchanged (no GPUs, or already bound)."""
    devices = parse_visible(visible)
    if not devices or len(devices) == tp:
        return None
    return ",".join(rank_gpus(local_rank, tp, devices))


def visible_gpus(count_gpus: Callable[[], int] | None = None) -> list[str] | None:
    """The devices this process may bind, or None: ``ESSA_GPU_MAP=0``, or no GPU visible.

    With CUDA_VISIBLE_DEVICES unset every GPU of the node is visible; ``count_gpus`` (e.g. torch's
    device count, which needs no CUDA context) says how many, and without it none are assumed.
    """
    if os.environ.get("ESSA_GPU_MAP", "1") == "0":
        return None
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = parse_visible(raw) if raw is not None else [str(i) for i in range((count_gpus or (lambda: 0))())]
    return devices or None


def bind_rank_gpus(local_rank: int, tp: int, count_gpus: Callable[[], int] | None = None) -> list[str] | None:
    """Narrow CUDA_VISIBLE_DEVICES to this rank's ``tp`` devices before CUDA starts; None when there is nothing to bind."""
    visible = visible_gpus(count_gpus)
    if visible is None:
        return None
    mine = rank_gpus(local_rank, tp, visible)
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
    return mine
