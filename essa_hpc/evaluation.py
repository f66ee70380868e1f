"""How vectors become rewards on a rank, and how validation is sharded: the one path that both the run
(``essa_hpc.run``) and ``essa-evaluate`` (``essa_hpc.evaluate``) take.

An ``Evaluator`` is a backend (how a vector and a prompt become a completion) plus a task (examples
and rewards) plus how prompts are rendered. ``score`` turns (candidate row, example, seed) items into
rewards on this rank; ``validate`` scores one vector on the validation prompts, sharded over ranks,
with the seeds of ``dist.validation_seed``: the same in every validation of a run and in
``essa-evaluate``, so a final adapter's standalone metrics match its last validation
(docs/design.md, "One generation").

Two builders share the model loading and the rendering: ``build_evaluator`` for the run (the search
space around the warm start: SFT, a given adapter or a random init) and ``adapter_evaluator`` for
``essa-evaluate`` (a given adapter exactly as saved, or the base model alone).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from essa_hpc import dist, metrics
from essa_hpc.backends.base import Backend, Request
from essa_hpc.config import Config
from essa_hpc.spaces import Space, make_space
from essa_hpc.tasks.base import Example, Task, TaskError


@dataclass
class Evaluator:
    """How a generation's requests become rewards on this rank: a backend plus a task."""

    backend: Backend
    task: Task
    render: Callable[[Example], str]
    export: Callable[[np.ndarray, Path], None] | None  # writes a PEFT adapter for a vector (None: fake)
    metric_names: list[str]  # validation metrics; the first is the primary one ("best", progress line, target)
    summarize: Callable[[list[list[float]]], dict[str, float]]  # per-prompt rewards -> validation metrics
    train: Sequence[Example] = field(default_factory=list)
    validation: Sequence[Example] = field(default_factory=list)  # the prompts validate() scores
    space: Space | None = None  # the search space (the run's; None for essa-evaluate's fixed adapter)

    @property
    def dim(self) -> int:
        return int(self.backend.solution_length)


def _summarizer(cfg: Config, task: Task) -> tuple[Callable[[list[list[float]]], dict[str, float]], list[str]]:
    """The validation metrics of a task, and their names with the primary one first.

    SWMR logs need every dataset up front: the names come from a dry call. The primary metric is
    accuracy for checkable tasks, the mean reward otherwise.
    """
    threshold = float(getattr(task, "correct_threshold", 1.0))

    def summarize(per_prompt: list[list[float]]) -> dict[str, float]:
        return metrics.validation_metrics(per_prompt, threshold=threshold)

    names = list(summarize([[0.0] * cfg.eval.k]))
    primary = "accuracy" if threshold > 0 and cfg.backend.name != "fake" else "mean_reward"
    return summarize, [primary] + [n for n in names if n != primary]


def _load_model(cfg: Config, comm: dist.Comm) -> Any:
    """The base model for cfg.backend; rank 0 converts shared files first, the others wait.

    vllm loads the weights itself: it gets only the tokenizer and the module shapes the SVD-LoRA needs.
    """
    from essa_hpc import models
    from essa_hpc.placement import bind_rank_gpus

    # Before anything starts CUDA: narrow this rank to its GPUs (tensor_parallel_size of them for vllm,
    # one for hf) by the one placement rule, from the communicator's local rank.
    tp = int(cfg.backend.tensor_parallel_size) if cfg.backend.name == "vllm" else 1
    bind_rank_gpus(comm.local_rank, tp, _cuda_device_count)
    if comm.rank == 0:
        models.resolve_source(cfg.model)  # converts the embedded GGUF once (atomic), before others load
    comm.barrier()
    return models.load_skeleton(cfg.model) if cfg.backend.name == "vllm" else models.load(cfg.model)


def _cuda_device_count() -> int:
    """GPUs of the node when CUDA_VISIBLE_DEVICES is unset. torch.cuda.device_count asks NVML first and
    starts no CUDA context (torch.cuda.is_available would, and CUDA_VISIBLE_DEVICES set after it is ignored)."""
    import torch

    return int(torch.cuda.device_count())


