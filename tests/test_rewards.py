"""Reward functions: answer extraction, math-verify equivalences, plugins (failures, timeouts), reward models."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from essa_hpc.config import Config
from essa_hpc.tasks import TaskError, make_task
from essa_hpc.tasks.answers import last_boxed, last_number, math_equal, numeric_match, parse_number
from essa_hpc.tasks.plugin import call_reward_fn, columns_of, load_plugin

# ------------------------------------------------------------------------------------------ answers


def test_last_boxed() -> None:
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("\\boxed{unclosed") is None
    assert last_boxed("no box") is None
    assert last_boxed("\\boxed {x^{2}}") == "x^{2}"


def test_numbers() -> None:
    assert last_number("It costs 1,000 dollars, then 3.5 and -2.") == "-2"
    assert last_number("nothing") is None
    assert parse_number("1,234") == 1234 and parse_number("\\$18.00") == 18 and parse_number("85.") == 85
    assert parse_number("50\\%") == 50 and parse_number("\\text{12}") == 12 and parse_number("x") is None
    assert numeric_match("72", "so \\boxed{72}") == (True, True)
    assert numeric_match("72", "72 clips") == (True, False)
    assert numeric_match("72", "\\boxed{}") == (False, False)


@pytest.mark.parametrize(
    ("gold", "pred"),
    [
        ("\\frac{1}{2}", "\\boxed{0.5}"),
        ("0.5", "The answer is $\\frac{1}{2}$"),
        ("2x+1", "\\boxed{1+2x}"),
        ("x^2+2x+1", "\\boxed{(x+1)^2}"),
        ("\\text{(C)}", "\\boxed{C}"),
        ("(3, -1)", "\\boxed{(3,-1)}"),
        ("\\{1,2\\}", "\\boxed{\\{2,1\\}}"),
        ("\\dfrac{14}{3}", "\\boxed{\\frac{14}{3}}"),
        ("\\sqrt{2}", "\\boxed{\\sqrt 2}"),
    ],
)
def test_math_verify_equivalences(gold: str, pred: str) -> None:
    assert math_equal(gold, pred)


@pytest.mark.parametrize(
    ("gold", "pred"), [("\\frac{1}{2}", "\\boxed{0.6}"), ("2x+1", "\\boxed{2x-1}"), ("(3, -1)", "\\boxed{(-1,3)}"), ("5", "no answer")]
)
def test_math_verify_rejects(gold: str, pred: str) -> None:
    assert not math_equal(gold, pred)


def test_math_verify_off_the_main_thread() -> None:
    import threading

    out: list[bool] = []
    th = threading.Thread(target=lambda: out.append(math_equal("\\frac{1}{2}", "\\boxed{0.5}")))
    th.start()
    th.join(30)
    assert out == [True]


# ------------------------------------------------------------------------------------------ plugins

PLUGIN_SRC = """
import math, time

def length_reward(prompts, completions, **columns):
    return [float(len(c)) for c in completions]

def answer_match(prompts, completions, answer=None, **columns):
    return [1.0 if a is not None and str(a) in c else 0.0 for a, c in zip(answer, completions)]

def uses_columns(prompts, completions, topic, **kw):
    return [1.0 if t == "math" else 0.0 for t in topic]

def boom(prompts, completions, **kw):
    raise RuntimeError("plugin exploded")

def holes(prompts, completions, **kw):
    return [1.0, None, float("nan"), "x", float("inf"), 2][: len(completions)]

def short(prompts, completions, **kw):
    return [1.0]

def sleepy(prompts, completions, **kw):
    time.sleep(5)
    return [1.0] * len(completions)

