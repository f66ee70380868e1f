"""The whole run configuration as frozen, typed dataclasses.

Why plain dataclasses: a config is data that every rank must agree on, that is written to the run
directory and the HDF5 log, and that sweeps rewrite with dotted keys. Nothing here loads a model or
touches MPI; `load_config` validates everything that can be checked without expensive work, so a bad
key or value fails in milliseconds with a message naming the field (docs/design.md, "Exit codes").

Sections and key names follow docs/design.md's config table; extra keys are documented in each field's
``doc`` metadata (``python -m essa_hpc.run --help-config`` prints them all).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import hashlib
import importlib.util
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem a user must fix; the message names the field and what was expected."""


def _f(default: Any, doc: str, **kw: Any) -> Any:
    """A dataclass field carrying its documentation (shown by --help-config)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata={"doc": doc}, **kw)
    return field(default=default, metadata={"doc": doc}, **kw)


EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
TASK_NAMES = ("arithmetic", "gsm8k", "math", "ifeval", "reward_model", "fake")
BACKEND_NAMES = ("hf", "vllm", "fake")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# search.space -> the optimizers it supports (docs/design.md, "Search spaces"); the first is the default
SEARCH_SPACES = {"svd_lora": ("cma", "es"), "lowrank": ("es",), "full": ("es",), "qes": ("es",)}
SEEDED_SPACES = ("lowrank", "full")  # spaces whose point is the model's weights (moved in place, never sent)
FITNESS_SHAPING_NAMES = ("none", "centered_ranks", "zscore")
STEP_SIZES = ("auto", "csa", "tpa")  # search.step_size; essa_hpc.search.cma_es.STEP_SIZES (a test keeps them equal)
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUANTIZATIONS = ("none", "int8", "int4", "awq", "gptq", "fp8", "compressed-tensors", "bitsandbytes")
REPORT_TO = ("none", "tensorboard", "wandb")  # log.report_to (essa_hpc/tracker.py)


@dataclass(frozen=True)
class RunSection:
    name: str = _f("default", "Run name; the run directory is <run.dir>/<run.name>.")
    dir: str = _f("runs", "Folder holding run directories.")
    seed: int = _f(1234, "The one seed every random choice derives from (optimizer, minibatches, sampling).")
    generations: int = _f(8, "Number of CMA-ES generations (stop criterion).")
    time_budget_s: float = _f(0.0, "Stop at the first generation boundary after this many seconds (0 = no limit).")
    train_budget_s: float = _f(
        0.0,
        "Stop at the first generation boundary after this many seconds of training: since the first generation, validation excluded (the GRPO baseline's grpo.time_budget_s rule; 0 = no limit).",
    )
    target_metric: str | None = _f(None, "Validation metric that stops the run once it reaches target_value.")
    target_value: float | None = _f(None, "Threshold for target_metric.")
    overwrite: bool = _f(
        False,
        "Replace an existing run directory that has no checkpoint past generation 0; a run with progress is never replaced (resume it, or pick another run.name).",
    )


@dataclass(frozen=True)
class ModelSection:
    path: str = _f(EMBEDDED_MODEL, "Base model: a local HF folder, a hub id (online only), a .gguf file, or the embedded default.")
    gguf_file: str | None = _f(None, "GGUF file name inside model.path (transformers' gguf_file=).")
    dtype: str = _f("auto", f"Weights dtype, one of {DTYPES}; auto = bfloat16 on GPU, float32 on CPU.")
    quantization: str = _f("none", f"Weight quantization, one of {QUANTIZATIONS} (int8/int4 for hf; the rest for vllm checkpoints).")
    device: str = _f("auto", "cpu, cuda, cuda:N, or auto (cuda when available).")
    threads: int = _f(0, "torch intra-op threads per rank; 0 = cores on this node / ranks on this node.")
    cache_dir: str | None = _f(None, "Where converted models (GGUF -> safetensors) are cached; default ~/.cache/essa_hpc.")


@dataclass(frozen=True)
class LoraSection:
    adapter: str | None = _f(None, "Path of a PEFT LoRA adapter to start from (the SFT warm start).")
    init: str = _f(
        "sft",
        "Where the adapter comes from when lora.adapter is unset: sft (train one first, cached) or random (A Kaiming-uniform, B = 0).",
    )
    rank: int = _f(8, "LoRA rank r (for init: sft / random; an adapter brings its own).")
    lora_alpha: float = _f(16.0, "LoRA scaling numerator; the update is (lora_alpha / r) * B A.")
    alpha_fraction: float = _f(
        0.125,
        "ESSA's α: the top floor(α·r) singular values of each factor are searched (default: the top one of r = 8, d = 240 on the embedded default; fewer coordinates let a short CPU run move them).",
    )
    targets: list[str] = _f(["q_proj", "k_proj", "v_proj", "o_proj"], "Module names the LoRA adapts.")
    parametrization: str = _f(
        "relative",
        'How a search vector x moves singular values: offset (σ = σ_sft + x), relative (σ = σ_sft + x·mean(σ_sft of that factor)) or multiplicative (σ = σ_sft·exp(x)). The paper searches offsets (its presets here set offset); the CPU default is relative so that one search.sigma0 means the same step for factors whose σ differ in scale (docs/design.md, "The paper\'s settings"; from a one-epoch SFT in 20 CPU minutes the two were level within noise: offset σ0 0.2 0.0 and +1.25 points, relative σ0 1.0 +0.5 and +0.75, seeds 1234 and 1).',
    )
    export_dtype: str = _f("auto", "dtype of the exported adapters' weights: auto (the base model's dtype), float32, bfloat16 or float16.")


@dataclass(frozen=True)
class SftSection:
    steps: int = _f(
        0,
        "Optimizer steps (0 = use epochs). The default trains one epoch over sft.examples (400 examples: 25 steps of 16), an SFT trained to a low, flat loss rather than a few-step format warm start: ESSA is measured against what a user's real SFT adapter gives (README, bench/bench_demo.py). sft.steps=3 with sft.learning_rate=2e-3 is the first release's warm start.",
    )
    epochs: float = _f(1.0, "Passes over the SFT examples when steps = 0.")
    learning_rate: float = _f(5e-4, "AdamW learning rate (peak, after a short linear warm-up, then cosine decay).")
    batch_size: int = _f(16, "Examples per optimizer step.")
    max_length: int = _f(256, "Token cap on prompt + response.")
    examples: int = _f(
        400,
        "Number of SFT examples used: the first ones of sft.path, else of the task's SFT split (task.sft_size), else of its train split.",
    )
    path: str | None = _f(
        None,
        "SFT data file (JSONL/JSON/CSV/parquet/save_to_disk) with fields prompt and response, for tasks whose data has no reference responses (IFEval); default: the task's own SFT examples.",
    )


@dataclass(frozen=True)
class SearchSection:
    optimizer: str = _f(
        "cma", "Optimizer: cma (pycma CMA-ES) or es (OpenAI-ES/NES with antithetic pairs); search.space says which it supports."
    )
    space: str = _f(
        "svd_lora",
        "Search space: svd_lora (ESSA: the singular values of a LoRA adapter), lowrank (EGGROLL-style rank-search.rank perturbations of the base weights, a rank's population in one batched generate) or full (es-at-scale-style full-shape perturbations, one candidate at a time). lowrank and full need search.optimizer=es and backend.name=hf. qes: the integer codes of a model quantized with model.quantization int8/int4 (search.optimizer=es, sigma0 in code units; docs/design.md, QES).",
    )
    popsize: int = _f(
        8,
        "CMA-ES population λ (CPU default; paper Table 7: 24-96 on GPUs). Fewer candidates, each on more prompts (task.batch_size): with a trained SFT adapter the candidates' reward differences are small, and their ranking is only as good as the prompts behind each score (docs/design.md, \"The paper's settings\").",
    )
    sigma0: float = _f(
        1.0,
        "Initial CMA step size in units of the parametrization; relative: 1.0 moves each searched σ by about its factor's mean. Measured on the embedded default (greedy): random candidates at 0.3 changed no answer at all, at 1.0 ~10% of answers (mean cost ~2 points, best candidates +3-9), at 1.5 15%. es: the noise scale σ of generation 0 (see sigma_decay); seeded spaces perturb raw weights, so far smaller values (es-at-scale: 0.001).",
    )
    diagonal: bool = _f(
        False,
        "true: sep-CMA (diagonal covariance), linear cost in d; false: full-covariance CMA-ES as the paper runs it, O(d²) memory and O(d³) per eigendecomposition. Full CMA's ask+tell takes ~0.1 s at d 1792 and λ 24, ~1 s at λ 96, on 2 CPU cores (bench/results/search.json): small next to a generation on GPUs, a cost to weigh above a few thousand dimensions, where sep-CMA stays linear. At the embedded d = 240, full CMA with λ 8 × 64 prompts gained +1.25, +0.5 and +1.25 points in 20 CPU minutes from a one-epoch SFT (seeds 1234, 1, 2) where sep-CMA with λ 16 × 16 gained +0.5, +0.75 and +0.25 (docs/design.md, \"The paper's settings\").",
    )
    cmean: float = _f(
        0.25,
        "cma: learning rate c_m of the mean, m ← m + c_m Σ w_i (x_{i:λ} − m) (Hansen 2016 eq. (9), pycma's CMA_cmean). Below 1 the mean takes that fraction of each selected step while candidates keep their spread σ: with noisy rewards (few prompts per candidate) the mean drifts less per generation and averages the selections of ~1/c_m generations. The paper's CMA-ES uses 1 (its presets here set 1). Measured from a one-epoch SFT on a new task (bench/results/vs_grpo_weak*.json): c_m 1 lost 5.25 and 0.75 points of held-out accuracy in 20 CPU minutes, c_m 0.25 gained 0.5 and 0.75 (seeds 1234, 1), hence the CPU default.",
    )
    mirrors: int = _f(
        0,
        "cma: mirrored (antithetic) sampling, the number m of candidates per generation that are the mirror m − σy of the candidate before them (pycma's CMA_mirrors, unconditional; Brockhoff et al. 2010). A pair is scored on the same prompts, so its reward difference is a two-sided step along y. 0 = λ independent candidates; at most λ/2 (λ/2 − 1 from d = 300 on, where TPA spends two candidates on line samples).",
    )
    active: bool = _f(
        True,
        "cma: active CMA (Jastrebski & Arnold 2006; Hansen 2016 eq. (47)), pycma's CMA_active and its default: the worst candidates' steps enter the covariance update with negative weights, so C shrinks along directions that scored badly. false keeps only the μ best, as the original CMA-ES.",
    )
    step_size: str = _f(
        "auto",
        "cma: step-size rule, pycma's AdaptSigma. auto = pycma's choice, cumulative step-size adaptation (CSA, Hansen 2016 eqs. (43)-(44)) below d = 300 and two-point adaptation (TPA, Hansen 2008) from there; csa or tpa pins one at any d. TPA spends the first two candidates of a generation on a line sample ± along the last mean step and needs λ >= 4.",
    )
    digest_every: int = _f(1, "Compare a hash of the optimizer state across ranks every this many generations.")
    digest_repair: bool = _f(False, "On a digest mismatch, copy rank 0's state instead of stopping the job.")
    fitness_shaping: str = _f("none", "none (raw −reward), centered_ranks or zscore (es: standardized rewards, es-at-scale's).")
    learning_rate: float = _f(0.05, "es: learning rate α of θ ← θ + α/(nσ) Σ F_i ε_i (generation 0; see lr_decay).")
    lr_decay: float = _f(1.0, "es: α of generation g is learning_rate · lr_decay^g.")
    sigma_decay: float = _f(1.0, "es: σ of generation g is sigma0 · sigma_decay^g (sigma0 is es's noise scale σ).")
    antithetic: bool = _f(True, "es: mirrored pairs (ε, −ε) share one noise draw; needs an even search.popsize.")
    rank: int = _f(1, "lowrank: rank r of each perturbation E = A Bᵀ/√r of a target matrix.")
    targets: list[str] = _f(
        list(ALL_TARGETS), "lowrank/full: names of the Linear modules perturbed (default: every attention and MLP projection)."
    )
    qes_window: int = _f(
        16, "qes: K, updates between resets of the error-feedback residual; replay rebuilds it from at most K-1 past updates."
    )
    qes_residual: str = _f("replay", "qes: replay (rebuild the residual from seeds, memory-lean) or stored (keep it, 4 bytes per code).")
    qes_decay: float = _f(1.0, "qes: γ, the residual's decay per update (1 = plain error feedback).")
    common_random_numbers: bool = _f(
        False,
        "Sampling seeds per (generation, prompt), shared by all candidates, instead of per candidate: at backend.temperature > 0 candidates then differ by their effect alone, not by their sampling noise.",
    )


@dataclass(frozen=True)
class BackendSection:
    name: str = _f("hf", f"Evaluator, one of {BACKEND_NAMES}.")
    max_new_tokens: int = _f(24, "Generation length cap (the default task's answers take ~20 tokens).")
    temperature: float = _f(0.0, "0 = greedy.")
    top_p: float = _f(1.0, "Nucleus sampling mass.")
    stop: list[str] = _f([], "Stop strings (completion is cut at the first one).")
    tensor_parallel_size: int = _f(1, "GPUs per rank (vllm).")
    max_batch_sequences: int = _f(256, "Cap on sequences per forward pass (hf); larger populations are chunked.")
    gpu_memory_utilization: float = _f(0.85, "vllm: fraction of GPU memory for the engine.")
    max_loras: int = _f(
        0,
        "vllm: adapters resident in the engine at once; 0 = this rank's candidates (ceil(λ / ranks)), so every candidate is served in one generate call. Fewer saves GPU memory; vLLM then swaps adapters in and out within the call.",
    )
    max_model_len: int = _f(
        0, "vllm: context length of the engine (prompt + generation); 0 = the model's. Lower it to fit the KV cache of long-context models."
    )
    fake_function: str = _f("sphere", "fake backend: sphere or rosenbrock (reward = −f(x − shift)).")
    fake_dim: int = _f(64, "fake backend: solution length d.")
    fake_noise: float = _f(0.0, "fake backend: std of Gaussian noise per sample, seeded per (generation, candidate, sample).")
    fake_sleep_s: float = _f(0.0, "fake backend: seconds slept per sample to emulate generation.")


@dataclass(frozen=True)
class TaskSection:
    name: str = _f("arithmetic", f"One of {TASK_NAMES}, or package.module:function for a reward plugin.")
    path: str | None = _f(None, "Training data file or folder (JSONL/JSON/CSV/parquet/load_from_disk).")
    val_path: str | None = _f(None, "Validation data; default: held out from task.path (or the task's test split).")
    batch_size: int = _f(
        64,
        "Prompts per candidate per generation (the same prompts for all candidates). The reward SE of a candidate falls as 1/√batch_size; the paper uses 100-500 (CPU default 64 with search.popsize 8).",
    )
    system_prompt: str | None = _f(None, "System prompt; default: the task's (paper's) prompt.")
    prompt_field: str | None = _f(None, "Column holding the prompt (default per task).")
    answer_field: str | None = _f(None, "Column holding the reference answer (default per task).")
    sft_size: int = _f(
        0,
        "gsm8k/math/reward_model/plugin: training records reserved for the SFT warm start (a fixed pseudo-random draw, the same for every run seed); ESSA never trains on them (paper, GSM8K: 1495 of 7473). 0 = SFT and ESSA share the training split.",
    )
    train_size: int = _f(0, "Cap on ESSA's training split after the SFT reservation (0 = all the rest; paper, GSM8K: 5978).")
    digits: int = _f(2, "arithmetic: digits per operand.")
    operations: list[str] = _f(["+", "-"], "arithmetic: operations drawn from +, -, *.")
    format_credit: float = _f(
        0.0, "arithmetic/gsm8k/math: reward for a well-formed \\boxed{} answer that is wrong (a correct answer scores 1.0)."
    )
    ifeval_reward: str = _f(
        "instruction", "ifeval: instruction (fraction of the prompt's instructions followed) or prompt (1 only when all are)."
    )
    ifeval_loose: bool = _f(False, "ifeval: IFEval's loose check (also accept the response without its first/last line or '*').")
    reward_model: str | None = _f(None, "reward_model: path of a sequence-classification reward model.")
    reward_normalization: str = _f(
        "none", "reward_model: none, or zscore (standardize the scores of each reward() call; not rank-count invariant)."
    )
    reward_batch_size: int = _f(16, "reward_model: sequences per forward pass.")
    reward_output: str = _f(
        "auto",
        "reward_model: which output is the reward: auto (a `score` output when the model returns one, as ArmoRM does, else the logits), score, or logits (one label, or label 1 - label 0).",
    )
    trust_remote_code: bool = _f(
        False,
        "reward_model: run the reward model's own Python code from its folder (ArmoRM needs it). Off by default: remote code runs with your permissions; turn it on only for a model you trust.",
    )
    plugins: list[str] = _f([], "Extra reward functions module:function, combined with plugin_weights.")
    plugin_weights: list[float] = _f([], "Weights for task.plugins (default 1.0 each).")
    reward_timeout_s: float = _f(60.0, "Per-batch timeout for a reward function.")
    failure_reward: float = _f(
        0.0,
        "Reward given when a reward function fails, times out, returns NaN/None/inf, or a reward beyond ±dist.reward_limit(task.batch_size) (2^20 up to 512 prompts).",
    )
    max_failed_generations: int = _f(
        3,
        "Stop with exit status 1 after this many consecutive generations in which every reward failed (0 = never stop).",
    )


@dataclass(frozen=True)
class EvalSection:
    every: int = _f(4, "Validate the current mean every this many generations (0 = only at the end).")
    k: int = _f(1, "Samples per validation prompt (avg@k, pass@k).")
    split: str = _f("validation", "Which split validates.")
    size: int = _f(128, "Validation prompts.")
    temperature: float = _f(0.0, "Sampling temperature for validation (k > 1 needs > 0).")


@dataclass(frozen=True)
class LogSection:
    checkpoint_every: int = _f(5, "Checkpoint period in generations.")
    progress: bool = _f(True, "Rank 0 prints one status line per generation.")
    report_to: str = _f(
        "none",
        "Mirror the HDF5 log rows to a tracker on rank 0: none, tensorboard (<run dir>/tensorboard) or wandb (offline unless WANDB_MODE is set).",
    )
    wandb_project: str = _f("essa_hpc", "W&B project of log.report_to=wandb.")


GRPO_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
GRPO_LOSSES = ("grpo", "dapo", "dr_grpo", "bnpo")
GRPO_REWARD_SCALING = ("group", "batch", "none")


@dataclass(frozen=True)
class GrpoSection:
    """The GRPO baseline (``python -m essa_hpc.grpo``); an ESSA run ignores this section."""

    learning_rate: float = _f(1e-4, "AdamW learning rate of the LoRA parameters.")
    group_size: int = _f(8, "Completions sampled per prompt (TRL num_generations); advantages are relative within a group.")
    prompts_per_step: int = _f(4, "Prompts per optimizer step (a step trains on prompts_per_step × group_size completions).")
    beta: float = _f(0.0, "KL coefficient against the starting policy (0 = no reference model, TRL's default).")
    max_steps: int = _f(100, "Optimizer steps (stop criterion; grpo.time_budget_s may stop earlier).")
    time_budget_s: float = _f(
        0.0, "Stop at the first step boundary after this many seconds of training time (validation excluded; 0 = no limit)."
    )
    temperature: float = _f(1.0, "Sampling temperature of the training completions (validation uses eval.temperature).")
    lr_scheduler: str = _f("constant", f"Learning-rate schedule over max_steps, one of {GRPO_SCHEDULERS}.")
    warmup_steps: int = _f(0, "Linear warm-up steps of the learning rate.")
    loss_type: str = _f("dapo", f"TRL loss aggregation, one of {GRPO_LOSSES} (dapo is TRL's default).")
    scale_rewards: str = _f("group", f"Advantage scaling, one of {GRPO_REWARD_SCALING} (TRL scale_rewards).")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")


# Keys that change no result: stop criteria (a run may be extended) and cosmetic keys (a moved run.dir,
# progress printing, checkpoint period, cache folder). LEGACY_DIGEST_IGNORE is what older checkpoints used.
LEGACY_DIGEST_IGNORE = ("run.generations", "run.time_budget_s", "run.train_budget_s", "run.overwrite")
DIGEST_IGNORE = (
    *LEGACY_DIGEST_IGNORE,
    "run.name",
    "run.dir",
    "run.target_metric",
    "run.target_value",
    "log.progress",
    "log.checkpoint_every",
    "model.cache_dir",
    "task.max_failed_generations",
    "log.report_to",
    "log.wandb_project",
    "lora.export_dtype",
)


# Keys the first release's config did not have (the grpo section aside, which no digest reads): its
# checkpoints resume while these stay at the value that behaves as the first release did
# (Config.legacy_digest): their default, or the value of LEGACY_VALUES where the default has moved since.
ADDED_SINCE_FIRST_RELEASE = (
    "task.max_failed_generations",
    "log.report_to",
    "log.wandb_project",
    "lora.export_dtype",
    "search.antithetic",
    "search.cmean",
    "search.active",
    "search.common_random_numbers",
    "search.learning_rate",
    "search.lr_decay",
    "search.mirrors",
    "search.qes_decay",
    "search.qes_residual",
    "search.qes_window",
    "search.rank",
    "search.sigma_decay",
    "search.step_size",
    "search.space",
    "search.targets",
    "sft.path",
    "task.reward_output",
    "task.sft_size",
    "task.train_size",
    "task.trust_remote_code",
)
LEGACY_VALUES: dict[str, Any] = {"search.cmean": 1.0}  # the first release moved CMA's mean by the full step


def digest_view(d: dict[str, Any], ignore: tuple[str, ...] = DIGEST_IGNORE) -> dict[str, Any]:
    """A config dict without the grpo section and the ignored keys: what the digest hashes."""
    d = copy.deepcopy(d)
    d.pop("grpo", None)
    for key in ignore:
        sec, name = key.split(".")
        if isinstance(d.get(sec), dict):
            d[sec].pop(name, None)
    return d


def digest_diff(old: dict[str, Any], new: dict[str, Any], limit: int = 4) -> str:
    """The keys that differ between two config dicts (digest keys only), as 'key: old -> new; ...'."""
    a, b = digest_view(old), digest_view(new)
    out = []
    for sec in sorted(set(a) | set(b)):
        sa, sb = a.get(sec) or {}, b.get(sec) or {}
        for name in sorted(set(sa) | set(sb)):
            if sa.get(name, "<unset>") != sb.get(name, "<unset>"):
                out.append(f"{sec}.{name}: {sa.get(name, '<unset>')!r} -> {sb.get(name, '<unset>')!r}")
    more = f"; and {len(out) - limit} more" if len(out) > limit else ""
    return "; ".join(out[:limit]) + more


@dataclass(frozen=True)
class Config:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    sft: SftSection = field(default_factory=SftSection)
    search: SearchSection = field(default_factory=SearchSection)
    backend: BackendSection = field(default_factory=BackendSection)
    task: TaskSection = field(default_factory=TaskSection)
    eval: EvalSection = field(default_factory=EvalSection)
    log: LogSection = field(default_factory=LogSection)
    grpo: GrpoSection = field(default_factory=GrpoSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def digest(self, ignore: tuple[str, ...] = DIGEST_IGNORE) -> str:
        """Hash of everything that changes results; checkpoints refuse to resume under another digest.

        Stop criteria are left out so a user may extend a finished or preempted run; so are the grpo
        section, which an ESSA run never reads, and the cosmetic keys of DIGEST_IGNORE (where the run
        directory lives, progress printing, checkpoint period), which change no result.
        """
        return hashlib.sha256(json.dumps(digest_view(self.to_dict(), ignore), sort_keys=True).encode()).hexdigest()[:16]

    def legacy_digest(self) -> str | None:
        """The digest as checkpoints of the first release computed it, so that they still resume: its
        four ignored keys, without the keys added since. None when one of those keys is set away from
        the value that behaves as the first release did (such a config cannot be the one an old
        checkpoint was written under)."""
        now, default = self.to_dict(), Config().to_dict()
        for key in ADDED_SINCE_FIRST_RELEASE:
            sec, name = key.split(".")
            if key not in DIGEST_IGNORE and now[sec][name] != LEGACY_VALUES.get(key, default[sec][name]):
                return None
        return self.digest((*LEGACY_DIGEST_IGNORE, *ADDED_SINCE_FIRST_RELEASE))

    def replace(self, **overrides: Any) -> Config:
        """Dotted overrides in Python: cfg.replace(**{"search.popsize": 8})."""
        return from_dict(_apply(self.to_dict(), [(k, v) for k, v in overrides.items()]))

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Config)}  # type: ignore[misc]
_HINTS: dict[type, dict[str, Any]] = {}


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def _field_hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def all_keys() -> list[str]:
    out = []
    for sec, cls in _section_types().items():
        out += [f"{sec}.{f.name}" for f in dataclasses.fields(cls)]
    return out


def describe() -> str:
    """Every key with its default and documentation, for --help-config."""
    lines = []
    for sec, cls in _section_types().items():
        lines.append(f"[{sec}]")
        for f in dataclasses.fields(cls):
            factory = f.default_factory
            default = factory() if callable(factory) else f.default
            lines.append(f"  {sec}.{f.name} = {default!r}\n      {f.metadata.get('doc', '')}")
    return "\n".join(lines)


def _suggest(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check a value against a field's type; YAML gives ints for floats and lists for lists."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            value = _finite(key, value)  # 1e3 is an integer written in scientific notation
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            return _finite(key, value)  # YAML 1.1 reads 1e-5 (no dot) as a string; it is a number here
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return _finite(key, value)
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _finite(key: str, value: Any) -> float:
    """A float field's value as a finite float: 1e400 overflows to inf, which no key means."""
    try:
        v = float(value.strip() if isinstance(value, str) else value)
    except OverflowError:
        v = math.inf
    if math.isnan(v):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    if math.isinf(v):
        why = "" if isinstance(value, float) else " (beyond the range of a 64-bit float, ±1.8e308)"
        raise ConfigError(f"{key}: expected a finite number, got {value!r}{why}")
    return v


