"""Backends: how candidate vectors become completions (see base.py for the protocol).

`make_backend(cfg, loaded, svd)` picks one by ``backend.name``. Each backend lives in its own module,
imported only when chosen (so the fake backend needs no torch model and vllm is never imported on a
CPU box); a module ``essa_hpc.backends.<name>`` provides ``create(cfg, loaded, svd) -> Backend``.
"""

from __future__ import annotations

import importlib
from typing import Any

from essa_hpc.backends.base import Backend, Completion, Request

__all__ = ["BACKENDS", "Backend", "Completion", "Request", "make_backend"]

# backend.name -> module providing create(cfg, loaded, svd)
BACKENDS = {"hf": "essa_hpc.backends.hf", "vllm": "essa_hpc.backends.vllm", "fake": "essa_hpc.backends.fake"}


def make_backend(cfg: Any, loaded: Any = None, svd: Any = None) -> Backend:
    """The backend ``cfg.backend.name`` over a loaded model (hf), a model path (vllm) or nothing (fake)."""
    name = cfg.backend.name
    if name not in BACKENDS:
        raise ValueError(f"backend.name: expected one of {tuple(BACKENDS)}, got {name!r}")
    try:
        module = importlib.import_module(BACKENDS[name])
    except ModuleNotFoundError as e:
        if e.name == BACKENDS[name]:
            raise ValueError(f"backend.name={name}: this installation has no {BACKENDS[name]} module") from None
        raise ValueError(f"backend.name={name} needs the package {e.name!r}, which is not installed") from None
    create = getattr(module, "create", None)
    if create is None:
        raise ValueError(f"backend.name={name}: {BACKENDS[name]} defines no create(cfg, loaded, svd)")
    backend: Backend = create(cfg, loaded, svd)
    return backend
