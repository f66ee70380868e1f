"""LoRA factors -> frozen singular bases + searchable singular values (paper §3.2, Alg. 1 lines 1-6, 16).

For every adapted matrix with LoRA update ΔW = s·B·A (A: r×n, B: m×r, s = lora_alpha / r, or
lora_alpha / √r with rsLoRA) we take a thin SVD of each factor separately, in float64:

    A = U_A · diag(σ_A) · V_Aᵀ      U_A: r×r,  σ_A: r,  V_A: n×r
    B = U_B · diag(σ_B) · V_Bᵀ      U_B: m×r,  σ_B: r,  V_B: r×r

U and V are frozen. The top k_A = floor(α·r) values of σ_A and k_B = floor(α·r) of σ_B are searched; the
rest stay at their SFT values.

Packing order of the search vector x (``SvdLora.layout()`` lists it coordinate by coordinate): for each
module in order (layer index, then the module's position in ``targets``, then the module path), first
A's k_A entries then B's k_B entries, each in descending order of the SFT singular value.
solution_length = num_modules·(k_A + k_B). When ``targets`` is not given the module order is the
canonical q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, then other names
alphabetically (never the order of a saved adapter_config's ``target_modules``, which peft stores from a
set). Example, 2 layers × (q, v), r = 2, α = 1:

    x = [L0.q.A σ1, L0.q.A σ2, L0.q.B σ1, L0.q.B σ2, L0.v.A σ1, …, L1.v.B σ2]      (d = 2·2·4 = 16)

How x moves σ (``parametrization``):
    offset:          σ = σ_sft + x                         (docs/design.md; x = 0 is the SFT adapter)
    relative:        σ = σ_sft + x·mean(σ_sft of the factor) (the default: A's values are ~10× B's after
                     SFT, so one step size cannot suit both factors in absolute units)
    multiplicative:  σ = σ_sft·exp(x)                      (keeps σ ≥ 0 and zero values at zero)
All three give the SFT adapter exactly at x = 0. ``SvdLora.pack`` is the inverse of ``SvdLora.sigmas``.

With ``lora.init: random`` (A Kaiming-uniform, B = 0) every σ_B is 0; ``random_init`` gives U_B a random
orthonormal basis drawn from the seed (V_B = I), so the search explores B = U_B·diag(x_B·scale): a random
rank-r subspace of updates rather than a learned one. The relative parametrization falls back to
mean(σ_A) for a zero factor so that steps stay commensurate; multiplicative cannot move a zero σ and
is refused for that start.

Entry points: ``build`` (a state dict), ``from_peft_dir`` (a saved PEFT adapter), ``from_model`` (an
in-memory ``peft.PeftModel``), ``random_init`` (no SFT). Out: ``export_adapter`` (standard PEFT adapter
folder: adapter_config.json + adapter_model.safetensors, loadable by ``peft.PeftModel.from_pretrained``
and vLLM's ``LoRARequest``) and ``merge_and_save`` (base weights + ΔW, ``save_pretrained``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

PARAMETRIZATIONS = ("offset", "relative", "multiplicative")
CANONICAL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"


class AdapterError(ValueError):
    """An adapter that cannot be turned into an SVD-LoRA; the message names the module and the problem."""


@dataclass
class FactorSVD:
    """One LoRA factor as U·diag(S)·Vᵀ, float64, frozen except for the values the search moves."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    scale: float  # step unit of this factor under the relative parametrization

    @classmethod
    def of(cls, M: torch.Tensor) -> FactorSVD:
        """Thin SVD in float64. LoRA factors are thin (r ≪ n), so QR first and an r×r SVD of R: the
        same factorization as LAPACK's direct path, and much cheaper for a tall thin matrix."""
        M = M.detach().to(device="cpu", dtype=torch.float64)
        tall = M.shape[0] >= M.shape[1]
        Q, R = torch.linalg.qr(M if tall else M.mT)
        Ur, S, Vh = torch.linalg.svd(R)
        if tall:  # M = Q·Ur·diag(S)·Vh
            U, V = Q @ Ur, Vh.mT
        else:  # Mᵀ = Q·Ur·diag(S)·Vh  =>  M = Vhᵀ·diag(S)·(Q·Ur)ᵀ
            U, V = Vh.mT, Q @ Ur
        return cls(U=U.contiguous(), S=S.contiguous(), V=V.contiguous(), scale=float(S.mean()))

    def matrix(self, S: torch.Tensor | None = None) -> torch.Tensor:
        S = self.S if S is None else S
        return (self.U * S) @ self.V.mT


