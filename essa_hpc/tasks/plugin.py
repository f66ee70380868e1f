"""User reward functions ("plugins"), called safely, and the two tasks built on them.

``PluginTask`` is task.name = ``package.module:function``: data from task.path with prompts in
``prompt`` (or task.prompt_field) and, when present, a reference in ``answer`` (or task.answer_field,
then required in every row); system prompt task.system_prompt (none by default). ``WithPlugins`` adds
task.plugins, weighted, on top of any other task.

A plugin is named ``package.module:function`` and has the TRL-style signature::

    def my_reward(prompts: list[str], completions: list[str], **columns) -> list[float | None]: ...

``prompts`` are the user messages (no chat template), ``columns`` holds one list per data column (the
reference ``answer`` when the data has one, and every extra column of the examples), aligned with the
completions. Accept ``**kwargs`` so new columns never break a plugin.

A plugin never crashes a run and never fails silently: an exception, a wrong result length, a result
of None / NaN / ±inf / a non-number, or a batch that runs past ``task.reward_timeout_s`` is scored with
``task.failure_reward`` and counted per completion in ``Rewards.failures`` / ``Rewards.timeouts``, with
a short message in ``Rewards.errors``. A timed-out call runs on in its (daemon) worker thread, which
cannot be killed; the next batch starts a fresh thread. Import problems are a TaskError at
``make_task`` time, before any model is loaded.
"""

from __future__ import annotations

import importlib
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from essa_hpc.config import Config
from essa_hpc.tasks.base import MAX_ERRORS, Example, Rewards, Task, TaskError
from essa_hpc.tasks.common import check_lengths, file_splits
from essa_hpc.tasks.data import to_examples

RewardFn = Callable[..., Sequence[Any]]
RESERVED = ("prompts", "completions")


def load_plugin(spec: str, key: str = "task.name") -> RewardFn:
    """Import ``package.module:function``; a TaskError names the plugin and what went wrong."""
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        raise TaskError(f"{key}: plugin {spec!r}: expected package.module:function")
    try:
        module = importlib.import_module(mod_name)
    except Exception as e:  # ImportError, but also any error raised while the module runs
        raise TaskError(f"{key}: cannot import module {mod_name!r} of reward plugin {spec!r}: {type(e).__name__}: {e}") from None
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise TaskError(
            f"{key}: reward plugin {spec!r}: module {mod_name!r} ({getattr(module, '__file__', '?')}) has no attribute {fn_name!r}"
        )
    if not callable(fn):
        raise TaskError(f"{key}: reward plugin {spec!r}: {fn_name!r} is a {type(fn).__name__}, not a function")
    return fn


def columns_of(examples: Sequence[Example]) -> dict[str, list[Any]]:
    """One list per column, aligned with the examples: ``answer`` (when any example has one) and the
    union of Example.columns keys (None where an example lacks one)."""
    cols: dict[str, list[Any]] = {}
    if any(e.answer is not None for e in examples):
        cols["answer"] = [e.answer for e in examples]
    keys: list[str] = []
    for e in examples:
        keys += [k for k in e.columns if k not in keys]
    for k in keys:
        if k in RESERVED or k == "answer" or not k.isidentifier():
            continue
        cols[k] = [e.columns.get(k) for e in examples]
    return cols


