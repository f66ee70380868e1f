"""Tasks: data (train / validation Examples) and rewards. ``make_task(cfg)`` is the one entry point.

Built-in tasks (task.name): ``arithmetic`` (the embedded default, generated), ``gsm8k``, ``math``,
``ifeval``, ``reward_model``, ``fake`` (paired with backend.name=fake; chosen automatically when the
fake backend runs with the default task), or ``package.module:function`` for a reward plugin over
task.path's data. task.plugins add weighted plugin rewards on top of any of them. Plugins are
imported first, so a broken plugin fails before any data or model loads.
"""

from __future__ import annotations

from collections.abc import Sequence

from essa_hpc.config import Config
from essa_hpc.tasks.base import Example, Rewards, Task, TaskError
from essa_hpc.tasks.data import check_prompt_lengths, minibatch, read_records, shared_data_dir, task_sft_split, to_examples

__all__ = [
    "Example",
    "Rewards",
    "Task",
    "TaskError",
    "check_prompt_lengths",
    "make_task",
    "minibatch",
    "read_records",
    "sft_examples",
    "shared_data_dir",
    "training_split",
]


def sft_examples(task: Task, cfg: Config) -> list[Example]:
    """What the SFT warm start trains on, the first cfg.sft.examples of, in order: sft.path (prompt and
    response fields; for tasks whose data has no reference responses, such as IFEval), the task's
    reserved SFT split (task.sft_size, disjoint from ESSA's), else ESSA's training split.
    docs/design.md, "The paper's settings"."""
    if cfg.sft.path:
        pf = cfg.task.prompt_field or "prompt"
        recs = read_records(cfg.sft.path, key="sft.path")
        examples = to_examples(recs, str(cfg.sft.path), pf, "answer", answer_required=False, response_field="response")
        if not examples or any(e.response is None for e in examples):
            raise TaskError(f"sft.path={cfg.sft.path}: every record needs a {pf!r} and a 'response' field")
        return examples[: cfg.sft.examples]
    reserved = task_sft_split(task)
    return (reserved or list(training_split(task)))[: cfg.sft.examples]


def training_split(task: Task) -> Sequence[Example]:
    """The split a run (ESSA, SFT, GRPO) trains on; a task whose split is only a benchmark refuses here
    (IFEval without task.path: the 541 benchmark prompts validate, they never train)."""
    refusal = getattr(task, "training_refusal", None)
    if refusal:
        raise TaskError(str(refusal))
    return task.train()


def make_task(cfg: Config) -> Task:
    """The task the config asks for, with its data loaded and checked. Raises TaskError."""
    from essa_hpc.tasks.plugin import Plugin, PluginTask, WithPlugins, load_plugin, load_plugins

    t = cfg.task
    extra = load_plugins(t.plugins, t.plugin_weights)
    main_plugin = Plugin(t.name, load_plugin(t.name, "task.name")) if ":" in t.name else None
    task: Task
    if t.name == "fake" or (cfg.backend.name == "fake" and t.name == "arithmetic"):
        from essa_hpc.tasks.fake import FakeTask

        task = FakeTask(cfg)
    elif main_plugin is not None:
        task = PluginTask(cfg, main_plugin)
    elif t.name == "arithmetic":
        from essa_hpc.tasks.arithmetic import ArithmeticTask

        task = ArithmeticTask(cfg)
    elif t.name == "gsm8k":
        from essa_hpc.tasks.gsm8k import GSM8KTask

        task = GSM8KTask(cfg)
    elif t.name == "math":
        from essa_hpc.tasks.mathtask import MathTask

        task = MathTask(cfg)
    elif t.name == "ifeval":
        from essa_hpc.tasks.ifeval import IFEvalTask

        task = IFEvalTask(cfg)
    elif t.name == "reward_model":
        from essa_hpc.tasks.reward_model import RewardModelTask

        task = RewardModelTask(cfg)
    else:
        raise TaskError(f"task.name: unknown task {t.name!r}")
    if extra:
        task = WithPlugins(task, extra, t.reward_timeout_s, t.failure_reward)
    return task