def from_dict(data: dict[str, Any]) -> Config:
    """Build a Config from nested plain data, rejecting unknown keys with suggestions."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(data).__name__}")
    sections = _section_types()
    built: dict[str, Any] = {}
    for sec, body in data.items():
        if sec not in sections:
            raise ConfigError(f"unknown config section {sec!r}{_suggest(sec, list(sections))}")
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(f"{sec}: expected a mapping of keys, got {body!r}")
        cls = sections[sec]
        hints = _field_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for key, value in body.items():
            if key not in names:
                full = f"{sec}.{key}"
                raise ConfigError(f"unknown config key {full!r}{_suggest(full, all_keys())}")
            kwargs[key] = _coerce(f"{sec}.{key}", value, hints[key])
        built[sec] = cls(**kwargs)
    return Config(**built)


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` with the value read as YAML (so 8 is an int, [x, y] a list, null is None)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. search.popsize=48")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {e}") from None
    return key, value


def _apply(data: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = all_keys()
    for key, value in overrides:
        if key not in keys:
            raise ConfigError(f"unknown config key {key!r}{_suggest(key, keys)}")
        sec, name = key.split(".", 1)
        data.setdefault(sec, {})
        if data[sec] is None:
            data[sec] = {}
        data[sec][name] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, check_paths: bool = True) -> Config:
    """YAML file (optional) + `--set` overrides -> a validated Config. Raises ConfigError."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"--config {p}: is a folder, expected a YAML file")
        if not p.exists() and p.parent.as_posix() in (".", "configs"):
            p = _preset_or(p)  # a preset (fake_scaling, configs/fake_scaling.yaml): the copy the package ships
        if not p.is_file():
            raise ConfigError(f"--config {p}: no such file")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"--config {p}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save it as UTF-8"
            ) from None
        except OSError as e:
            raise ConfigError(f"--config {p}: cannot read ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {p}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config {p}: expected a mapping of sections at the top level")
    data = _apply(data, [parse_override(o) for o in overrides or []])
    cfg = from_dict(data)
    validate(cfg, check_paths=check_paths)
    return cfg


