"""The gradient baseline ESSA is measured against: GRPO with a LoRA, on TRL's ``GRPOTrainer``.

    python -m essa_hpc.grpo [--config F] [--set key=value ...]        (also ``essa-grpo``)

It reads the same config file as an ESSA run: model, task (data, reward, system prompt), starting
adapter (``lora.adapter``, or the cached SFT warm start when ``lora.init=sft``, or a fresh LoRA of
``lora.rank`` when ``lora.init=random``), validation (``eval.*``), seeds (``run.seed``), generation length
(``backend.max_new_tokens``), plus its own ``grpo:`` section (learning rate, group size, prompts per step,
β, max steps, training-time budget). Prompts are rendered exactly as the ESSA backends render them
(``models.render_chat``) and rewarded by the same ``Task.reward``, so the two methods optimise the same
objective on the same text.

Validation is the ESSA run's validation, not a second implementation: every ``eval.every`` optimizer
steps (and at the start and the end) the current LoRA is written as a PEFT adapter and scored by
``evaluation.AdapterValidation`` (read back as an SVD-LoRA at x = 0, an exact reconstruction; the hf
backend on a second copy of the base model; the run loop's ``validate`` with its seeds). That costs
one adapter export per validation and a second set of base weights; it buys identical generation
code and seeds for both methods.

Training time, the clock both methods are compared on, excludes validation: ``/eval/train_time`` is the
wall-clock spent in training steps (sampling, reward, backward, update) since the first step. The
ESSA log's equivalent is derived in ``analysis.load.eval_curve`` from its per-generation wall time and
validation phase, by the same rule.

The run directory has the ESSA layout: ``config.yaml``, ``log.h5`` (HDF5: ``/eval/<metric>``,
``/eval/gen`` (here the optimizer step), ``/eval/wall_time``, ``/eval/train_time``, ``/eval/tokens``
(training completion tokens so far), and one row per optimizer step in ``/grpo/*``; root attribute
``method = "grpo"``), ``adapter/`` (PEFT) and ``summary.json``. One process: TRL's own multi-GPU path
is accelerate, not MPI; under mpiexec with more than one rank this entry point refuses to start.
A stop signal (SIGTERM, SIGUSR2) ends training at the next step boundary; the adapter and log of that
step are written and the exit status is 1 (interrupted, and not resumable: GRPO has no checkpoint here).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from essa_hpc import exit_codes
from essa_hpc.config import Config, ConfigError, describe, load_config

STEP_FIELDS = ("step", "wall_time", "train_time", "tokens", "loss", "reward_mean", "reward_std", "kl", "grad_norm", "learning_rate")


class GrpoError(ValueError):
    """A setting or input the GRPO baseline cannot run with; exit status 2, one line."""


# ----------------------------------------------------------------------------------------------------
# the log


class GrpoLog:
    """``log.h5`` of a GRPO run: the ESSA ``/eval`` schema plus ``/eval/train_time``, ``/eval/tokens`` and ``/grpo/*``.

    Datasets are resizable and flushed after every row, so a crash keeps every finished step.
    """

    def __init__(self, path: Path, config_json: str, metrics: Sequence[str]) -> None:
        import h5py

        from essa_hpc import __version__
        from essa_hpc.runlog import git_sha, library_versions

        self.metrics = list(dict.fromkeys(metrics))
        self.f = h5py.File(path, "w", libver="latest")
        self.f.attrs.update(
            {
                "method": "grpo",
                "config": config_json,
                "version": __version__,
                "git_sha": git_sha(),
                "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "library_versions": json.dumps({**library_versions(), **_versions(("trl", "datasets"))}),
                "world_size": 1,
            }
        )
        for group, names in (("eval", ("gen", "wall_time", "train_time", "tokens", *self.metrics)), ("grpo", STEP_FIELDS)):
            g = self.f.create_group(group)
            for name in names:
                dtype = np.int64 if name in ("gen", "step", "tokens") else np.float64
                g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(256,))
        self.f.swmr_mode = True

    def _append(self, group: str, values: dict[str, float]) -> None:
        g = self.f[group]
        for name, ds in g.items():
            n = ds.shape[0]
            ds.resize(n + 1, axis=0)
            ds[n] = values.get(name, np.nan)
        self.f.flush()

    def append_eval(self, step: int, wall_time: float, train_time: float, tokens: int, metrics: dict[str, float]) -> None:
        self._append("eval", {"gen": step, "wall_time": wall_time, "train_time": train_time, "tokens": tokens, **metrics})

    def append_step(self, values: dict[str, float]) -> None:
        self._append("grpo", values)

    def close(self) -> None:
        if self.f.id.valid:
            self.f.close()


def _versions(names: Sequence[str]) -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in names:
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


# ----------------------------------------------------------------------------------------------------
# checks before any model loads


def check(cfg: Config, world_size: int) -> None:
    """What the GRPO baseline needs beyond the shared config checks; GrpoError names the key."""
    if world_size > 1:
        raise GrpoError(f"essa-grpo runs as one process (TRL's multi-GPU path is accelerate); started with {world_size} MPI ranks")
    if cfg.backend.name != "hf":
        raise GrpoError(f"backend.name: the GRPO baseline trains and validates with transformers; expected hf, got {cfg.backend.name!r}")
    if cfg.task.name == "fake":
        raise GrpoError("task.name: fake has no text to train on; use a real task")
    if cfg.model.quantization != "none":
        raise GrpoError(f"model.quantization: GRPO trains a LoRA on a float base model here; expected none, got {cfg.model.quantization!r}")
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except ImportError as e:
        raise GrpoError(f"the GRPO baseline needs TRL: pip install 'essa_hpc[grpo]' ({e})") from None


def prepare_run_dir(cfg: Config) -> Path:
    """Refuse to replace an earlier run silently; the folder must be writable."""
    from essa_hpc.run import unwritable

    run_dir = cfg.run_dir
    if (run_dir / "log.h5").exists() and not cfg.run.overwrite:
        raise GrpoError(f"{run_dir} already holds a run (log.h5); pick another run.name or set run.overwrite=true")
    problem = unwritable(run_dir)
    if problem:
        raise GrpoError(f"run.dir: cannot write the run directory {run_dir}: {problem}")
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(f"# launch: python -m essa_hpc.grpo --config {run_dir / 'config.yaml'}\n" + cfg.to_yaml())
    tmp.replace(run_dir / "config.yaml")
    return run_dir


# ----------------------------------------------------------------------------------------------------
# the run


def starting_policy(cfg: Config, loaded: Any, train: Sequence[Any], system_prompt: str | None, log: Any) -> tuple[Any, str]:
    """The peft model to train and where its weights came from (adapter path, SFT cache, or random)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from essa_hpc import sft

    if cfg.lora.adapter:
        adapter = Path(cfg.lora.adapter)
    elif cfg.lora.init == "sft":
        adapter = sft.cached_sft_adapter(cfg, loaded, train, system_prompt, log=log)
    else:
        lo = cfg.lora
        alpha: Any = int(lo.lora_alpha) if float(lo.lora_alpha).is_integer() else lo.lora_alpha
        peft_cfg = LoraConfig(r=lo.rank, lora_alpha=alpha, target_modules=list(lo.targets), lora_dropout=0.0, task_type="CAUSAL_LM")
        return get_peft_model(loaded.model, peft_cfg), "random"
    from essa_hpc.svd_lora import check_peft_config, load_peft_dir

    config, _ = load_peft_dir(adapter)  # AdapterError (exit 2) on a folder that is not a LoRA adapter
    check_peft_config(config)
    return PeftModel.from_pretrained(loaded.model, str(adapter), is_trainable=True), str(adapter)


def run_grpo(cfg: Config, log: Any = print) -> int:
    """Train, validate and write the run directory; returns the exit status."""
    t_process = time.perf_counter()
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from essa_hpc import dist, models, svd_lora
    from essa_hpc.evaluation import AdapterValidation
    from essa_hpc.tasks import make_task, sft_examples, training_split

    g = cfg.grpo
    # TRL calls transformers' gradient-checkpointing helpers under their old names; their deprecation
    # notices say nothing to a user of this baseline
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*deprecated", category=FutureWarning)
    models.set_threads(cfg.model.threads, 1)
    run_dir = prepare_run_dir(cfg)
    task = make_task(cfg)
    train = list(training_split(task))
    val = list(task.validation())[: cfg.eval.size]
    if not val:
        raise GrpoError(f"task {cfg.task.name}: the validation split is empty")
    if cfg.eval.k > 1 and cfg.eval.temperature <= 0:
        raise GrpoError("eval.temperature: eval.k > 1 needs eval.temperature > 0")
    if cfg.grpo.prompts_per_step > len(train):
        raise GrpoError(f"grpo.prompts_per_step={g.prompts_per_step} but the training split has only {len(train)} examples")
    models.resolve_source(cfg.model)
    loaded = models.load(cfg.model)  # the policy; AdapterValidation loads a second copy (peft wraps these layers)
    system_prompt = task.system_prompt
    policy, source = starting_policy(cfg, loaded, sft_examples(task, cfg), system_prompt, log)
    validator = AdapterValidation(cfg, dist.init(), task, val)
    glog = GrpoLog(run_dir / "log.h5", cfg.to_json(), validator.metric_names)
    tokenizer = loaded.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = [models.render_chat(tokenizer, ex.prompt, system_prompt) for ex in train]
    dataset = Dataset.from_dict({"prompt": prompts, "example_index": list(range(len(train)))})

    counters = {"tokens": 0, "reward_failures": 0}

    def reward(
        prompts: list[str], completions: list[str], example_index: list[int], completion_ids: list[list[int]], **_: Any
    ) -> list[float | None]:
        counters["tokens"] += sum(len(ids) for ids in completion_ids)
        r = task.reward([train[i] for i in example_index], completions)
        counters["reward_failures"] += int(r.failures)
        return [float(v) for v in r.values]

    reward.__name__ = "task_reward"  # TRL logs rewards/<name>/mean

    on_cuda = loaded.device.type == "cuda"
    args = GRPOConfig(
        output_dir=str(run_dir / ".trl"),
        learning_rate=g.learning_rate,
        num_generations=g.group_size,
        per_device_train_batch_size=g.prompts_per_step * g.group_size,
        gradient_accumulation_steps=1,
        max_completion_length=cfg.backend.max_new_tokens,
        temperature=g.temperature,
        top_p=cfg.backend.top_p,
        beta=g.beta,
        loss_type=g.loss_type,
        scale_rewards=g.scale_rewards,
        max_steps=g.max_steps,
        lr_scheduler_type=g.lr_scheduler,
        warmup_steps=g.warmup_steps,
        max_grad_norm=g.max_grad_norm,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=cfg.run.seed,
        data_seed=cfg.run.seed,
        bf16=on_cuda,
        use_cpu=not on_cuda,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )

    stop = {"signal": 0}

    def on_signal(signum: int, frame: Any) -> None:
        stop["signal"] = signum

    for sig in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, on_signal)

    book: dict[str, Any] = {"train_time": 0.0, "t0": None, "last_eval_step": -1, "evals": [], "reason": "max_steps"}

    def validate(step: int) -> dict[str, float]:
        with tempfile.TemporaryDirectory(prefix=".grpo-val-", dir=run_dir) as tmp:
            policy.save_pretrained(tmp)
            was_training = policy.training
            policy.eval()
            with torch.no_grad():
                m = validator(Path(tmp))
            if was_training:
                policy.train()
        glog.append_eval(step, time.perf_counter() - t_process, book["train_time"], counters["tokens"], m)
        book["evals"].append((step, m))
        book["last_eval_step"] = step
        return m

    class Clock(TrainerCallback):
        """Training time (validation excluded), step rows, validation and the stop rules, at step boundaries."""

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            book["t0"] = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if book["t0"] is not None:
                book["train_time"] += time.perf_counter() - book["t0"]
                book["t0"] = None
            step = int(state.global_step)
            if cfg.eval.every and step % cfg.eval.every == 0:
                primary = validator.metric_names[0]
                m = validate(step)
                log(f"grpo step {step:4d} | train {book['train_time']:7.1f} s | val {primary}={m[primary]:.4f}")
            if g.time_budget_s > 0 and book["train_time"] >= g.time_budget_s:
                book["reason"] = "time_budget"
                control.should_training_stop = True
            if stop["signal"]:
                book["reason"] = f"signal {signal.Signals(stop['signal']).name}"
                control.should_training_stop = True

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
            if not logs or "loss" not in logs:
                return
            row = {
                "step": int(state.global_step),
                "wall_time": time.perf_counter() - t_process,
                "train_time": book["train_time"],
                "tokens": counters["tokens"],
                "loss": logs.get("loss", math.nan),
                "reward_mean": logs.get("reward", math.nan),
                "reward_std": logs.get("reward_std", math.nan),
                "kl": logs.get("kl", math.nan),
                "grad_norm": logs.get("grad_norm", math.nan),
                "learning_rate": logs.get("learning_rate", math.nan),
            }
            glog.append_step(row)
            if cfg.log.progress:
                log(
                    f"grpo step {row['step']:4d}/{g.max_steps} | reward mean {row['reward_mean']:+.4f} | loss {row['loss']:+.4f} | "
                    f"train {book['train_time']:7.1f} s"
                )

    trainer = GRPOTrainer(
        model=policy, reward_funcs=[reward], args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[Clock()]
    )
    trainer.remove_callback(PrinterCallback)  # Clock prints one line per step in the run loop's style
    log(
        f"essa-grpo: {run_dir} | start {source} | lr {g.learning_rate:g} | group {g.group_size} × {g.prompts_per_step} prompts | "
        f"β {g.beta:g} | max_steps {g.max_steps} | budget {g.time_budget_s:g} s | validation {len(val)} prompts"
    )
    try:
        m0 = validate(0)
        log("  validation at start: " + ", ".join(f"{k}={v:.4f}" for k, v in m0.items()))
        trainer.train()
        step = int(trainer.state.global_step)
        if book["last_eval_step"] != step and not stop["signal"]:
            validate(step)
        with svd_lora.atomic_dir(run_dir / "adapter") as tmp:
            policy.save_pretrained(str(tmp))
            (tmp / "README.md").unlink(missing_ok=True)
    finally:
        glog.close()
        shutil.rmtree(run_dir / ".trl", ignore_errors=True)  # TRL's output_dir; nothing is saved there
    evals = book["evals"]
    primary = validator.metric_names[0]
    summary = {
        "method": "grpo",
        "evals": evals,
        "steps": step,
        "train_time_s": book["train_time"],
        "completion_tokens": counters["tokens"],
        "reward_failures": counters["reward_failures"],
        "stopped_by": book["reason"],
        "start": source,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"essa-grpo: {book['reason']} after {step} steps, {book['train_time']:.1f} s of training. run directory {run_dir}")
    log(f"  adapter: {run_dir / 'adapter'}")
    log(f"  held-out {primary}: {evals[0][1][primary]:.4f} at start -> {evals[-1][1][primary]:.4f} at step {evals[-1][0]}")
    if counters["reward_failures"]:
        log(f"essa-grpo: warning: {counters['reward_failures']} completion(s) got task.failure_reward because the reward failed")
    return exit_codes.FAILURE if stop["signal"] else exit_codes.OK


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="essa-grpo", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML file with config sections (the ESSA run's, plus grpo:)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. grpo.learning_rate=1e-4")
    p.add_argument("--help-config", action="store_true", help="print every config key with its default and meaning")
    args = p.parse_args(argv)
    if args.help_config:
        print(describe())
        return exit_codes.OK
    from essa_hpc import dist
    from essa_hpc.run import bad_input_errors

    try:
        cfg = load_config(args.config, args.set)
        check(cfg, dist.init().size)
    except (GrpoError, ConfigError) as e:
        print(f"essa-grpo: {e}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    errors: tuple[type[BaseException], ...] = (GrpoError, *bad_input_errors())
    try:
        return run_grpo(cfg)
    except errors as e:
        print(f"essa-grpo: {e}", file=sys.stderr)
        return exit_codes.BAD_INPUT


if __name__ == "__main__":
    raise SystemExit(main())