def _value(x: Any) -> float | None:
    if x is None or isinstance(x, (str, bytes)):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def call_reward_fn(
    fn: RewardFn,
    name: str,
    prompts: Sequence[str],
    completions: Sequence[str],
    columns: dict[str, list[Any]],
    timeout_s: float,
    failure_reward: float,
) -> Rewards:
    """Run one reward function on a batch in a worker thread with a timeout; never raises."""
    n = len(completions)
    out: dict[str, Any] = {}

    def work() -> None:
        try:
            out["result"] = fn(list(prompts), list(completions), **columns)
        except BaseException as e:
            out["error"] = e

    worker = threading.Thread(target=work, name=f"reward:{name}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    fail = np.full(n, float(failure_reward))
    if worker.is_alive():
        return Rewards(values=fail, timeouts=n, errors=[f"{name}: timed out after {timeout_s:g} s on a batch of {n}"])
    if "error" in out:
        e = out["error"]
        return Rewards(values=fail, failures=n, errors=[f"{name}: raised {type(e).__name__}: {str(e)[:200]}"])
    result: Any = out.get("result")
    try:
        items = list(result)
    except TypeError:
        return Rewards(values=fail, failures=n, errors=[f"{name}: returned {type(result).__name__}, expected a list of {n} floats"])
    if len(items) != n:
        return Rewards(values=fail, failures=n, errors=[f"{name}: returned {len(items)} rewards for {n} completions"])
    values = np.empty(n)
    failures = 0
    errors: list[str] = []
    for i, item in enumerate(items):
        v = _value(item)
        if v is None:
            failures += 1
            values[i] = failure_reward
            if len(errors) < MAX_ERRORS:
                errors.append(f"{name}: reward {i} is {item!r}")
        else:
            values[i] = v
    return Rewards(values=values, failures=failures, errors=errors)


@dataclass
class Plugin:
    name: str
    fn: RewardFn
    weight: float = 1.0


def load_plugins(specs: Sequence[str], weights: Sequence[float], key: str = "task.plugins") -> list[Plugin]:
    if weights and len(weights) != len(specs):
        raise TaskError(f"task.plugin_weights: expected {len(specs)} weights (one per plugin), got {len(weights)}")
    ws = list(weights) if weights else [1.0] * len(specs)
    return [Plugin(spec, load_plugin(spec, key), float(w)) for spec, w in zip(specs, ws)]


def score_plugins(
    plugins: Sequence[Plugin], examples: Sequence[Example], completions: Sequence[str], timeout_s: float, failure_reward: float
) -> Rewards:
    """Σ weight · plugin(prompts, completions, **columns), each plugin guarded; components per plugin."""
    n = len(completions)
    total = Rewards(values=np.zeros(n))
    prompts = [e.prompt for e in examples]
    cols = columns_of(examples)
    for p in plugins:
        r = call_reward_fn(p.fn, p.name, prompts, completions, cols, timeout_s, failure_reward)
        total.values = total.values + p.weight * r.values
        total.failures += r.failures
        total.timeouts += r.timeouts
        total.components[f"plugin:{p.name}"] = r.values
        total.errors += r.errors[: max(0, MAX_ERRORS - len(total.errors))]
    return total


class PluginTask:
    correct_threshold = 1.0

    def __init__(self, cfg: Config, plugin: Plugin) -> None:
        t = cfg.task
        self.name = plugin.name
        self.plugin = plugin
        self.timeout_s, self.failure_reward = t.reward_timeout_s, t.failure_reward
        pf, af = t.prompt_field or "prompt", t.answer_field
        self._train, self._validation, self._sft = file_splits(
            cfg, lambda recs, src: to_examples(recs, src, pf, af or "answer", answer_required=af is not None, response_field="response")
        )
        self.system_prompt = t.system_prompt

    def train(self) -> Sequence[Example]:
        return self._train

    def sft_examples(self) -> Sequence[Example]:
        return self._sft

    def validation(self) -> Sequence[Example]:
        return self._validation

    def reward(self, examples: Sequence[Example], completions: Sequence[str]) -> Rewards:
        check_lengths(examples, completions, self.name)
        return score_plugins([self.plugin], examples, completions, self.timeout_s, self.failure_reward)


class WithPlugins:
    """A built-in task with reward plugins added on top: reward = base + Σ weight · plugin."""

    def __init__(self, base: Task, plugins: Sequence[Plugin], timeout_s: float, failure_reward: float) -> None:
        self.base = base
        self.plugins = list(plugins)
        self.timeout_s = timeout_s
        self.failure_reward = failure_reward
        self.name = base.name
        self.system_prompt = base.system_prompt
        self.correct_threshold = float(getattr(base, "correct_threshold", 1.0))

    def train(self) -> Sequence[Example]:
        return self.base.train()

    def sft_examples(self) -> Sequence[Example]:
        from essa_hpc.tasks.data import task_sft_split

        return task_sft_split(self.base)

    def validation(self) -> Sequence[Example]:
        return self.base.validation()

    def reward(self, examples: Sequence[Example], completions: Sequence[str]) -> Rewards:
        check_lengths(examples, completions, self.name)
        r = self.base.reward(examples, completions)
        extra = score_plugins(self.plugins, examples, completions, self.timeout_s, self.failure_reward)
        comps = {**r.components, "base": r.values, **extra.components}
        return Rewards(
            values=r.values + extra.values,
            failures=r.failures + extra.failures,
            timeouts=r.timeouts + extra.timeouts,
            components=comps,
            errors=(r.errors + extra.errors)[:MAX_ERRORS],
        )