def _preset_or(p: Path) -> Path:
    """``--config NAME`` for a preset of configs/, found where the package keeps it (essa_hpc.resources)."""
    from essa_hpc import resources

    try:
        return resources.preset(p.name)
    except resources.ResourceError:
        return p


def validate(cfg: Config, check_paths: bool = True) -> None:
    """Every check that needs no model or data load. Raises ConfigError naming the first bad field."""
    r, m, lo, s, b, t, e, lg, sf = cfg.run, cfg.model, cfg.lora, cfg.search, cfg.backend, cfg.task, cfg.eval, cfg.log, cfg.sft

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {msg}")

    need(
        bool(r.name) and not any(c in r.name for c in "/\\\0") and r.name not in (".", ".."),
        "run.name",
        f"expected a folder name (not empty, '.' or '..', without '/', a backslash or NUL), got {r.name!r}",
    )
    need(r.generations >= 1, "run.generations", f"expected >= 1, got {r.generations}")
    need(r.time_budget_s >= 0, "run.time_budget_s", f"expected >= 0 (0 = no limit), got {r.time_budget_s}")
    need(r.train_budget_s >= 0, "run.train_budget_s", f"expected >= 0 (0 = no limit), got {r.train_budget_s}")
    need(0 <= r.seed < 2**63, "run.seed", f"expected 0 <= seed < 2**63, got {r.seed}")
    need((r.target_metric is None) == (r.target_value is None), "run.target_value", "run.target_metric and run.target_value go together")
    need(m.dtype in DTYPES, "model.dtype", f"expected one of {DTYPES}, got {m.dtype!r}")
    need(m.quantization in QUANTIZATIONS, "model.quantization", f"expected one of {QUANTIZATIONS}, got {m.quantization!r}")
    need(
        m.device == "auto" or m.device == "cpu" or m.device.startswith("cuda"),
        "model.device",
        f"expected cpu, cuda, cuda:N or auto, got {m.device!r}",
    )
    need(m.threads >= 0, "model.threads", f"expected >= 0 (0 = automatic), got {m.threads}")
    need(lo.init in ("sft", "random"), "lora.init", f"expected sft or random, got {lo.init!r}")
    need(lo.export_dtype in DTYPES, "lora.export_dtype", f"expected one of {DTYPES}, got {lo.export_dtype!r}")
    need(lo.rank >= 1, "lora.rank", f"expected a positive rank, got {lo.rank}")
    need(0 < lo.alpha_fraction <= 1, "lora.alpha_fraction", f"expected 0 < α <= 1, got {lo.alpha_fraction}")
    need(
        math.floor(lo.alpha_fraction * lo.rank) >= 1,
        "lora.alpha_fraction",
        f"floor(α·r) = floor({lo.alpha_fraction}·{lo.rank}) = 0 searched singular values per factor; raise α or the rank",
    )
    need(len(lo.targets) >= 1, "lora.targets", "expected at least one target module")
    need(
        lo.parametrization in ("offset", "relative", "multiplicative"),
        "lora.parametrization",
        f"expected offset, relative or multiplicative, got {lo.parametrization!r}",
    )
    need(sf.steps >= 0 and sf.epochs > 0, "sft.steps", "expected steps >= 0 and epochs > 0")
    need(sf.learning_rate > 0, "sft.learning_rate", f"expected > 0, got {sf.learning_rate}")
    need(
        sf.batch_size >= 1 and sf.max_length >= 8 and sf.examples >= 1,
        "sft.batch_size",
        "expected batch_size >= 1, max_length >= 8, examples >= 1",
    )
    _validate_space(cfg, need)
    need(s.sigma0 > 0 and math.isfinite(s.sigma0), "search.sigma0", f"expected a finite step size > 0, got {s.sigma0}")
    need(s.digest_every >= 1, "search.digest_every", f"expected >= 1, got {s.digest_every}")
    need(0 < s.cmean <= 1, "search.cmean", f"expected a mean learning rate 0 < c_m <= 1, got {s.cmean}")
    need(
        s.fitness_shaping in FITNESS_SHAPING_NAMES,
        "search.fitness_shaping",
        f"expected one of {FITNESS_SHAPING_NAMES}, got {s.fitness_shaping!r}",
    )
    need(b.name in BACKEND_NAMES, "backend.name", f"expected one of {BACKEND_NAMES}, got {b.name!r}{_suggest(b.name, list(BACKEND_NAMES))}")
    need(b.max_new_tokens >= 1, "backend.max_new_tokens", f"expected >= 1, got {b.max_new_tokens}")
    need(b.temperature >= 0, "backend.temperature", f"expected >= 0, got {b.temperature}")
    need(b.max_loras >= 0, "backend.max_loras", f"expected >= 0 (0 = candidates per rank), got {b.max_loras}")
    need(b.max_model_len >= 0, "backend.max_model_len", f"expected >= 0 (0 = the model's context), got {b.max_model_len}")
    need(0 < b.top_p <= 1, "backend.top_p", f"expected 0 < top_p <= 1, got {b.top_p}")
    need(b.tensor_parallel_size >= 1, "backend.tensor_parallel_size", f"expected >= 1, got {b.tensor_parallel_size}")
    need(b.max_batch_sequences >= 1, "backend.max_batch_sequences", f"expected >= 1, got {b.max_batch_sequences}")
    need(b.fake_function in ("sphere", "rosenbrock"), "backend.fake_function", f"expected sphere or rosenbrock, got {b.fake_function!r}")
    need(
        b.fake_dim >= 1 and b.fake_noise >= 0 and b.fake_sleep_s >= 0,
        "backend.fake_dim",
        "expected fake_dim >= 1, fake_noise >= 0, fake_sleep_s >= 0",
    )
    need(
        b.name != "fake" or t.name in ("fake", "arithmetic"),
        "task.name",
        "backend.name=fake scores candidates analytically; use task.name=fake (or leave the default)",
    )
    need(
        t.name in TASK_NAMES or _is_plugin(t.name),
        "task.name",
        f"expected one of {TASK_NAMES} or package.module:function, got {t.name!r}{_suggest(t.name, list(TASK_NAMES))}",
    )
    for pl in t.plugins:
        need(_is_plugin(pl), "task.plugins", f"expected package.module:function, got {pl!r}")
    need(
        not t.plugin_weights or len(t.plugin_weights) == len(t.plugins),
        "task.plugin_weights",
        f"expected {len(t.plugins)} weights (one per plugin), got {len(t.plugin_weights)}",
    )
    need(t.batch_size >= 1, "task.batch_size", f"expected >= 1 prompts per candidate, got {t.batch_size}")
    need(1 <= t.digits <= 12, "task.digits", f"expected 1..12, got {t.digits}")
    need(
        len(t.operations) >= 1 and all(o in ("+", "-", "*") for o in t.operations),
        "task.operations",
        f"expected a non-empty list from +, -, *, got {t.operations}",
    )
    need(t.reward_timeout_s > 0, "task.reward_timeout_s", f"expected > 0, got {t.reward_timeout_s}")
    need(t.max_failed_generations >= 0, "task.max_failed_generations", f"expected >= 0 (0 = never stop), got {t.max_failed_generations}")
    need(
        t.name != "reward_model" or t.reward_model is not None,
        "task.reward_model",
        "task.name=reward_model needs the path of a reward model",
    )
    need(t.ifeval_reward in ("instruction", "prompt"), "task.ifeval_reward", f"expected instruction or prompt, got {t.ifeval_reward!r}")
    need(
        t.reward_normalization in ("none", "zscore"),
        "task.reward_normalization",
        f"expected none or zscore, got {t.reward_normalization!r}",
    )
    need(t.reward_batch_size >= 1, "task.reward_batch_size", f"expected >= 1, got {t.reward_batch_size}")
    need(
        t.reward_output in ("auto", "score", "logits"),
        "task.reward_output",
        f"expected auto, score or logits, got {t.reward_output!r}",
    )
    need(
        t.sft_size >= 0 and t.train_size >= 0,
        "task.sft_size",
        f"expected sft_size >= 0 and train_size >= 0, got {t.sft_size}, {t.train_size}",
    )
    need(e.every >= 0, "eval.every", f"expected >= 0 (0 = only at the end), got {e.every}")
    need(e.k >= 1, "eval.k", f"expected >= 1 samples per prompt, got {e.k}")
    need(e.size >= 1, "eval.size", f"expected >= 1 validation prompts, got {e.size}")
    need(e.k == 1 or e.temperature > 0, "eval.temperature", "eval.k > 1 samples the same prompt k times; set eval.temperature > 0")
    need(lg.checkpoint_every >= 1, "log.checkpoint_every", f"expected >= 1, got {lg.checkpoint_every}")
    need(lg.report_to in REPORT_TO, "log.report_to", f"expected one of {REPORT_TO}, got {lg.report_to!r}")
    _validate_grpo(cfg.grpo, need)
    if check_paths:
        # the tracker's package, checked here (before any model loads) rather than at rank 0's first row
        package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(lg.report_to)
        need(
            package is None or importlib.util.find_spec(package) is not None,
            "log.report_to",
            f"{lg.report_to} needs the {package} package: pip install {'essa_hpc[tracker]' if package == 'tensorboard' else 'wandb'}",
        )
        for key, value in (
            ("lora.adapter", lo.adapter),
            ("task.path", t.path),
            ("task.val_path", t.val_path),
            ("sft.path", sf.path),
        ):
            need(value is None or Path(value).exists(), key, f"no such file or folder: {value}")
        # The reward model may be a hub id ("org/name", loaded from the hub or its cache) like model.path.
        rm = t.reward_model
        if rm is not None and not Path(rm).exists() and _looks_local(rm):
            raise ConfigError(f"task.reward_model: no such file or folder: {rm}")
        # A path-looking value must exist; "org/name" is a hub id, checked when the model loads.
        kind, why = model_path_kind(m.path)
        if kind == "path" and not Path(m.path).expanduser().exists():
            raise ConfigError(f"model.path: no such file or folder: {m.path} (read as a local path: {why})")