def _renderer(loaded: Any, task: Task) -> Callable[[Example], str]:
    """The chat-template rendering of an example's prompt, once per example id."""
    from essa_hpc import models

    cache: dict[str, str] = {}

    def render(ex: Example) -> str:
        if ex.id not in cache:
            cache[ex.id] = models.render_chat(loaded.tokenizer, ex.prompt, task.system_prompt)
        return cache[ex.id]

    return render


def build_evaluator(cfg: Config, comm: dist.Comm) -> Evaluator:
    """The run's evaluator: model, task, the SVD-LoRA search space and the backend."""
    from essa_hpc.tasks import make_task, sft_examples, training_split

    task = make_task(cfg)
    summarize, metric_names = _summarizer(cfg, task)
    target = cfg.run.target_metric
    if target is not None and target not in metric_names:
        raise TaskError(f"run.target_metric: {target!r} is not a validation metric of task {cfg.task.name}; expected one of {metric_names}")
    if cfg.backend.name == "fake":
        from essa_hpc.backends.fake import FakeBackend

        train, val = task.train(), list(task.validation())[: cfg.eval.size]
        fake = FakeBackend(cfg.backend)
        return Evaluator(fake, task, lambda ex: ex.prompt, None, metric_names, summarize, train, val, make_space(cfg))

    from essa_hpc import svd_lora
    from essa_hpc.backends import make_backend

    train, val = training_split(task), list(task.validation())[: cfg.eval.size]
    sft_data = sft_examples(task, cfg) if cfg.lora.init == "sft" and not cfg.lora.adapter else []
    loaded = _load_model(cfg, comm)
    if cfg.search.space != "svd_lora":  # a seeded space moves the base weights themselves: no adapter, no SFT
        space = make_space(cfg, loaded)
        backend = make_backend(cfg, loaded, space.backend_view())
        return Evaluator(backend, task, _renderer(loaded, task), space.export, metric_names, summarize, train, val, space)
    svd = _search_space(cfg, comm, loaded, task, sft_data)

    from essa_hpc.export import base_model_reference, export_dtype

    base_ref, dtype = base_model_reference(cfg.model), export_dtype(cfg, loaded.model)  # docs/design.md, Adapters

    def export(x: np.ndarray, out: Path) -> None:
        svd_lora.export_adapter(svd, x, out, base_model_name_or_path=base_ref, dtype=dtype)

    space = make_space(cfg, loaded, svd, export)
    backend = make_backend(cfg, loaded, space.backend_view())
    return Evaluator(backend, task, _renderer(loaded, task), export, metric_names, summarize, train, val, space)


def _search_space(cfg: Config, comm: dist.Comm, loaded: Any, task: Task, sft_data: Sequence[Example]) -> Any:
    """The SVD-LoRA the run searches: around lora.adapter, a cached SFT warm start (trained on
    ``sft_data``: tasks.sft_examples), or a random init."""
    from essa_hpc import models, svd_lora

    adapter: Path | None
    if cfg.lora.adapter:
        adapter = Path(cfg.lora.adapter)
    elif cfg.lora.init == "sft":
        from essa_hpc import sft

        adapter = Path()
        if comm.rank == 0:
            trainable = models.load(cfg.model) if cfg.backend.name == "vllm" else loaded  # SFT needs real weights
            adapter = sft.cached_sft_adapter(cfg, trainable, sft_data, task.system_prompt, log=print)
            del trainable
        adapter = Path(comm.bcast(str(adapter)))
    else:
        adapter = None
    lora = cfg.lora
    if adapter is not None:
        return svd_lora.from_peft_dir(adapter, lora.alpha_fraction, lora.parametrization, model=loaded.model, targets=lora.targets)
    return svd_lora.random_init(
        loaded.model,
        lora.rank,
        lora.lora_alpha,
        lora.targets,
        cfg.run.seed,
        alpha_fraction=lora.alpha_fraction,
        parametrization=lora.parametrization,
    )


