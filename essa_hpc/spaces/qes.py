"""``search.space: qes``: evolution strategies on a quantized model's integer weight codes (docs/design.md, QES).

Quantized Evolution Strategies (arXiv 2602.03120) fine-tune an INT8/INT4 model without ever holding
full-precision weights. This space implements the seam's seeded-space contract (essa_hpc/spaces/base.py):
a candidate row is a seed code (g, k, c) of the es optimizer, an update is a list of rows (g, k, w_k),
and everything a rank does to its codes is a function of (run seed, g, k, tensor index) and the gathered
rewards, so every rank that applies the same updates holds the same codes bit for bit; nothing but
(seed, reward) records crosses the network.

Layouts (how torchao stores the codes; ``find_codes``)
------------------------------------------------------
* ``Int8Tensor`` (``Int8WeightOnlyConfig``, CPU and CUDA): ``qdata`` int8 [out, in], range [-128, 127],
  per-channel ``scale``.
* ``IntxUnpackedToInt8Tensor`` (``IntxWeightOnlyConfig``, the CPU int4 path and CUDA float32/float16):
  ``qdata`` int8 holding one code per byte in the target dtype's range ([-8, 7] for int4), per-group
  ``scale``/``zero_point``.

Both keep the codes unpacked in an int8 tensor that the layer reads on every forward, so a perturbation
is an in-place integer add. Anything else (CUDA bfloat16 int4 ``Int4Tensor`` with two nibbles per byte,
NF4, float8, a float weight) is refused with :class:`QESError` naming ``model.quantization``.

Noise (counter-based)
---------------------
For tensor i (module order), noise index k of generation g: z = N(0, I) of the tensor's shape from the
project's counter-based generator (essa_hpc/noise.py: Philox keyed by (run seed, stream = i), counter
(g, k)), followed in the same stream by ξ = U[0, 1) for the rounding. No state carries from one draw to
the next, two tensors of the same shape get different noise, and the numbers are numpy's on every
machine and device (drawn on the CPU, moved to the layer's device).

The candidate (g, k, c) evaluates the integer codes (stochastic rounding, Eqs. Q1-Q2)

    (Q1)  u = sign(c) · (floor(|c| z) + [ξ < |c| z - floor(|c| z)])      E[u | z] = c z, |c| = σ in code units
    (Q2)  q_cand = q + u   where lo <= q + u <= hi,   q elsewhere (masking at the range)

so the antithetic pair ±σ moves the codes by exactly ±u. Restoring subtracts exactly what was added (the
masked entries are remembered as a sparse index list per tensor).

The update with error feedback (Eqs. Q3-Q5)
-------------------------------------------
The es optimizer's update rows (g, k, w_k), w_k = α/(λσ) (f̂_{2k} − f̂_{2k+1}) (search/es.py, ES-3), give
the float step in code units, accumulated with the residual r and rounded:

    (Q3)  a = Σ_k w_k z_k          float32, rows in order (the unit noise z, not the rounded u)
    (Q4)  v = γ r + a,   Δ = round(v) (half to even)
    (Q5)  q ← clamp(q + Δ, lo, hi),   r ← v − Δ   (so |r| <= 1/2)

The residual subtracts the intended step Δ, not the clamped one: it never depends on the codes, which is
what makes seed replay exact; a code at the edge of its range simply loses the push that would take it
out (no wind-up). Using z rather than the masked u in Q3 is E[u | z] = σz up to the factor σ, which the
optimizer's w_k already divides out.

Error feedback is reset every K updates (``search.qes_window``): r = 0 before updates t ≡ 0 (mod K).
Between resets the residual accumulates updates too small to flip a code until they do. Two ways to
hold it:

* ``replay`` (the memory-lean default): keep only the update rows since the last reset (at most K − 1
  updates of λ/2 rows) and rebuild r tensor by tensor right before the update by regenerating their noise
  and running Q3-Q5 again. Memory stays near quantized inference; the price is up to (K − 1)·λ/2 extra
  noise draws per tensor per update.
* ``stored``: keep r as float32 tensors (4 bytes per code). The same function computes both, so the
  replayed residual equals the stored one bit for bit (tests/test_qes.py checks it).

Unlike the paper's replay (which rebuilds its masks from the current codes and drops what happened
before the window, an approximation), both options compute the same numbers; the reset every K updates
is the price of that exactness.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from essa_hpc import noise
from essa_hpc.spaces.base import SEED_CODE_WIDTH, SpaceError

STATE_FORMAT = "essa_hpc.spaces.qes/1"
RESIDUALS = ("replay", "stored")
SUPPORTED_LAYOUTS = ("Int8Tensor", "IntxUnpackedToInt8Tensor")


class QESError(SpaceError):
    """A model or setting QES cannot work with; the message names the config key and what was expected."""


@dataclass
class Codes:
    """The integer codes of one quantized linear weight, updated in place, and their range."""

    name: str  # the linear layer's module path
    data: torch.Tensor  # the layout's int8 code tensor (the layer reads it on every forward)
    lo: int
    hi: int
    layout: str

    @property
    def numel(self) -> int:
        return int(self.data.numel())


def _int_range(dtype: Any) -> tuple[int, int]:
    """[lo, hi] of a signed torch integer dtype (torch.int8, torch.int4, ...): torchao's quant_min/quant_max."""
    bits = int(str(dtype).removeprefix("torch.int"))
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def find_codes(model: nn.Module) -> list[Codes]:
    """Every quantized linear weight of ``model`` in module order, as :class:`Codes`.

    Raises QESError when the model holds no quantized weight (QES needs ``model.quantization`` int8 or
    int4) or a weight in a layout QES cannot perturb in place (named, with what would work).
    """
    out: list[Codes] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        w = mod.weight
        layout = type(w).__name__
        if type(w) in (torch.Tensor, nn.Parameter):
            continue  # an unquantized layer (the LM head stays float): not part of the search space
        qdata = getattr(w, "qdata", None)
        if layout == "Int8Tensor" and isinstance(qdata, torch.Tensor) and qdata.dtype == torch.int8:
            if getattr(w, "act_quant_kwargs", None) is not None:
                raise QESError(f"model.quantization: layer {name} quantizes activations too ({layout}); QES needs weight-only int8")
            lo, hi = _int_range(torch.int8)
        elif layout == "IntxUnpackedToInt8Tensor" and isinstance(qdata, torch.Tensor) and qdata.dtype == torch.int8:
            lo, hi = _int_range(getattr(w, "target_dtype", None))
        else:
            raise QESError(
                f"model.quantization: layer {name} stores its weight as {layout}, a layout QES cannot perturb in place; "
                f"supported: {', '.join(SUPPORTED_LAYOUTS)} (int8, or int4 with model.dtype float32/float16; "
                "CUDA bfloat16 int4 packs two codes per byte)"
            )
        if not qdata.is_contiguous():
            raise QESError(f"model.quantization: layer {name}: the {layout} codes are not contiguous")
        out.append(Codes(name, qdata, lo, hi, layout))
    if not out:
        raise QESError(
            "search.space=qes needs a quantized base model: set model.quantization to int8 or int4 "
            "(the model has no quantized linear layer)"
        )
    return out