_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[\w.-]+$")  # huggingface_hub's repo id: [namespace/]name
_FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".json", ".yaml", ".yml")


def model_path_kind(path: str) -> tuple[str, str]:
    """How ``model.path`` is read, as the HF ecosystem reads a name: ("embedded" | "path" | "hub", why).

    An existing file or folder is a path. So is anything a hub id cannot be: absolute or ./ ../ ~
    prefixes, more than one "/", a file suffix, characters outside [A-Za-z0-9_.-], or a first part that
    is a folder here (``models/qwen-missing`` with ``models/`` present). The rest (``Qwen/Qwen2.5-7B``,
    ``gpt2``) is a hub id, resolved from the local HF cache first (models.resolve_source).
    """
    if path.startswith("embedded:"):
        return "embedded", "the embedded: prefix"
    p = Path(path).expanduser()
    if p.exists():
        return "path", "it exists"
    if path.startswith(("/", "./", "../", "~", ".\\")) or "\\" in path:
        return "path", "it starts like a file-system path"
    if path.count("/") > 1:
        return "path", "it has more than one '/' (a hub id is namespace/name)"
    if path.lower().endswith(_FILE_SUFFIXES):
        return "path", f"it ends in a file suffix ({p.suffix})"
    if not _HUB_ID.match(path) or "--" in path or ".." in path:
        return "path", "it has characters a hub id cannot have"
    if "/" in path and Path(path.split("/", 1)[0]).is_dir():
        return "path", f"its first part {path.split('/', 1)[0]}/ is a folder here"
    return "hub", "it is not an existing path and has the form of a hub id ([namespace/]name)"


