"""Task data: formats, field mapping, splits, minibatches, errors; built-in tasks and make_task."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from essa_hpc.config import Config
from essa_hpc.models import ByteTokenizer
from essa_hpc.tasks import TaskError, check_prompt_lengths, make_task, minibatch, read_records
from essa_hpc.tasks.arithmetic import generate
from essa_hpc.tasks.base import Example
from essa_hpc.tasks.data import held_out, to_examples


def shared_data() -> Path:
    env = os.environ.get("ESSA_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


GSM8K = shared_data() / "gsm8k"
needs_gsm8k = pytest.mark.skipif(not (GSM8K / "test.jsonl").is_file(), reason=f"GSM8K data not found at {GSM8K} (set ESSA_SHARED_DATA)")

ROWS = [{"prompt": f"question {i}", "answer": str(i), "topic": "t" + str(i % 3)} for i in range(20)]


def cfg(**kw: object) -> Config:
    return Config().replace(**kw)


def write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return path


# ------------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_formats_read_the_same_records(tmp_path: Path, suffix: str) -> None:
    recs = read_records(write(tmp_path / f"d{suffix}", ROWS))
    assert [r.data for r in recs] == ROWS
    assert [r.number for r in recs] == list(range(1, 21))


def test_json_variants(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"data": ROWS[:2]}))
    assert len(read_records(tmp_path / "a.json")) == 2
    (tmp_path / "b.json").write_text("\n".join(json.dumps(r) for r in ROWS[:3]))  # JSON Lines named .json
    assert len(read_records(tmp_path / "b.json")) == 3


def test_parquet_or_clear_error(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    p = tmp_path / "d.parquet"
    try:
        pd.DataFrame(ROWS).to_parquet(p)
    except ImportError:
        p.write_bytes(b"PAR1")
        with pytest.raises(TaskError, match="pyarrow"):
            read_records(p)
        return
    assert [r.data for r in read_records(p)] == ROWS


def test_hf_save_to_disk(tmp_path: Path) -> None:
    try:
        import datasets
    except ImportError:
        (tmp_path / "ds").mkdir()
        (tmp_path / "ds" / "dataset_dict.json").write_text('{"splits": ["train"]}')
        with pytest.raises(TaskError, match="needs the datasets package"):
            read_records(tmp_path / "ds")
        return
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:15]), "test": datasets.Dataset.from_list(ROWS[15:])})
    dd.save_to_disk(str(tmp_path / "ds"))
    assert len(read_records(tmp_path / "ds")) == 15


def test_folder_with_split_files(tmp_path: Path) -> None:
    write(tmp_path / "train.jsonl", [{"question": "q1", "answer": "x\n#### 1"}, {"question": "q2", "answer": "#### 2"}])
    write(tmp_path / "test.jsonl", [{"question": "q3", "answer": "#### 3"}])
    task = make_task(cfg(**{"task.name": "gsm8k", "task.path": str(tmp_path)}))
    assert [e.answer for e in task.train()] == ["1", "2"]
    assert [e.answer for e in task.validation()] == ["3"]


def test_field_mapping_and_columns(tmp_path: Path) -> None:
    recs = read_records(write(tmp_path / "d.jsonl", ROWS))
    exs = to_examples(recs, "d.jsonl", "prompt", "answer")
    assert exs[3].prompt == "question 3" and exs[3].answer == "3" and exs[3].columns == {"topic": "t0"}
    assert exs[3].id == "d:4"
    nested = read_records(write(tmp_path / "n.jsonl", [{"q": {"text": "hi"}, "a": 1}]))
    assert to_examples(nested, "n.jsonl", "q.text", "a")[0].prompt == "hi"


# ------------------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match=r"task.path: no such file or folder: .*nope.jsonl"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(TaskError, match="no such file"):
        make_task(cfg(**{"task.name": "gsm8k", "task.path": str(tmp_path / "nope.jsonl")}))


def test_missing_field_names_file_and_row(tmp_path: Path) -> None:
    rows = [{"question": "a", "answer": "#### 1"}, {"question": "b", "answer": "#### 2"}, {"question": "c"}]
    p = write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(TaskError, match=r"bad.jsonl: record 3 has no field 'answer'"):
        make_task(cfg(**{"task.name": "gsm8k", "task.path": str(p)}))
    with pytest.raises(TaskError, match=r"record 1 has no field 'text'"):
        make_task(cfg(**{"task.name": "gsm8k", "task.path": str(p), "task.prompt_field": "text"}))


def test_bad_json_line_and_bad_answer(tmp_path: Path) -> None:
    p = tmp_path / "broken.jsonl"
    p.write_text('{"question": "a", "answer": "#### 1"}\n{"question": \n')
    with pytest.raises(TaskError, match=r"broken.jsonl: line 2 is not valid JSON"):
        read_records(p)
    q = write(tmp_path / "noans.jsonl", [{"question": "a", "answer": "no marker here"}])
    with pytest.raises(TaskError, match=r"record 1: field 'answer' has no '#### <answer>' line"):
        make_task(cfg(**{"task.name": "gsm8k", "task.path": str(q)}))


def test_empty_split(tmp_path: Path) -> None:
    p = tmp_path / "empty.jsonl"
    p.write_text("\n")
    with pytest.raises(TaskError, match="empty"):
        make_task(cfg(**{"task.name": "gsm8k", "task.path": str(p)}))
    one = write(tmp_path / "one.jsonl", [{"question": "a", "answer": "#### 1"}])
    with pytest.raises(TaskError, match="cannot hold out"):
        make_task(cfg(**{"task.name": "gsm8k", "task.path": str(one)}))


def test_unknown_format(tmp_path: Path) -> None:
    p = tmp_path / "d.txt"
    p.write_text("hello")
    with pytest.raises(TaskError, match=r"unknown format '\.txt'"):
        read_records(p)


# ----------------------------------------------------------------------------------- splits, batches


def test_held_out_is_fixed_disjoint_and_bounded() -> None:
    exs = [Example(id=str(i), prompt=str(i)) for i in range(100)]
    tr, va = held_out(exs, 128)
    assert len(va) == 20 and len(tr) == 80 and not {e.id for e in tr} & {e.id for e in va}
    assert [e.id for e in held_out(exs, 128)[1]] == [e.id for e in va]
    assert len(held_out(exs, 5)[1]) == 5


def test_minibatch_deterministic_without_replacement() -> None:
    exs = [Example(id=str(i), prompt=str(i)) for i in range(50)]
    a = minibatch(exs, seed=7, gen=3, size=20)
    assert [e.id for e in a] == [e.id for e in minibatch(list(exs), seed=7, gen=3, size=20)]
    assert len({e.id for e in a}) == 20
    assert [e.id for e in a] != [e.id for e in minibatch(exs, seed=7, gen=4, size=20)]
    assert [e.id for e in a] != [e.id for e in minibatch(exs, seed=8, gen=3, size=20)]
    assert sorted(e.id for e in minibatch(exs, 1, 0, 500)) == sorted(e.id for e in exs)
    idx = np.random.default_rng([7, 3, 0xB47C4]).choice(50, size=20, replace=False)
    assert [e.id for e in a] == [str(i) for i in idx]
    with pytest.raises(TaskError):
        minibatch([], 1, 0, 4)


def test_check_prompt_lengths() -> None:
    tok = ByteTokenizer()
    exs = [Example(id="short", prompt="hi"), Example(id="long-one", prompt="x" * 200)]
    assert check_prompt_lengths(exs[:1], tok, "sys", max_context=128, max_new_tokens=16) > 0
    with pytest.raises(TaskError, match=r"prompt 'long-one' is \d+ tokens .*max_new_tokens=16 .* context of 128"):
        check_prompt_lengths(exs, tok, "sys", max_context=128, max_new_tokens=16)


# --------------------------------------------------------------------------------------- arithmetic


def test_arithmetic_task() -> None:
    task = make_task(Config())
    train, val = task.train(), task.validation()
    assert task.name == "arithmetic" and len(train) == 2000 and len(val) == 128
    assert not {e.id for e in train} & {e.id for e in val}
    assert len({e.id for e in train}) == 2000
    assert task.system_prompt == "Please reason step by step and place your final answer in \\boxed{}."
    ex = train[0]
    a, op, b = ex.prompt.removeprefix("What is ").removesuffix("?").split()
    want = int(a) + int(b) if op == "+" else int(a) - int(b)
    assert ex.answer == want and ex.response == f"{a} {op} {b} = {want}. The answer is \\boxed{{{want}}}."
    r = task.reward(
        [ex] * 5, [ex.response, f"\\boxed{{{want + 1}}}", f"the answer is {want}", f"\\boxed{{{want}", f"\\boxed{{ {want} }} and"]
    )
    assert r.values.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
    credit = make_task(cfg(**{"task.format_credit": 0.1}))
    assert credit.reward([ex] * 2, [f"\\boxed{{{want + 1}}}", "no box"]).values.tolist() == [0.1, 0.0]
    assert [e.id for e in make_task(Config()).train()] == [e.id for e in train]
    assert [e.id for e in make_task(cfg(**{"run.seed": 5})).train()] != [e.id for e in train]


def test_arithmetic_small_space_and_big_digits() -> None:
    tr, va = generate(0, 1, ["+"], 2000, 128)
    assert len(tr) + len(va) == 100 and len(va) == 20 and not set(tr) & set(va)
    tr, va = generate(0, 12, ["*"], 10, 5)
    assert len(tr) == 10 and all(10**11 <= a < 10**12 for a, _, _ in tr)
    t = make_task(cfg(**{"task.operations": ["*"], "task.digits": 3}))
    ex = t.train()[0]
    assert "*" in ex.prompt and t.reward([ex], [ex.response or ""]).values[0] == 1.0


# ----------------------------------------------------------------------------------- gsm8k and math


@needs_gsm8k
def test_gsm8k_reference_solutions_score_100_percent() -> None:
    c = cfg(**{"task.name": "gsm8k", "eval.size": 5000})
    task = make_task(c)
    val = task.validation()
    assert len(val) == 1319 and len(task.train()) == 7473
    r = task.reward(val, [e.response or "" for e in val])
    assert r.values.mean() == 1.0 and r.failures == 0
    raw = task.reward(val, [e.columns["solution"] for e in val])  # '#### N' text: last-number fallback
    assert raw.values.mean() == 1.0
    assert all(e.response and e.response.endswith(f"\\boxed{{{e.answer}}}.") and "<<" not in e.response for e in val)


@needs_gsm8k
def test_gsm8k_reward_rules() -> None:
    task = make_task(cfg(**{"task.name": "gsm8k", "task.format_credit": 0.1}))
    ex = Example(id="x", prompt="q", answer="1000")
    texts = [
        "so \\boxed{1,000}",
        "\\boxed{\\$1000.00}",
        "she has 1,000 apples",
        "\\boxed{999} but 1000",
        "\\boxed{\\frac{2000}{2}}",
        "nothing",
        "1000 then 7",
    ]
    assert task.reward([ex] * len(texts), texts).values.tolist() == [1.0, 1.0, 1.0, 0.1, 1.0, 0.0, 0.0]
    assert len(task.validation()) == 128


def test_math_task(tmp_path: Path) -> None:
    rows = [
        {"problem": "Half of one?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "unique_id": "p1"},
        {"problem": "Expand.", "solution": "...", "answer": "2x+1"},
        {"problem": "Pick.", "solution": "The answer is \\boxed{\\text{(C)}}."},
    ] * 4
    p = write(tmp_path / "math.jsonl", rows)
    task = make_task(cfg(**{"task.name": "math", "task.path": str(p), "task.format_credit": 0.1}))
    allx = list(task.train()) + list(task.validation())
    assert len(allx) == 12
    half = next(e for e in allx if e.id == "p1")
    assert half.answer == "\\frac{1}{2}" and half.response == rows[0]["solution"]
    lin = next(e for e in allx if e.answer == "2x+1")
    pick = next(e for e in allx if e.answer == "\\text{(C)}")
    r = task.reward([half, half, lin, lin, pick], ["\\boxed{0.5}", "\\boxed{0.4}", "so \\boxed{1+2x}", "x", "\\boxed{C}"])
    assert r.values.tolist() == [1.0, 0.1, 1.0, 0.0, 1.0]
    bad = write(tmp_path / "bad.jsonl", [{"problem": "a", "solution": "no box"}])
    with pytest.raises(TaskError, match=r"record 1 has no 'answer' field and no \\boxed"):
        make_task(cfg(**{"task.name": "math", "task.path": str(bad)}))
    with pytest.raises(TaskError, match=r"task\.path: task math needs data"):
        make_task(cfg(**{"task.name": "math"}))


# --------------------------------------------------------------------------------------------- fake


def test_fake_task() -> None:
    for c in (cfg(**{"backend.name": "fake"}), cfg(**{"backend.name": "fake", "task.name": "fake"})):
        task = make_task(c)
        assert task.name == "fake" and task.train()[0].prompt == "" and len(task.validation()) == 128
    r = task.reward(list(task.train()[:4]), [repr(-1.5), "0.0", "nan", "oops"])
    assert r.values.tolist() == [-1.5, 0.0, 0.0, 0.0] and r.failures == 2 and len(r.errors) == 2


def test_eval_split_train_and_bad_split(tmp_path: Path) -> None:
    p = write(tmp_path / "d.jsonl", [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(30)])
    t = make_task(cfg(**{"task.name": "gsm8k", "task.path": str(p), "eval.split": "train", "eval.size": 4}))
    assert [e.id for e in t.validation()] == [e.id for e in t.train()[:4]]
    with pytest.raises(TaskError, match=r"eval\.split"):
        make_task(cfg(**{"task.name": "gsm8k", "task.path": str(p), "eval.split": "bogus"}))
    v = write(tmp_path / "v.jsonl", [{"question": "vq", "answer": "#### 5"}])
    t = make_task(cfg(**{"task.name": "gsm8k", "task.path": str(p), "task.val_path": str(v)}))
    assert len(t.train()) == 30 and [e.prompt for e in t.validation()] == ["vq"]


def test_ids_unique_across_and_within_splits(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    p = write(tmp_path / "a" / "d.jsonl", [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(5)])
    v = write(tmp_path / "b" / "d.jsonl", [{"question": "other", "answer": "#### 1"}])
    t = make_task(cfg(**{"task.name": "gsm8k", "task.path": str(p), "task.val_path": str(v)}))
    assert t.validation()[0].id == "val/d:1" and t.train()[0].id == "d:1"
    dup = write(
        tmp_path / "dup.jsonl", [{"id": 7, "question": "x", "answer": "#### 1"}, {"id": 7, "question": "y", "answer": "#### 2"}] * 3
    )
    with pytest.raises(TaskError, match="the id '7'"):
        make_task(cfg(**{"task.name": "gsm8k", "task.path": str(dup)}))