def unit_noise(seed: int, gen: int, k: int, index: int, shape: Sequence[int]) -> torch.Tensor:
    """z of (g, k, tensor index): float32 standard normals of ``shape`` on the CPU (Eqs. Q1, Q3)."""
    return torch.from_numpy(noise.normal(seed, gen, k, index, int(math.prod(shape)))).view(*shape)


def code_noise(seed: int, gen: int, k: int, index: int, shape: Sequence[int], coef: float, span: int) -> torch.Tensor:
    """u of Eq. Q1 for the candidate coefficient ``coef``: int16 of ``shape`` on the CPU, within ±span.

    z and then ξ come from one Philox stream, so z is exactly ``unit_noise``'s (what the update uses)."""
    n = int(math.prod(shape))
    rng = noise.generator(seed, gen, k, index)
    x = rng.standard_normal(n, dtype=np.float32) * np.float32(abs(coef))
    f = np.floor(x)
    xi = rng.random(n, dtype=np.float32)
    u = np.clip(f + (xi < (x - f)), -span, span).astype(np.int16)
    if coef < 0:
        np.negative(u, out=u)
    return torch.from_numpy(u).view(*shape)


@dataclass
class Update:
    """What one update did to the codes (summed over tensors)."""

    attempted: int = 0  # entries with Δ ≠ 0
    flipped: int = 0  # codes that changed
    blocked: int = 0  # entries whose step was cut at the range (applied ≠ Δ)
    codes: int = 0  # codes in the space

    def add(self, other: Update) -> None:
        self.attempted += other.attempted
        self.flipped += other.flipped
        self.blocked += other.blocked
        self.codes += other.codes


@dataclass
class Perturbation:
    """A candidate applied to the codes: its row, and the entries masking left alone (sparse)."""

    row: tuple[int, int, float]
    masked: list[np.ndarray] = field(default_factory=list)  # per tensor: flat indices not perturbed