def _looks_local(path: str) -> bool:
    """A path-looking value must exist; "org/name" is a hub id, checked when the model loads."""
    return path.startswith(("/", "./", "../", "~")) or path.endswith(".gguf") or path.count("/") > 1


def _validate_space(cfg: Config, need: Any) -> None:
    """search.space, search.optimizer and what a space needs from the rest of the config."""
    s, b, m = cfg.search, cfg.backend, cfg.model
    spaces = tuple(SEARCH_SPACES)
    need(s.space in SEARCH_SPACES, "search.space", f"expected one of {spaces}, got {s.space!r}{_suggest(s.space, list(spaces))}")
    supported = SEARCH_SPACES[s.space]
    known = sorted({o for opts in SEARCH_SPACES.values() for o in opts})
    need(s.optimizer in known, "search.optimizer", f"expected one of {tuple(known)}, got {s.optimizer!r}")
    need(
        s.optimizer in supported,
        "search.optimizer",
        f"search.space={s.space} supports {' or '.join(supported)}, got {s.optimizer!r}",
    )
    need(s.step_size in STEP_SIZES, "search.step_size", f"expected one of {STEP_SIZES}, got {s.step_size!r}")
    if s.optimizer == "cma":
        tpa = s.step_size == "tpa"
        need(
            s.popsize >= (4 if tpa else 3),
            "search.popsize",
            f"expected a population of at least {'4 with search.step_size=tpa (two line samples' if tpa else '3 (pycma' + chr(39) + 's minimum; 4 from d = 300 on'}), got {s.popsize}",
        )
        most = s.popsize // 2 - (1 if tpa else 0)
        need(
            0 <= s.mirrors <= most,
            "search.mirrors",
            f"expected 0 to {most} mirrored candidates for search.popsize {s.popsize}{' with TPA' if tpa else ''} (each mirrors the one before it), got {s.mirrors}",
        )
    else:
        need(s.popsize >= 2, "search.popsize", f"expected a population of at least 2, got {s.popsize}")
        need(
            not s.antithetic or s.popsize % 2 == 0,
            "search.popsize",
            f"search.antithetic pairs candidates (ε, −ε): expected an even population, got {s.popsize}",
        )
        need(
            s.learning_rate > 0 and math.isfinite(s.learning_rate),
            "search.learning_rate",
            f"expected a finite number > 0, got {s.learning_rate}",
        )
        need(0 < s.lr_decay <= 1, "search.lr_decay", f"expected 0 < lr_decay <= 1, got {s.lr_decay}")
        need(0 < s.sigma_decay <= 1, "search.sigma_decay", f"expected 0 < sigma_decay <= 1, got {s.sigma_decay}")
        need(
            s.mirrors == 0,
            "search.mirrors",
            f"is CMA-ES's mirrored sampling; search.optimizer=es pairs its candidates by search.antithetic (leave search.mirrors at 0), got {s.mirrors}",
        )
        defaults = SearchSection()
        for key in ("active", "step_size"):
            default = getattr(defaults, key)
            need(
                getattr(s, key) == default,
                f"search.{key}",
                f"is a CMA-ES option; search.optimizer=es has no covariance or step-size adaptation (leave search.{key} at {default!r}), got {getattr(s, key)!r}",
            )
        default_cmean = defaults.cmean
        need(
            s.cmean == default_cmean,
            "search.cmean",
            f"is CMA-ES's mean learning rate; search.optimizer=es steps by search.learning_rate "
            f"(leave search.cmean at its default {default_cmean}), got {s.cmean}",
        )
    if s.space == "qes":
        _validate_qes(cfg, need)
    if s.space != "svd_lora":
        need(
            not cfg.lora.adapter,
            "lora.adapter",
            f"search.space={s.space} searches the base weights and loads no adapter (it would be ignored); "
            f"merge it into a model folder first (essa-merge {cfg.lora.adapter} OUT) and set model.path=OUT",
        )
    if s.space in SEEDED_SPACES:
        need(s.rank >= 1, "search.rank", f"expected a perturbation rank >= 1, got {s.rank}")
        need(
            len(s.targets) >= 1 and all(isinstance(t, str) and t for t in s.targets),
            "search.targets",
            f"expected module names, got {s.targets}",
        )
        need(
            b.name == "hf",
            "backend.name",
            f"search.space={s.space} moves the base weights in place; it needs backend.name=hf, got {b.name!r}",
        )
        need(
            m.quantization == "none",
            "model.quantization",
            f"search.space={s.space} adds float updates to the weights; it needs model.quantization=none, got {m.quantization!r}",
        )
        need(
            not s.digest_repair,
            "search.digest_repair",
            f"search.space={s.space}: diverged weights cannot be copied from the (seed, reward) records; leave digest_repair off and resume from the checkpoint",
        )