@dataclass
class LoraModuleSVD:
    name: str  # module path as peft names it, e.g. "model.layers.0.self_attn.q_proj"
    A: FactorSVD  # r×n
    B: FactorSVD  # m×r
    scaling: float  # lora_alpha / r

    @property
    def rank(self) -> int:
        return int(self.A.S.numel())

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the adapted Linear."""
        return (int(self.B.U.shape[0]), int(self.A.V.shape[0]))


@dataclass
class SvdLora:
    """The search space: frozen bases of every adapted module and the map x -> singular values."""

    modules: list[LoraModuleSVD]
    k_A: int
    k_B: int
    parametrization: str
    peft_config: dict[str, Any] = field(default_factory=dict)

    @property
    def solution_length(self) -> int:
        return len(self.modules) * (self.k_A + self.k_B)

    @property
    def rank(self) -> int:
        return self.modules[0].rank

    def zeros(self) -> np.ndarray:
        """The search vector of the starting adapter (x = 0 under every parametrization)."""
        return np.zeros(self.solution_length, dtype=np.float64)

    def layout(self) -> list[tuple[str, str, int]]:
        """(module path, "A" or "B", singular-value index) for every coordinate of x, in packing order."""
        out = []
        for m in self.modules:
            out += [(m.name, "A", j) for j in range(self.k_A)]
            out += [(m.name, "B", j) for j in range(self.k_B)]
        return out

    def _moved(self, S: torch.Tensor, k: int, x: torch.Tensor, unit: float) -> torch.Tensor:
        out = S.clone()
        if self.parametrization == "offset":
            out[:k] = S[:k] + x
        elif self.parametrization == "relative":
            out[:k] = S[:k] + x * unit
        else:
            out[:k] = S[:k] * torch.exp(x)
        return out

    def _unmoved(self, S: torch.Tensor, k: int, sigma: torch.Tensor, unit: float) -> torch.Tensor:
        if self.parametrization == "offset":
            return sigma[:k] - S[:k]
        if self.parametrization == "relative":
            return (sigma[:k] - S[:k]) / unit
        ratio = torch.where(S[:k] > 0, sigma[:k] / torch.where(S[:k] > 0, S[:k], 1.0), torch.ones_like(S[:k]))
        if bool((ratio <= 0).any()):
            raise ValueError("multiplicative parametrization: σ must keep the sign of σ_sft (σ > 0)")
        return torch.log(ratio)

    def sigmas(self, x: np.ndarray | torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Unpack: per module (σ_A, σ_B) in float64 for one search vector."""
        xt = torch.as_tensor(np.asarray(x, dtype=np.float64))
        if xt.shape != (self.solution_length,):
            raise ValueError(f"search vector has shape {tuple(xt.shape)}, expected ({self.solution_length},)")
        out = []
        step = self.k_A + self.k_B
        for i, m in enumerate(self.modules):
            xa = xt[i * step : i * step + self.k_A]
            xb = xt[i * step + self.k_A : (i + 1) * step]
            out.append((self._moved(m.A.S, self.k_A, xa, m.A.scale), self._moved(m.B.S, self.k_B, xb, m.B.scale)))
        return out

    unpack = sigmas

    def pack(self, per_module: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> np.ndarray:
        """Inverse of ``sigmas``: the search vector that gives these (σ_A, σ_B) on the searched entries."""
        if len(per_module) != len(self.modules):
            raise ValueError(f"expected {len(self.modules)} (σ_A, σ_B) pairs, got {len(per_module)}")
        parts = []
        for m, (sa, sb) in zip(self.modules, per_module):
            sa = torch.as_tensor(sa, dtype=torch.float64)
            sb = torch.as_tensor(sb, dtype=torch.float64)
            parts.append(self._unmoved(m.A.S, self.k_A, sa, m.A.scale))
            parts.append(self._unmoved(m.B.S, self.k_B, sb, m.B.scale))
        return torch.cat(parts).numpy() if parts else self.zeros()

    def sigma_batch(self, X: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per module (σ_A[c, r], σ_B[c, r]) for a population X[c, d]: what the batched forward needs.

        Vectorized over candidates and modules; element for element the same arithmetic as ``sigmas``
        (so the results are bitwise equal)."""
        Xt = torch.as_tensor(np.atleast_2d(np.asarray(X, dtype=np.float64)))
        if Xt.dim() != 2 or Xt.shape[1] != self.solution_length:
            raise ValueError(f"population has shape {tuple(Xt.shape)}, expected (candidates, {self.solution_length})")
        c, n_mod, kA, kB = Xt.shape[0], len(self.modules), self.k_A, self.k_B
        Xm = Xt.reshape(c, n_mod, kA + kB).transpose(0, 1)  # [module, candidate, kA + kB]
        out = []
        for factor, k, xs in (("A", kA, Xm[..., :kA]), ("B", kB, Xm[..., kA:])):
            fs = [getattr(m, factor) for m in self.modules]
            S = torch.stack([f.S for f in fs])[:, None, :]  # [module, 1, r]
            unit = torch.tensor([f.scale for f in fs], dtype=torch.float64)[:, None, None]
            moved = S.expand(n_mod, c, S.shape[-1]).clone()
            head = S[..., :k]
            if self.parametrization == "offset":
                moved[..., :k] = head + xs
            elif self.parametrization == "relative":
                moved[..., :k] = head + xs * unit
            else:
                moved[..., :k] = head * torch.exp(xs)
            out.append(moved)
        return [(out[0][i], out[1][i]) for i in range(n_mod)]

    def factors(self, x: np.ndarray | torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Rebuilt (A′, B′) per module path, float64 (Alg. 1 line 16). Products with an inner dimension r
        only, so one thread (more threads only contend on a shared node)."""
        with _torch_threads(1):
            return {m.name: (m.A.matrix(sa), m.B.matrix(sb)) for m, (sa, sb) in zip(self.modules, self.sigmas(x))}

    def delta_weights(self, x: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """s·B′A′ per module path, float64."""
        return {m.name: m.scaling * (B @ A) for m, (A, B) in zip(self.modules, self.factors(x).values())}


_LAYER = re.compile(r"\.(\d+)\.")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<mod>.+)\.lora_(?P<f>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def canonical_targets(leaves: Sequence[str]) -> list[str]:
    """The module order used when none is given: q, k, v, o, gate, up, down, then the rest sorted."""
    rest = sorted(set(leaves) - set(CANONICAL_TARGETS))
    return list(CANONICAL_TARGETS) + rest


def module_order_key(name: str, targets: list[str]) -> tuple[int, int, str]:
    """(layer, position of the module's last name in targets, path): the documented packing order."""
    m = _LAYER.search("." + name + ".")
    layer = int(m.group(1)) if m else -1
    leaf = name.rsplit(".", 1)[-1]
    pos = targets.index(leaf) if leaf in targets else len(targets)
    return (layer, pos, name)


def lora_pairs(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Group a peft state dict (saved or in-model keys) into module path -> (A, B)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        mt = _KEY.match(key)
        if mt is None:
            continue
        parts.setdefault(mt.group("mod"), {})[mt.group("f")] = value
    pairs = {}
    for mod, d in parts.items():
        if set(d) != {"A", "B"}:
            missing = {"A", "B"} - set(d)
            raise AdapterError(f"adapter module {mod}: lora_{missing.pop()} weight is missing")
        pairs[mod] = (d["A"], d["B"])
    return pairs


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _factorize(
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], targets: list[str], scaling: float | dict[str, float]
) -> list[LoraModuleSVD]:
    modules = []
    for name in sorted(pairs, key=lambda n: module_order_key(n, targets)):
        A, B = pairs[name]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise AdapterError(f"adapter module {name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not form B·A")
        r = A.shape[0]
        if r > min(A.shape[1], B.shape[0]):
            raise AdapterError(f"adapter module {name}: rank {r} exceeds the matrix dimensions {B.shape[0]}×{A.shape[1]}")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise AdapterError(f"adapter module {name}: weights contain NaN or inf")
        s = scaling[name] if isinstance(scaling, dict) else scaling
        modules.append(LoraModuleSVD(name=name, A=FactorSVD.of(A), B=FactorSVD.of(B), scaling=float(s)))
    return modules


def build(
    state_dict: dict[str, torch.Tensor],
    scaling: float | dict[str, float],
    alpha_fraction: float = 1.0,
    parametrization: str = "relative",
    targets: list[str] | None = None,
    peft_config: dict[str, Any] | None = None,
) -> SvdLora:
    """SVD-LoRA from LoRA factors. ``scaling`` is lora_alpha / r (or a per-module mapping)."""
    if parametrization not in PARAMETRIZATIONS:
        raise AdapterError(f"lora.parametrization: expected one of {PARAMETRIZATIONS}, got {parametrization!r}")
    pairs = lora_pairs(state_dict)
    if not pairs:
        raise AdapterError("adapter has no lora_A/lora_B weights")
    targets = list(targets) if targets else canonical_targets([n.rsplit(".", 1)[-1] for n in pairs])
    with _torch_threads(1):  # hundreds of tiny factorizations: threads only add contention
        modules = _factorize(pairs, targets, scaling)
    ranks = {m.rank for m in modules}
    if len(ranks) != 1:
        raise AdapterError(f"adapter mixes ranks {sorted(ranks)} (rank_pattern); ESSA needs one rank for all modules")
    r = ranks.pop()
    k = math.floor(alpha_fraction * r)
    if k < 1:
        raise AdapterError(f"lora.alpha_fraction: floor({alpha_fraction}·{r}) = 0 searched values per factor; raise α")
    for m in modules:
        if m.B.scale == 0.0:
            if parametrization == "multiplicative":
                raise AdapterError(
                    "lora.parametrization=multiplicative cannot move σ_B = 0 (B is zero: a random init); use relative or offset"
                )
            m.B.scale = m.A.scale
        if m.A.scale == 0.0:
            raise AdapterError(f"adapter module {m.name}: lora_A is all zeros; nothing to search")
    return SvdLora(modules=modules, k_A=k, k_B=k, parametrization=parametrization, peft_config=dict(peft_config or {}))


# --------------------------------------------------------------------------------------------------
# Reading adapters: a PEFT folder, an in-memory PeftModel, or a random (no-SFT) start
# --------------------------------------------------------------------------------------------------

# adapter_config.json features ESSA cannot represent as U·diag(σ)·Vᵀ factors: (key, is-unsupported, why)
_UNSUPPORTED: tuple[tuple[str, Any, str], ...] = (
    ("use_dora", lambda v: bool(v), "DoRA adds a magnitude vector that is not a LoRA factor"),
    ("modules_to_save", lambda v: bool(v), "fully trained modules are not LoRA factors and would be lost on export"),
    ("rank_pattern", lambda v: bool(v), "per-module ranks; ESSA needs one rank r for every module"),
    ("alpha_pattern", lambda v: bool(v), "per-module lora_alpha; ESSA needs one scaling for every module"),
    ("lora_bias", lambda v: bool(v), "LoRA bias terms are not searched and would be lost on export"),
    ("bias", lambda v: v not in (None, "none"), "trained bias terms are not searched and would be lost on export"),
    ("fan_in_fan_out", lambda v: bool(v), "transposed (Conv1D) weights are not supported"),
    ("layer_replication", lambda v: bool(v), "replicated layers share base weights"),
    ("target_parameters", lambda v: bool(v), "LoRA on nn.Parameter (MoE experts) is not supported"),
    ("trainable_token_indices", lambda v: bool(v), "trainable token embeddings are not LoRA factors"),
    ("use_qalora", lambda v: bool(v), "QA-LoRA pools inputs; its factors are not plain B·A"),
    ("alora_invocation_tokens", lambda v: bool(v), "activated LoRA changes which tokens are adapted"),
)


def check_peft_config(config: dict[str, Any], where: str = ADAPTER_CONFIG) -> tuple[int, float, float]:
    """Validate a LoRA adapter config; returns (r, lora_alpha, scaling). Raises AdapterError naming the key."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{where}: peft_type {config.get('peft_type')!r} is not supported; ESSA needs a LoRA adapter (peft_type LORA)")
    for key, bad, why in _UNSUPPORTED:
        if key in config and bad(config[key]):
            raise AdapterError(f"{where}: {key}={config[key]!r} is not supported ({why}); retrain the adapter without {key}")
    try:
        r = int(config["r"])
        lora_alpha = float(config.get("lora_alpha", 8))
    except (KeyError, TypeError, ValueError):
        raise AdapterError(
            f"{where}: expected an integer 'r' and a number 'lora_alpha', got r={config.get('r')!r}, "
            f"lora_alpha={config.get('lora_alpha')!r}"
        ) from None
    if r < 1:
        raise AdapterError(f"{where}: r={r}; expected a positive rank")
    if not math.isfinite(lora_alpha) or lora_alpha <= 0:
        raise AdapterError(f"{where}: lora_alpha={lora_alpha}; the update (lora_alpha/r)·B·A is zero or undefined, expected lora_alpha > 0")
    scaling = lora_alpha / math.sqrt(r) if config.get("use_rslora") else lora_alpha / r
    return r, lora_alpha, scaling


def _unwrap(model: Any) -> Any:
    """The transformers model under a peft.PeftModel (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _linear_shape(module: Any) -> tuple[int, int] | None:
    """(out_features, in_features) of a Linear-like module (peft LoRA wrappers and quantized layers too)."""
    module = getattr(module, "base_layer", module)
    out_f, in_f = getattr(module, "out_features", None), getattr(module, "in_features", None)
    if isinstance(out_f, int) and isinstance(in_f, int):
        return (out_f, in_f)
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        return (int(w.shape[0]), int(w.shape[1]))
    return None


def check_against_model(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], model: Any) -> None:
    """Every adapted module exists in the model and B·A has the shape of its Linear weight."""
    base = _unwrap(model)
    for name, (A, B) in pairs.items():
        try:
            module = base.get_submodule(name)
        except AttributeError:
            leaf = name.rsplit(".", 1)[-1]
            similar = [n for n, _ in base.named_modules() if n.endswith("." + leaf)][:3]
            hint = f"; the model has e.g. {similar}" if similar else f"; the model has no module named *.{leaf}"
            raise AdapterError(
                f"adapter module {name}: not found in the base model "
                f"({type(base).__name__}){hint} - was the adapter trained on another model?"
            ) from None
        shape = _linear_shape(module)
        if shape is None:
            raise AdapterError(f"adapter module {name}: the base model's module is a {type(module).__name__}, not a Linear layer")
        want = (int(B.shape[0]), int(A.shape[1]))
        if want != shape:
            raise AdapterError(
                f"adapter module {name}: the adapter's update B·A is {want[0]}×{want[1]} (lora_A {tuple(A.shape)}, "
                f"lora_B {tuple(B.shape)}) but the base model's Linear weight is {shape[0]}×{shape[1]} "
                "- was the adapter trained on another model?"
            )


def _check_keys(state_dict: dict[str, torch.Tensor], where: str) -> None:
    for key in state_dict:
        if _KEY.match(key) is None:
            raise AdapterError(
                f"{where}: weight {key!r} is not a lora_A/lora_B matrix (DoRA magnitude, bias, embedding LoRA "
                "or modules_to_save); ESSA supports plain LoRA on Linear layers only"
            )


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}: cannot read the adapter config ({e.__class__.__name__}: {e})") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    return data


def load_peft_dir(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter config, state dict) of a saved PEFT adapter folder, with clear errors for missing files."""
    p = Path(path)
    if not p.is_dir():
        raise AdapterError(f"lora.adapter={p}: no such folder (expected a PEFT adapter folder with {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    if not (p / ADAPTER_CONFIG).is_file():
        raise AdapterError(f"lora.adapter={p}: {ADAPTER_CONFIG} is missing (expected a PEFT adapter folder)")
    config = _load_json(p / ADAPTER_CONFIG)
    weights = p / ADAPTER_WEIGHTS
    if weights.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state_dict = load_file(str(weights), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterError(f"{weights}: cannot read the adapter weights ({e})") from None
    elif (p / ADAPTER_WEIGHTS_BIN).is_file():
        try:
            state_dict = torch.load(p / ADAPTER_WEIGHTS_BIN, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a corrupt pickle
            raise AdapterError(f"{p / ADAPTER_WEIGHTS_BIN}: cannot read the adapter weights ({e})") from None
    else:
        raise AdapterError(f"lora.adapter={p}: {ADAPTER_WEIGHTS} is missing (expected a PEFT adapter folder)")
    return config, state_dict


def from_peft_dir(
    path: str | Path,
    alpha_fraction: float = 1.0,
    parametrization: str = "relative",
    model: Any = None,
    targets: list[str] | None = None,
) -> SvdLora:
    """SVD-LoRA of a saved PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors).

    ``model`` (the base model, or a PeftModel around it), when given, is checked module by module:
    every adapted module must exist and have the adapter's shape. ``targets`` sets the packing order
    (default: canonical q, k, v, o, …). The config is kept (``peft_config``) for ``export_adapter``.
    """
    config, state_dict = load_peft_dir(path)
    where = str(Path(path) / ADAPTER_CONFIG)
    _r, _alpha, scaling = check_peft_config(config, where)
    _check_keys(state_dict, str(Path(path) / ADAPTER_WEIGHTS))
    return _build_checked(state_dict, config, scaling, alpha_fraction, parametrization, model, targets, where)


def _build_checked(
    state_dict: dict[str, torch.Tensor],
    config: dict[str, Any],
    scaling: float,
    alpha_fraction: float,
    parametrization: str,
    model: Any,
    targets: list[str] | None,
    where: str,
) -> SvdLora:
    pairs = lora_pairs(state_dict)
    if not pairs:
        raise AdapterError(f"{where}: the adapter has no lora_A/lora_B weights")
    r = int(config["r"])
    for name, (A, _B) in pairs.items():
        if A.dim() == 2 and A.shape[0] != r:
            raise AdapterError(f"adapter module {name}: lora_A has rank {A.shape[0]} but {where} says r={r}")
    if model is not None:
        check_against_model(pairs, model)
    return build(state_dict, scaling, alpha_fraction, parametrization, targets, _normalize_config(config))


def from_model(
    peft_model: Any,
    alpha_fraction: float = 1.0,
    parametrization: str = "relative",
    adapter_name: str = "default",
    targets: list[str] | None = None,
) -> SvdLora:
    """SVD-LoRA of an in-memory ``peft.PeftModel`` (e.g. right after SFT), checked against its base."""
    from peft import get_peft_model_state_dict

    configs = getattr(peft_model, "peft_config", None)
    if not isinstance(configs, dict) or adapter_name not in configs:
        raise AdapterError(f"from_model: expected a peft.PeftModel with an adapter named {adapter_name!r}, got {type(peft_model).__name__}")
    config = _normalize_config(configs[adapter_name].to_dict())
    where = f"peft adapter {adapter_name!r}"
    _r, _alpha, scaling = check_peft_config(config, where)
    state_dict = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(peft_model, adapter_name=adapter_name).items()}
    _check_keys(state_dict, where)
    return _build_checked(state_dict, config, scaling, alpha_fraction, parametrization, peft_model, targets, where)


def target_linears(model: Any, targets: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Module path -> (out, in) of every Linear-like module whose last name is in targets (peft's matching)."""
    base = _unwrap(model)
    found: dict[str, tuple[int, int]] = {}
    for name, module in base.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            shape = _linear_shape(module)
            if shape is not None:
                found[name] = shape
    if not found:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, mod in base.named_modules() if _linear_shape(mod) is not None})
        raise AdapterError(f"lora.targets={list(targets)} match no Linear module of the model; its Linear modules are named {leaves}")
    return found


