"""The target weights a seeded space moves in place, and what it shares: update, digest, replay, export.

Used by ``lowrank`` and ``full`` (and open to QES) by composition: a space holds a ``TargetWeights`` and
says how its noise E_k of each matrix is drawn; this class adds Σ_k w_k E_k to every matrix, hashes the
weights, replays the update history on resume and writes the HF folder plus the delta
(docs/design.md, "Search spaces").

Precision (es-at-scale's rule, never subtract in low precision): updates are formed and accumulated in
float32 on a float32 *master* of each target matrix. A float32 model's master is the parameter itself
(``separate=False``) unless the space needs a pristine copy to restore from (``full``); a bf16/fp16
model always has a float32 master and the parameter holds its rounding.

Bit-identity: every rank applies the same float32 operations in the same order on the same rows, with
torch pinned to one thread (a BLAS reduction may block differently with more threads), so the weights
agree bit for bit on every rank and after a replay.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from essa_hpc.spaces.base import COEF, SpaceError

STATE_FORMAT = "essa-seeded-space-1"
DELTA_DIR = "delta"  # inside the exported model folder (transformers and vLLM read only the top level)


@dataclass
class Target:
    """One perturbed matrix: its module path, parameter, float32 master and matrix index (noise stream)."""

    name: str
    module: nn.Module
    param: torch.Tensor
    master: torch.Tensor
    index: int

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features)."""
        return (int(self.param.shape[0]), int(self.param.shape[1]))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def find_targets(model: Any, targets: Sequence[str]) -> list[tuple[str, nn.Linear]]:
    """Every nn.Linear whose last name is in ``targets``, in the model's module order, or a SpaceError."""
    found = [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets and isinstance(m, nn.Linear)]
    if not found:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise SpaceError(f"search.targets={list(targets)} match no Linear module of the model; its Linear modules are named {leaves}")
    for n, m in found:
        if not m.weight.dtype.is_floating_point:
            raise SpaceError(f"search.targets: {n} holds {m.weight.dtype} weights; a seeded space needs float weights")
    return found


Delta = Callable[[Target, np.ndarray], torch.Tensor]  # Σ_k w_k E_k of one target for update rows, float32 [out, in]


class TargetWeights:
    """The float32 masters of the target matrices, their update history, and the Space protocol's weight
    operations (``apply``, ``digest``, ``state_dict``, ``load_state_dict``, ``export``), which a seeded
    space takes over as its own: the space supplies only ``delta`` (how its noise sums to an update) and
    the names of layers its backend wrapped (``wrapped``)."""

    def __init__(
        self,
        space: str,
        loaded: Any,
        targets: Sequence[str],
        run_seed: int,
        separate: bool,
        base_model: str,
        delta: Delta,
        wrapped: Callable[[], Sequence[str]] = tuple,
    ) -> None:
        self.space, self.loaded, self.run_seed, self.base_model = space, loaded, int(run_seed), base_model
        self.delta, self.wrapped = delta, wrapped
        model = loaded.model
        self.targets: list[Target] = []
        for i, (name, module) in enumerate(find_targets(model, targets)):
            p = module.weight.data
            master = p.detach().to(torch.float32).clone() if (separate or p.dtype != torch.float32) else p
            self.targets.append(Target(name, module, p, master, i))
        self.history: list[np.ndarray] = []  # the seed-code rows of every update applied, in order

    @property
    def device(self) -> torch.device:
        return self.targets[0].param.device

    def sync(self, t: Target) -> None:
        """The parameter takes its master's value (rounded to the model dtype when that is lower)."""
        if t.master is not t.param:
            t.param.copy_(t.master.to(t.param.dtype))

    def apply(self, opt: Any) -> None:
        """The optimizer's last update (its seed-code rows) on every target."""
        self.add(opt.step())

    def add(self, rows: np.ndarray) -> None:
        """W_i ← W_i + delta(i, rows) for every target, in float32."""
        rows = np.array(rows, dtype=np.float64, copy=True)
        with torch.no_grad(), one_thread():
            for t in self.targets:
                t.master.add_(self.delta(t, rows).to(t.master.device))
                self.sync(t)
        self.history.append(rows)

    def digest(self) -> str:
        """sha256 over the float32 masters, in target order (a pass over the weights)."""
        h = hashlib.sha256()
        for t in self.targets:
            h.update(t.name.encode())
            h.update(np.ascontiguousarray(t.master.detach().cpu().numpy(), dtype="<f4").tobytes())
        return h.hexdigest()

    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "space": self.space, "steps": [r.copy() for r in self.history], "digest": self.digest()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replay the checkpoint's updates on the freshly loaded base weights, then check their digest."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("space") != self.space:
            got = (state.get("format"), state.get("space")) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"search space {self.space}: the checkpoint's space state is {got}, expected {(STATE_FORMAT, self.space)}")
        if self.history:
            raise RuntimeError(f"search space {self.space}: replay needs the base weights; {len(self.history)} updates are applied")
        for rows in state["steps"]:
            self.add(rows)
        if self.digest() != state["digest"]:
            raise ValueError(
                f"search space {self.space}: the replayed weights differ from the checkpoint's (digest {self.digest()[:16]} vs "
                f"{str(state['digest'])[:16]}); another base model, torch version or device?"
            )

    def delta_tensors(self) -> dict[str, torch.Tensor]:
        """Σ over the history of every target's update, float32, accumulated in the same order on zeros."""
        out = {}
        with torch.no_grad(), one_thread():
            for t in self.targets:
                acc = torch.zeros(t.shape, dtype=torch.float32)
                for rows in self.history:
                    acc.add_(self.delta(t, rows).cpu())
                out[f"{t.name}.weight"] = acc
        return out

    def export(self, x: np.ndarray, out: Path) -> None:
        """``out``: an HF model folder (safetensors, config, tokenizer) of the current weights, and
        ``out/delta/`` with the update alone (``delta.safetensors``: W = W_base + delta per parameter).
        ``x`` must be the zero row: a seeded space's mean is the weights themselves."""
        from safetensors.torch import save_file

        from essa_hpc.svd_lora import atomic_dir

        if np.any(np.asarray(x)[..., COEF]):
            raise ValueError(f"{self.space} export: expected the zero row (the current weights)")
        model, tok = self.loaded.model, self.loaded.tokenizer
        wrapped = list(self.wrapped())
        state = {}
        for key, value in model.state_dict().items():
            for w in wrapped:  # a wrapper installed by the backend keeps the original layer as .base
                if key.startswith(w + ".base."):
                    key = w + "." + key[len(w) + len(".base.") :]
            state[key] = value
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp, state_dict=state)  # safetensors (transformers 5 writes nothing else)
            if tok is not None:
                tok.save_pretrained(tmp)
            (tmp / DELTA_DIR).mkdir()
            save_file({k: v.contiguous() for k, v in self.delta_tensors().items()}, str(tmp / DELTA_DIR / "delta.safetensors"))
            meta = {
                "space": self.space,
                "base_model": self.base_model,
                "generations": len(self.history),
                "dtype": "float32",
                "rule": "W = W_base + delta for every parameter named in delta.safetensors",
                "parameters": [f"{t.name}.weight" for t in self.targets],
            }
            (tmp / DELTA_DIR / "delta.json").write_text(json.dumps(meta, indent=1))