def _validate_qes(cfg: Config, need: Any) -> None:
    """search.space=qes: a model the hf backend quantizes in a layout QES perturbs in place (docs/design.md, QES)."""
    m, s = cfg.model, cfg.search
    need(
        m.quantization in ("int8", "int4"),
        "model.quantization",
        f"search.space=qes searches the integer codes of a quantized model: expected int8 or int4, got {m.quantization!r}",
    )
    need(
        cfg.backend.name == "hf",
        "backend.name",
        f"search.space=qes perturbs the hf backend's torchao codes in place; expected hf, got {cfg.backend.name!r}",
    )
    need(
        not (m.quantization == "int4" and m.device.startswith("cuda") and m.dtype in ("bfloat16", "auto")),
        "model.quantization",
        "int4 on CUDA with bfloat16 is torchao's packed Int4Tensor (two codes per byte), a layout QES does not perturb; "
        "set model.dtype=float32 or float16 (one int4 code per byte) or use int8",
    )
    need(s.antithetic, "search.antithetic", "search.space=qes evaluates antithetic pairs (its masking keeps ±u exact); leave it true")
    need(s.qes_window >= 1, "search.qes_window", f"expected K >= 1 updates between residual resets, got {s.qes_window}")
    need(s.qes_residual in ("replay", "stored"), "search.qes_residual", f"expected replay or stored, got {s.qes_residual!r}")
    need(0 <= s.qes_decay <= 1, "search.qes_decay", f"expected 0 <= γ <= 1, got {s.qes_decay}")
    need(
        not s.digest_repair,
        "search.digest_repair",
        "search.space=qes: diverged codes cannot be copied from the (seed, reward) records; leave digest_repair off",
    )