def lora_config_dict(
    rank: int, lora_alpha: float, targets: Sequence[str], use_rslora: bool = False, base_model_name_or_path: str | None = None
) -> dict[str, Any]:
    """A standard peft LoraConfig as JSON-ready data (what adapter_config.json holds)."""
    from peft import LoraConfig

    alpha: Any = int(lora_alpha) if float(lora_alpha).is_integer() else lora_alpha  # peft annotates int, accepts float
    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        use_rslora=use_rslora,
        base_model_name_or_path=base_model_name_or_path,
    )
    return _normalize_config(cfg.to_dict())


def random_init(
    model: Any,
    rank: int,
    lora_alpha: float,
    targets: Sequence[str],
    seed: int,
    alpha_fraction: float = 1.0,
    parametrization: str = "relative",
    use_rslora: bool = False,
) -> SvdLora:
    """lora.init=random: A Kaiming-uniform (a=√5, as peft: U(−1/√n, 1/√n)), B = 0, deterministic from seed.

    σ_B = 0, so U_B is a random orthonormal m×r basis from the same seed and V_B = I (see module doc).
    """
    if parametrization == "multiplicative":
        raise AdapterError("lora.parametrization=multiplicative cannot move σ_B = 0 (lora.init=random has B = 0); use relative or offset")
    if rank < 1:
        raise AdapterError(f"lora.rank: expected a positive rank, got {rank}")
    if not math.isfinite(lora_alpha) or lora_alpha <= 0:
        raise AdapterError(f"lora.lora_alpha={lora_alpha}: expected > 0 (the update is (lora_alpha/r)·B·A)")
    shapes = target_linears(model, targets)
    order = sorted(shapes, key=lambda n: module_order_key(n, list(targets)))
    g = torch.Generator().manual_seed(int(seed) % 2**63)
    state: dict[str, torch.Tensor] = {}
    bases: dict[str, torch.Tensor] = {}
    for name in order:
        m, n = shapes[name]
        if rank > min(m, n):
            raise AdapterError(f"lora.rank={rank} exceeds the dimensions {m}×{n} of module {name}")
        bound = 1.0 / math.sqrt(n)
        state[f"{name}.lora_A.weight"] = (torch.rand(rank, n, generator=g, dtype=torch.float64) * 2 - 1) * bound
        state[f"{name}.lora_B.weight"] = torch.zeros(m, rank, dtype=torch.float64)
        q, rr = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64))
        bases[name] = q * torch.sign(torch.diagonal(rr))  # unique orthonormal basis
    scaling = lora_alpha / math.sqrt(rank) if use_rslora else lora_alpha / rank
    config = lora_config_dict(rank, lora_alpha, targets, use_rslora, getattr(getattr(model, "config", None), "_name_or_path", None))
    svd = build(state, scaling, alpha_fraction, parametrization, list(targets), config)
    for mod in svd.modules:
        mod.B.U = bases[mod.name]
        mod.B.V = torch.eye(rank, dtype=torch.float64)
    return svd