def adapter_evaluator(cfg: Config, comm: dist.Comm, examples: Sequence[Example] | None = None) -> Evaluator:
    """``essa-evaluate``'s evaluator: the base model plus cfg.lora.adapter exactly as saved (every
    singular value kept, so x = 0 is the adapter itself), or the base model alone; it validates on
    ``examples``, or on the first eval.size prompts of the validation split.

    Raises ValueError (TaskError, ModelError, AdapterError are ValueErrors) before loading what it can
    check without the model, and when a prompt plus generation would not fit the model's context.
    """
    from essa_hpc import models
    from essa_hpc.backends import make_backend
    from essa_hpc.tasks import check_prompt_lengths, make_task

    task = make_task(cfg)
    val = list(examples) if examples is not None else list(task.validation())[: cfg.eval.size]
    if not val:
        raise ValueError(f"task {cfg.task.name}: the validation split is empty")
    if cfg.backend.name == "fake":
        raise ValueError("backend.name=fake has no model to evaluate; use hf or vllm")
    models.set_threads(cfg.model.threads, comm.ranks_on_node)
    loaded = _load_model(cfg, comm)
    svd = None
    if cfg.lora.adapter:
        from essa_hpc import svd_lora

        svd = svd_lora.from_peft_dir(cfg.lora.adapter, 1.0, cfg.lora.parametrization, model=loaded.model)
    backend = make_backend(cfg, loaded, svd)
    context = int(getattr(loaded.model.config, "max_position_embeddings", 0) or 0)
    if context:
        check_prompt_lengths(val, loaded.tokenizer, task.system_prompt, context, cfg.backend.max_new_tokens)
    summarize, metric_names = _summarizer(cfg, task)
    return Evaluator(backend, task, _renderer(loaded, task), None, metric_names, summarize, [], val)


@dataclass
class Scores:
    """The outcome of scoring items on this rank, in item order."""

    rewards: np.ndarray  # float64 [items]
    tokens: np.ndarray  # int64 [items]: generated tokens per completion
    texts: list[str]  # the completions
    failures: int  # reward-function failures (out-of-range rewards included)
    timeouts: int
    generate_s: float  # seconds in the backend
    reward_s: float  # seconds in the task's reward
    errors: list[str] = field(default_factory=list)  # a few distinct failure messages (Rewards.errors)


def score(
    ev: Evaluator,
    vectors: np.ndarray,
    items: list[tuple[int, Example, int]],
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    limit: float = math.inf,
    failure_reward: float = 0.0,
) -> Scores:
    """Generate and reward (candidate row of `vectors`, example, sampling seed) items.

    A reward that is not finite or beyond ±``limit`` (dist.reward_limit: what the exact fixed-point
    sums hold) is a failure like a raising reward function: scored ``failure_reward``, counted and
    named in ``errors``, so a plugin returning 1e9 or a huge σ0 on the fake backend never stops a run
    (docs/design.md, "Faults and hostile inputs").
    """
    t0 = time.perf_counter()
    requests = [Request(row, ev.render(ex), seed) for row, ex, seed in items]
    outs = ev.backend.generate(vectors, requests, max_new_tokens=max_new_tokens, temperature=temperature) if requests else []
    t1 = time.perf_counter()
    r = ev.task.reward([ex for _, ex, _ in items], [o.text for o in outs]) if items else None
    t2 = time.perf_counter()
    rewards = np.array(r.values if r is not None else [], dtype=np.float64)
    failures, errors = (r.failures, list(r.errors)) if r is not None else (0, [])
    bad = ~np.isfinite(rewards) | (np.abs(rewards) > limit)
    if bad.any():
        first = float(rewards[np.flatnonzero(bad)[0]])
        errors.append(f"{ev.task.name}: reward {first:.3g} is beyond ±{limit:.3g} (dist.reward_limit); scored task.failure_reward")
        rewards[bad] = failure_reward
        failures += int(bad.sum())
    return Scores(
        rewards=rewards,
        tokens=np.asarray([o.tokens for o in outs], dtype=np.int64),
        texts=[o.text for o in outs],
        failures=failures,
        timeouts=r.timeouts if r is not None else 0,
        generate_s=t1 - t0,
        reward_s=t2 - t1,
        errors=errors,
    )