def check_row_block(rows: Any) -> np.ndarray:
    A = np.atleast_2d(np.asarray(rows, dtype=np.float64))
    if A.ndim != 2 or A.shape[1] != SEED_CODE_WIDTH or not np.isfinite(A).all():
        raise ValueError(
            f"QES rows have shape {np.shape(rows)}; expected finite seed codes [n, {SEED_CODE_WIDTH}] (generation, index, coef)"
        )
    return A


class QESSpace:
    """The integer codes of a quantized model as a seeded search space (spaces/base.py:Space).

    ``perturbed(row)`` applies a candidate for the block (the hf backend's SequentialPerturbation view);
    ``apply(opt)`` adds the optimizer's last update (``opt.step()`` rows) with error feedback;
    ``residual()`` is the residual the next update starts from; ``digest``/``state_dict``/``export`` serve
    the cross-rank check, checkpoints and the final model.
    """

    name = "qes"
    seeded = True
    export_name = "model"
    solution_length = SEED_CODE_WIDTH

    def __init__(
        self,
        codes: list[Codes],
        seed: int,
        *,
        window: int = 16,
        decay: float = 1.0,
        residual: str = "replay",
        model: Any = None,
        tokenizer: Any = None,
        scheme: str = "",
        source: str | None = None,
    ) -> None:
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
            raise QESError(f"search.qes_window: expected an integer K >= 1 (updates between residual resets), got {window!r}")
        if residual not in RESIDUALS:
            raise QESError(f"search.qes_residual: expected one of {RESIDUALS}, got {residual!r}")
        if not (isinstance(decay, (int, float)) and 0.0 <= decay <= 1.0):
            raise QESError(f"search.qes_decay: expected 0 <= decay <= 1, got {decay!r}")
        self.codes = codes
        self.seed = int(seed)
        self.window = int(window)
        self.decay = float(decay)
        self.mode = residual
        self.updates = 0  # updates applied so far (residual resets when it is a multiple of K)
        self.history: list[np.ndarray] = []  # update rows since the last reset (kept in both modes: they are tiny)
        self.stored: list[torch.Tensor] | None = None
        if residual == "stored":
            self.stored = [torch.zeros(c.data.shape, dtype=torch.float32) for c in codes]
        self.last: Update | None = None  # what the last update did (flip counts)
        self._pending: Perturbation | None = None
        self._model, self._tokenizer, self._scheme, self._source = model, tokenizer, scheme, source

    @property
    def dim(self) -> int:
        return SEED_CODE_WIDTH

    def backend_view(self) -> QESSpace:
        return self

    # -- evaluation ------------------------------------------------------------------------------------

    def perturb(self, row: Any) -> Perturbation:
        """Apply the candidate row (g, k, c) in place: q + u, masked at the range (Eqs. Q1-Q2)."""
        if self._pending is not None:
            raise ValueError(f"perturb: candidate {self._pending.row} is still applied; restore it first")
        (gen, k, coef) = check_row_block(row)[0]
        p = Perturbation((int(gen), int(k), float(coef)))
        for i, c in enumerate(self.codes):
            q = c.data.to(device="cpu", dtype=torch.int16)
            moved = q + code_noise(self.seed, p.row[0], p.row[1], i, tuple(c.data.shape), p.row[2], c.hi - c.lo)
            outside = (moved < c.lo) | (moved > c.hi)
            p.masked.append(np.flatnonzero(outside.view(-1).numpy()))
            moved[outside] = q[outside]
            c.data.copy_(moved.to(device=c.data.device, dtype=torch.int8))
        self._pending = p
        return p

    def restore(self, p: Perturbation) -> None:
        """Undo :meth:`perturb` exactly: subtract the same integer noise wherever it was added."""
        if self._pending is not p:
            raise ValueError("restore: not the perturbation currently applied")
        gen, k, coef = p.row
        for i, c in enumerate(self.codes):
            u = code_noise(self.seed, gen, k, i, tuple(c.data.shape), coef, c.hi - c.lo)
            u.view(-1)[torch.from_numpy(p.masked[i])] = 0
            q = c.data.to(device="cpu", dtype=torch.int16) - u
            c.data.copy_(q.to(device=c.data.device, dtype=torch.int8))
        self._pending = None

    @contextmanager
    def perturbed(self, row: np.ndarray) -> Iterator[None]:
        """The SequentialPerturbation view: candidate ``row`` inside the block (the zero row: the codes as they are)."""
        if not np.any(np.asarray(row, dtype=np.float64)):
            yield
            return
        p = self.perturb(row)
        try:
            yield
        finally:
            self.restore(p)

    # -- the update ------------------------------------------------------------------------------------

    def _increment(self, i: int, rows: np.ndarray) -> torch.Tensor:
        """a of Eq. Q3 for tensor i: Σ_k w_k z_k in float32, rows in order."""
        c = self.codes[i]
        a = torch.zeros(c.data.shape, dtype=torch.float32)
        for gen, k, w in rows.tolist():
            if w != 0.0:
                a.add_(unit_noise(self.seed, int(gen), int(k), i, tuple(c.data.shape)), alpha=w)
        return a

    def _advance(self, r: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eqs. Q4-Q5 on the residual alone: (Δ, r') from r and a; the one function both modes use."""
        v = a.add_(r, alpha=self.decay) if self.decay != 1.0 else a.add_(r)
        delta = torch.round(v)
        return delta, v.sub_(delta)

    def _replayed(self, i: int) -> torch.Tensor:
        """The residual of tensor i rebuilt from the update rows since the last reset (zero right after one)."""
        r = torch.zeros(self.codes[i].data.shape, dtype=torch.float32)
        for rows in self.history:
            _, r = self._advance(r, self._increment(i, rows))
        return r

    def _zeros(self) -> list[torch.Tensor]:
        return [torch.zeros(c.data.shape, dtype=torch.float32) for c in self.codes]

    def residual(self) -> list[torch.Tensor]:
        """The residual the next update starts from, per tensor (float32 CPU): replayed or stored."""
        if self.updates % self.window == 0:
            return self._zeros()
        if self.stored is not None:
            return [r.clone() for r in self.stored]
        return [self._replayed(i) for i in range(len(self.codes))]

    def replayed_residual(self) -> list[torch.Tensor]:
        """The residual rebuilt by seed replay whatever the mode (to compare with the stored one)."""
        if self.updates % self.window == 0:
            return self._zeros()
        return [self._replayed(i) for i in range(len(self.codes))]

    def update(self, rows: Any) -> Update:
        """Add the update rows (g, k, w_k) to every tensor with error feedback (Eqs. Q3-Q5); flip counts.

        The rows come from the optimizer's ``step()`` after the one Allgather, identical on every rank, so
        every rank applies the same integer update.
        """
        if self._pending is not None:
            raise ValueError(f"update while candidate {self._pending.row} is still applied; restore it first")
        R = check_row_block(rows) if np.size(rows) else np.zeros((0, SEED_CODE_WIDTH))
        reset = self.updates % self.window == 0
        if reset:
            self.history = []
        stats = Update()
        for i, c in enumerate(self.codes):
            if reset:
                r = torch.zeros(c.data.shape, dtype=torch.float32)
            elif self.stored is not None:
                r = self.stored[i]
            else:
                r = self._replayed(i)
            delta, r_new = self._advance(r, self._increment(i, R))
            if self.stored is not None:
                self.stored[i] = r_new
            span = c.hi - c.lo
            d16 = delta.clamp_(-span, span).to(torch.int16)  # a step wider than the range is cut anyway (no int16 overflow)
            q = c.data.to(device="cpu", dtype=torch.int16)
            new = torch.clamp(q + d16, c.lo, c.hi)
            applied = new - q
            stats.add(
                Update(
                    attempted=int((d16 != 0).sum()),
                    flipped=int((applied != 0).sum()),
                    blocked=int((applied != d16).sum()),
                    codes=c.numel,
                )
            )
            c.data.copy_(new.to(device=c.data.device, dtype=torch.int8))
        self.history.append(R.copy())
        self.updates += 1
        if self.updates % self.window == 0:
            self.history = []
            if self.stored is not None:
                for r in self.stored:
                    r.zero_()
        self.last = stats
        return stats

    def apply(self, opt: Any) -> None:
        """After ``opt.tell``: the optimizer's update rows, applied to the codes (the Space protocol)."""
        self.update(opt.step())

    # -- checkpoints and cross-rank checks -------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "window": self.window,
            "decay": self.decay,
            "residual": self.mode,
            "tensors": [[c.name, list(c.data.shape), c.lo, c.hi] for c in self.codes],
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain data: settings, the update count, the codes (int8 numpy: one byte per code), the update rows
        since the last reset and, when stored, the residuals. Loading it into a space over the same quantized
        model resumes exactly."""
        return {
            "format": STATE_FORMAT,
            **self._settings(),
            "updates": self.updates,
            "codes": [c.data.detach().cpu().numpy().copy() for c in self.codes],
            "history": [rows.copy() for rows in self.history],
            "stored": None if self.stored is None else [r.numpy().copy() for r in self.stored],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"search space qes: expected a checkpoint state of format {STATE_FORMAT!r}, got {got!r}")
        for key, value in self._settings().items():
            if state.get(key) != value:
                raise ValueError(f"search space qes: {key} differs between the checkpoint and this run")
        for c, arr in zip(self.codes, state["codes"], strict=True):
            c.data.copy_(torch.from_numpy(np.asarray(arr, dtype=np.int8)).to(c.data.device))
        self.updates = int(state["updates"])
        self.history = [np.asarray(rows, dtype=np.float64).copy() for rows in state["history"]]
        if self.stored is not None:
            self.stored = [torch.from_numpy(np.asarray(r, dtype=np.float32).copy()) for r in state["stored"]]
        self._pending = None

    def digest(self) -> str:
        """sha256 hex over the settings, the update count, every code, the replay rows and stored residuals."""
        h = hashlib.sha256(json.dumps(self._settings(), sort_keys=True).encode())
        h.update(np.int64(self.updates).tobytes())
        for c in self.codes:
            h.update(c.data.detach().cpu().numpy().tobytes())
        for rows in self.history:
            h.update(np.ascontiguousarray(rows, dtype="<f8").tobytes())
        for r in self.stored or []:
            h.update(r.numpy().astype("<f4").tobytes())
        return h.hexdigest()

    def weight_digest(self) -> str:
        """sha256 hex of the codes alone: equal for two models that compute the same function."""
        h = hashlib.sha256()
        for c in self.codes:
            h.update(c.data.detach().cpu().numpy().tobytes())
        return h.hexdigest()

    # -- export ----------------------------------------------------------------------------------------

    def export(self, x: np.ndarray, out: Path) -> None:
        """Write the current codes (the zero row) as a pre-quantized transformers folder ``out``."""
        if np.any(np.asarray(x, dtype=np.float64)):
            raise ValueError("search space qes keeps only the current codes; export takes the zero row (the optimizer's mean)")
        if self._model is None:
            raise ValueError("search space qes: built without the model, nothing to export")
        export_quantized(self._model, self._tokenizer, self._scheme, Path(out), source=self._source)


def torchao_config(scheme: str) -> Any:
    """The torchao config quantize.py applies for ``scheme`` on the CPU (int8; int4 as IntxWeightOnly groups of 32)."""
    import torchao.quantization as tq

    if scheme == "int8":
        return tq.Int8WeightOnlyConfig()
    from torchao.quantization.granularity import PerGroup

    return tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))  # type: ignore[attr-defined]


def export_quantized(model: Any, tokenizer: Any, scheme: str, out: Path, source: str | None = None) -> Path:
    """``model`` with its current codes as a pre-quantized transformers folder, written atomically.

    transformers' torchao integration saves the tensor subclasses flattened into safetensors with their
    metadata and ``from_pretrained`` rebuilds them, so ``models.load`` loads the folder like any model
    folder, already quantized (leave ``model.quantization`` at none to evaluate it; QES can start from it).
    """
    from transformers import TorchAoConfig
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    qcfg = TorchAoConfig(quant_type=torchao_config(scheme), modules_to_not_convert=["lm_head"])
    had_cfg = hasattr(model.config, "quantization_config")
    saved_cfg, saved_q = getattr(model.config, "quantization_config", None), getattr(model, "hf_quantizer", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.config.quantization_config = qcfg
        model.hf_quantizer = TorchAoHfQuantizer(qcfg)
        model.save_pretrained(tmp)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        (tmp / "qes.json").write_text(json.dumps({"scheme": scheme, "source": source}, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.hf_quantizer = saved_q
        if had_cfg:
            model.config.quantization_config = saved_cfg
        elif hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return out


def _prequantized(model: Any) -> bool:
    return any(isinstance(m, nn.Linear) and type(m.weight) not in (torch.Tensor, nn.Parameter) for m in model.modules())


def create(cfg: Any, loaded: Any) -> QESSpace:
    """``search.space: qes`` over the loaded model, quantized as ``model.quantization`` says (spaces.make_space)."""
    from essa_hpc.quantize import mark_quantized, quantize_model

    if _prequantized(loaded.model):  # a folder exported by QES is loaded already quantized
        mark_quantized(loaded.model, cfg.model.quantization)
    else:
        quantize_model(loaded.model, cfg.model.quantization)
    s = cfg.search
    return QESSpace(
        find_codes(loaded.model),
        cfg.run.seed,
        window=s.qes_window,
        decay=s.qes_decay,
        residual=s.qes_residual,
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        scheme=cfg.model.quantization,
        source=cfg.model.path,
    )
