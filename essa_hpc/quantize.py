"""Weight quantization of a loaded base model for the hf backend (``model.quantization``: int8, int4).

torchao (maintained by the PyTorch team; one code path for CPU and CUDA) quantizes the weights of the
transformer's linear layers; activations stay in the model's float dtype:

* int8: ``Int8WeightOnlyConfig`` (per-channel symmetric int8 weights), CPU and CUDA.
* int4: on CUDA with a bfloat16 model ``Int4WeightOnlyConfig`` (group size 128, the tinygemm kernel);
  otherwise ``IntxWeightOnlyConfig`` with int4 weights in groups of 32 (a memory saving, not a speed-up).
  Only the CPU int4 path was run here (no GPU on the development machines).

On a CPU int8 weight-only saves memory (linear weights 4× smaller) rather than time, and costs some
accuracy; ``bench/bench_eval.py --quantization-only`` measures both against float32 and bfloat16
(bench/results/eval.json). Dynamic int8 activations (``Int8DynamicActivationInt8WeightConfig``) are
not offered: they lost more accuracy without being faster. bitsandbytes is CUDA-only.

The LM head (tied to the embeddings in small models) and the embeddings stay unquantized; the SVD-LoRA
wrappers of the hf backend sit on top of the quantized layers and compute in the model's float dtype.
Quantizing is idempotent (a marker on the model records the scheme).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

SCHEMES = ("none", "int8", "int4")
SKIP = ("lm_head",)
_MARK = "_essa_quantization"


class QuantizationError(ValueError):
    """A quantization the hf backend cannot apply; the message names model.quantization."""


def _import_torchao() -> Any:
    # torchao probes optional CUDA kernels at import and logs a warning per missing one on CPU-only builds
    logging.getLogger("torchao").setLevel(logging.ERROR)
    try:
        import torchao.quantization as tq
    except ImportError as e:
        raise QuantizationError(f"model.quantization int8/int4 needs torchao (pip install torchao): {e}") from None
    return tq


def quantize_model(model: nn.Module, scheme: str, skip: tuple[str, ...] = SKIP) -> nn.Module:
    """Quantize the linear layers of ``model`` in place (except names containing ``skip``); returns it."""
    if scheme in ("none", "", None):
        return model
    if scheme not in SCHEMES:
        raise QuantizationError(
            f"model.quantization={scheme}: the hf backend supports {SCHEMES}; {scheme} is a checkpoint format for backend.name=vllm"
        )
    done = getattr(model, _MARK, None)
    if done == scheme:
        return model
    if done is not None:
        raise QuantizationError(f"model.quantization={scheme}: the model is already quantized as {done}")
    tq = _import_torchao()
    device = next(model.parameters()).device

    def linear(mod: nn.Module, fqn: str) -> bool:
        return isinstance(mod, nn.Linear) and not any(s in fqn for s in skip)

    if scheme == "int8":
        config: Any = tq.Int8WeightOnlyConfig()
    elif device.type == "cuda" and any(p.dtype == torch.bfloat16 for p in model.parameters()):
        config = tq.Int4WeightOnlyConfig(group_size=128)
    else:
        from torchao.quantization.granularity import PerGroup

        int4 = torch.int4  # type: ignore[attr-defined]
        config = tq.IntxWeightOnlyConfig(weight_dtype=int4, granularity=PerGroup(32))
    tq.quantize_(model, config, filter_fn=linear)
    setattr(model, _MARK, scheme)
    return model


def mark_quantized(model: nn.Module, scheme: str) -> None:
    """Record that ``model`` was loaded already quantized as ``scheme`` (a pre-quantized folder), so that
    ``quantize_model`` leaves it as it is."""
    setattr(model, _MARK, scheme)


def quantization_of(model: nn.Module) -> str:
    """The scheme quantize_model applied to ``model`` ("none" if it did not)."""
    return str(getattr(model, _MARK, "none"))