# --------------------------------------------------------------------------------------------------
# Writing adapters
# --------------------------------------------------------------------------------------------------


def _normalize_config(config: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready copy: sets become sorted lists, enums their values."""

    def norm(v: Any) -> Any:
        if isinstance(v, (set, frozenset)):
            return sorted(norm(x) for x in v)
        if isinstance(v, dict):
            return {str(k): norm(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        if hasattr(v, "value") and isinstance(getattr(v, "value", None), (str, int)):
            return v.value
        if v is None or isinstance(v, (str, int, float, bool)):
            return v
        return str(v)

    return {str(k): norm(v) for k, v in config.items()}


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder next to out_dir; on success it replaces out_dir (rename), on error it vanishes.

    An existing out_dir is moved aside first and removed after the new one is in place, so readers see
    the old folder or the new one, never a half-written one. With ``replace=False`` an out_dir that
    appeared meanwhile (another process won the race to fill a cache) is kept and ours is dropped.
    """
    target = Path(out_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        old = None
        if target.exists() and not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _export_config(svd: SvdLora, base_model_name_or_path: str | None) -> dict[str, Any]:
    r = svd.rank
    config = dict(svd.peft_config)
    scaling = svd.modules[0].scaling
    if not config:
        leaves = sorted({m.name.rsplit(".", 1)[-1] for m in svd.modules})
        config = lora_config_dict(r, scaling * r, leaves)
    else:
        rs = bool(config.get("use_rslora"))
        implied = float(config.get("lora_alpha", 8)) / (math.sqrt(r) if rs else r)
        if not math.isclose(implied, scaling, rel_tol=1e-9):  # keep the update exact whatever the source said
            a = scaling * (math.sqrt(r) if rs else r)
            config["lora_alpha"] = int(a) if float(a).is_integer() else a
    config["r"] = r
    config["peft_type"] = "LORA"
    config["inference_mode"] = True
    config.setdefault("task_type", "CAUSAL_LM")
    config.setdefault("bias", "none")
    config["use_dora"] = False
    config["modules_to_save"] = None
    config["rank_pattern"] = {}
    config["alpha_pattern"] = {}
    if base_model_name_or_path is not None:
        config["base_model_name_or_path"] = str(base_model_name_or_path)
    return _normalize_config(config)


def adapter_state_dict(svd: SvdLora, x: np.ndarray | torch.Tensor, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The rebuilt factors under peft's saved key names: base_model.model.<module>.lora_A.weight / lora_B.weight."""
    out = {}
    for name, (A, B) in svd.factors(x).items():
        out[f"base_model.model.{name}.lora_A.weight"] = A.to(dtype).contiguous()
        out[f"base_model.model.{name}.lora_B.weight"] = B.to(dtype).contiguous()
    return out


def export_adapter(
    svd: SvdLora,
    x: np.ndarray | torch.Tensor,
    out_dir: str | Path,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Rebuild A′, B′ from x and write a standard PEFT adapter folder atomically; returns its path.

    The folder (adapter_config.json + adapter_model.safetensors) loads with
    ``peft.PeftModel.from_pretrained(base, out_dir)`` and serves through vLLM's ``LoRARequest``.
    """
    from safetensors.torch import save_file

    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("export_adapter: the search vector contains NaN or inf")
    tensors = adapter_state_dict(svd, x, dtype)
    config = _export_config(svd, base_model_name_or_path)
    meta = {"format": "pt", "essa_parametrization": svd.parametrization, **(metadata or {})}
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata=meta)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def merge_and_save(
    base_model: Any,
    svd: SvdLora,
    x: np.ndarray | torch.Tensor,
    out_dir: str | Path,
    tokenizer: Any = None,
) -> Path:
    """Save base weights + s·B′A′ (in the weights' dtype) with ``save_pretrained``, atomically.

    The model passed in is left unchanged (the merged weights go to a separate state dict).
    """
    if hasattr(base_model, "get_base_model"):
        raise AdapterError("merge_and_save: pass the plain base model, not a peft.PeftModel")
    deltas = svd.delta_weights(x)
    pairs = {name: (torch.empty(svd.rank, m.shape[1]), torch.empty(m.shape[0], svd.rank)) for name, m in zip(deltas, svd.modules)}
    check_against_model(pairs, base_model)
    state = dict(base_model.state_dict())
    for name, delta in deltas.items():
        key = f"{name}.weight"
        w = state.get(key)
        if w is None or not torch.is_floating_point(w):
            raise AdapterError(f"merge_and_save: {key} is missing or not a floating-point weight (quantized models cannot be merged)")
        state[key] = (w.detach().to(torch.float64) + delta.to(w.device)).to(w.dtype)
    with atomic_dir(out_dir) as tmp:
        base_model.save_pretrained(tmp, state_dict=state)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)