not_callable = 3
"""


@pytest.fixture
def plugin_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"essa_test_plugins_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(PLUGIN_SRC))
    (tmp_path / "essa_broken_plugin.py").write_text("import not_a_module_anywhere_123\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def _call(fn, n: int = 6, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    return call_reward_fn(fn, "p", ["q"] * n, ["c"] * n, {}, timeout, -1.0)


def test_plugin_failures_are_counted_not_raised(plugin_module: str) -> None:
    r = _call(load_plugin(f"{plugin_module}:boom"))
    assert r.values.tolist() == [-1.0] * 6 and r.failures == 6 and r.timeouts == 0 and "plugin exploded" in r.errors[0]
    r = _call(load_plugin(f"{plugin_module}:holes"))
    assert r.values.tolist() == [1.0, -1.0, -1.0, -1.0, -1.0, 2.0] and r.failures == 4
    r = _call(load_plugin(f"{plugin_module}:short"))
    assert r.failures == 6 and "1 rewards for 6 completions" in r.errors[0]


def test_plugin_timeout(plugin_module: str) -> None:
    t0 = time.monotonic()
    r = _call(load_plugin(f"{plugin_module}:sleepy"), n=3, timeout=0.2)
    assert time.monotonic() - t0 < 2.0
    assert r.values.tolist() == [-1.0] * 3 and r.timeouts == 3 and r.failures == 0 and "timed out" in r.errors[0]


def test_plugin_import_errors(plugin_module: str) -> None:
    with pytest.raises(TaskError, match=r"task.name: cannot import module 'no_such_pkg_xyz' of reward plugin 'no_such_pkg_xyz:f'"):
        load_plugin("no_such_pkg_xyz:f")
    with pytest.raises(TaskError, match=r"cannot import module 'essa_broken_plugin'.*ModuleNotFoundError"):
        load_plugin("essa_broken_plugin:f")
    with pytest.raises(TaskError, match="has no attribute 'missing'"):
        load_plugin(f"{plugin_module}:missing")
    with pytest.raises(TaskError, match="not a function"):
        load_plugin(f"{plugin_module}:not_callable")
    # at make_task time, before data is read (the task.path here does not exist)
    c = Config().replace(**{"task.name": "gsm8k", "task.path": "/nonexistent.jsonl", "task.plugins": ["no_such_pkg_xyz:f"]})
    with pytest.raises(TaskError, match=r"task\.plugins: cannot import"):
        make_task(c)


def test_plugin_task_and_columns(plugin_module: str, tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}", "answer": str(i), "topic": "math" if i % 2 else "art"} for i in range(20)]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    task = make_task(Config().replace(**{"task.name": f"{plugin_module}:answer_match", "task.path": str(data)}))
    assert task.name == f"{plugin_module}:answer_match" and task.system_prompt is None
    exs = list(task.train()[:3])
    r = task.reward(exs, [f"it is {exs[0].answer}", "wrong", f"{exs[2].answer}!"])
    assert r.values.tolist() == [1.0, 0.0, 1.0]
    cols = columns_of(exs)
    assert set(cols) == {"answer", "topic"} and cols["answer"] == [e.answer for e in exs]
    t2 = make_task(Config().replace(**{"task.name": f"{plugin_module}:uses_columns", "task.path": str(data)}))
    ex = list(t2.train()[:4])
    assert t2.reward(ex, ["x"] * 4).values.tolist() == [1.0 if e.columns["topic"] == "math" else 0.0 for e in ex]


def test_plugins_on_top_of_a_builtin(plugin_module: str) -> None:
    c = Config().replace(
        **{
            "task.plugins": [f"{plugin_module}:length_reward", f"{plugin_module}:boom"],
            "task.plugin_weights": [0.5, 2.0],
            "task.failure_reward": -1.0,
        }
    )
    task = make_task(c)
    ex = task.train()[0]
    good = ex.response or ""
    r = task.reward([ex, ex], [good, "xy"])
    assert r.values.tolist() == pytest.approx([1.0 + 0.5 * len(good) - 2.0, 0.0 + 0.5 * 2 - 2.0])
    assert r.failures == 2 and r.components["base"].tolist() == [1.0, 0.0]
    assert r.components[f"plugin:{plugin_module}:length_reward"].tolist() == [len(good), 2.0]


# ------------------------------------------------------------------------------------- reward model


def _tiny_reward_model(path: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2}
    for i, ch in enumerate("abcdefghijklmnopqrstuvwxyz0123456789.,!?"):
        vocab[ch] = 3 + i
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        num_labels=1,
        pad_token_id=0,
        eos_token_id=2,
    )
    LlamaForSequenceClassification(cfg).save_pretrained(path)


def test_reward_model_task(tmp_path: Path) -> None:
    rm = tmp_path / "rm"
    _tiny_reward_model(rm)
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"question {i}?"}) for i in range(10)))
    c = Config().replace(
        **{
            "task.name": "reward_model",
            "task.reward_model": str(rm),
            "task.path": str(data),
            "model.device": "cpu",
            "task.reward_batch_size": 3,
        }
    )
    task = make_task(c)
    exs = list(task.train()[:4])
    comps = ["a short answer.", "a much longer answer with more words in it!", "x", "another one, ok?"]
    r = task.reward(exs, comps)
    assert r.values.shape == (4,) and np.all(np.isfinite(r.values)) and r.failures == 0
    assert len(set(np.round(r.values, 6))) > 1
    # batching and padding do not change a score
    one_by_one = [task.reward([e], [t]).values[0] for e, t in zip(exs, comps)]
    assert np.allclose(one_by_one, r.values, atol=1e-4)
    z = make_task(c.replace(**{"task.reward_normalization": "zscore"})).reward(exs, comps).values
    assert abs(z.mean()) < 1e-6 and abs(z.std() - 1.0) < 1e-4
    bad = Config().replace(**{"task.name": "reward_model", "task.reward_model": str(tmp_path), "task.path": str(data)})
    with pytest.raises(TaskError, match="not a model folder"):
        make_task(bad)