@dataclass
class Validation:
    """One vector's validation, gathered from every rank in prompt order."""

    per_prompt: list[list[float]]  # eval.k rewards per prompt
    samples: list[dict[str, Any]]  # (id, sample, completion, reward) per completion, when asked for
    failures: int
    timeouts: int


def validation_scores(ev: Evaluator, cfg: Config, comm: dist.Comm, vector: np.ndarray, keep_samples: bool = False) -> Validation:
    """Score one vector on ev.validation, eval.k samples per prompt, sharded over ranks in contiguous
    slices; every rank gets the whole result."""
    exs, k = list(ev.validation), cfg.eval.k
    lo, hi = dist.shard(len(exs), comm.size, comm.rank)
    pairs = [(i, s) for i in range(lo, hi) for s in range(k)]
    items = [(0, exs[i], dist.validation_seed(cfg.run.seed, i, s)) for i, s in pairs]
    scores = score(
        ev,
        vector[None, :],
        items,
        temperature=cfg.eval.temperature,
        limit=dist.reward_limit(cfg.task.batch_size),
        failure_reward=cfg.task.failure_reward,
    )
    rewards = scores.rewards.tolist()
    mine = [rewards[j * k : (j + 1) * k] for j in range(hi - lo)]
    samples = (
        [{"id": exs[i].id, "sample": s, "completion": text, "reward": v} for (i, s), text, v in zip(pairs, scores.texts, rewards)]
        if keep_samples
        else []
    )
    parts = comm.allgather((mine, samples, scores.failures, scores.timeouts))
    return Validation(
        per_prompt=[row for part in parts for row in part[0]],
        samples=[row for part in parts for row in part[1]],
        failures=sum(part[2] for part in parts),
        timeouts=sum(part[3] for part in parts),
    )


def validate(ev: Evaluator, cfg: Config, comm: dist.Comm, vector: np.ndarray) -> dict[str, float]:
    """Validation metrics of one vector, sharded over ranks; identical on every rank."""
    return ev.summarize(validation_scores(ev, cfg, comm, vector).per_prompt)


class AdapterValidation:
    """Validation of PEFT adapter folders on one loaded base model, as the run loop validates its mean.

    Each call reads the adapter back as an SVD-LoRA with every singular value kept (x = 0 is the
    adapter exactly) and runs ``validate`` on it: the same backend, prompts, seeds and metrics as an
    ESSA run's validation. The GRPO baseline validates its policy this way, so the two methods are
    scored by one path. The base model is loaded once; each call wraps and unwraps its layers.
    """

    def __init__(self, cfg: Config, comm: dist.Comm, task: Task, examples: Sequence[Example]) -> None:
        self.cfg, self.comm, self.task, self.examples = cfg, comm, task, list(examples)
        self.loaded = _load_model(cfg, comm)
        self.render = _renderer(self.loaded, task)
        self.summarize, self.metric_names = _summarizer(cfg, task)

    def __call__(self, adapter_dir: Path) -> dict[str, float]:
        from essa_hpc import svd_lora
        from essa_hpc.backends import make_backend

        svd = svd_lora.from_peft_dir(adapter_dir, 1.0, self.cfg.lora.parametrization, model=self.loaded.model)
        backend = make_backend(self.cfg, self.loaded, svd)
        try:
            ev = Evaluator(backend, self.task, self.render, None, self.metric_names, self.summarize, [], self.examples)
            return validate(ev, self.cfg, self.comm, np.zeros(svd.solution_length))
        finally:
            backend.close()