def _validate_grpo(g: GrpoSection, need: Any) -> None:
    need(
        g.learning_rate > 0 and math.isfinite(g.learning_rate), "grpo.learning_rate", f"expected a finite number > 0, got {g.learning_rate}"
    )
    need(
        g.group_size >= 2,
        "grpo.group_size",
        f"expected >= 2 completions per prompt (advantages compare within a group), got {g.group_size}",
    )
    need(g.prompts_per_step >= 1, "grpo.prompts_per_step", f"expected >= 1, got {g.prompts_per_step}")
    need(g.beta >= 0 and math.isfinite(g.beta), "grpo.beta", f"expected a finite number >= 0, got {g.beta}")
    need(g.max_steps >= 1, "grpo.max_steps", f"expected >= 1, got {g.max_steps}")
    need(g.time_budget_s >= 0, "grpo.time_budget_s", f"expected >= 0 (0 = no limit), got {g.time_budget_s}")
    need(
        g.temperature > 0 and math.isfinite(g.temperature),
        "grpo.temperature",
        f"expected a finite number > 0 (GRPO samples), got {g.temperature}",
    )
    need(g.lr_scheduler in GRPO_SCHEDULERS, "grpo.lr_scheduler", f"expected one of {GRPO_SCHEDULERS}, got {g.lr_scheduler!r}")
    need(g.warmup_steps >= 0, "grpo.warmup_steps", f"expected >= 0, got {g.warmup_steps}")
    need(g.loss_type in GRPO_LOSSES, "grpo.loss_type", f"expected one of {GRPO_LOSSES}, got {g.loss_type!r}")
    need(g.scale_rewards in GRPO_REWARD_SCALING, "grpo.scale_rewards", f"expected one of {GRPO_REWARD_SCALING}, got {g.scale_rewards!r}")
    need(g.max_grad_norm > 0, "grpo.max_grad_norm", f"expected > 0, got {g.max_grad_norm}")


def _is_plugin(name: str) -> bool:
    mod, _, fn = name.partition(":")
    return bool(mod) and bool(fn) and all(p.isidentifier() for p in mod.split(".")) and fn.isidentifier()
