"""The paper's data protocols (docs/design.md, "The paper's settings"): GSM8K's disjoint SFT and ESSA
splits with the test set validating, IFEval's training prompts apart from the benchmark, the SFT file
for tasks without reference responses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from essa_hpc import exit_codes, run
from essa_hpc.config import Config
from essa_hpc.tasks import TaskError, make_task, sft_examples, training_split

from .conftest import shared_data

GSM8K = shared_data() / "gsm8k"
IFEVAL = shared_data() / "ifeval" / "input_data.jsonl"
needs_gsm8k = pytest.mark.skipif(not (GSM8K / "train.jsonl").is_file(), reason=f"GSM8K not found at {GSM8K} (set ESSA_SHARED_DATA)")
needs_ifeval = pytest.mark.skipif(not IFEVAL.is_file(), reason=f"IFEval data not found at {IFEVAL} (set ESSA_SHARED_DATA)")


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def gsm8k_rows(n: int, start: int = 0) -> list[dict[str, object]]:
    return [
        {"question": f"What is {i} + 1?", "answer": f"{i} + 1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"} for i in range(start, start + n)
    ]


def if_rows(n: int, start: int = 0) -> list[dict[str, object]]:
    return [
        {
            "key": f"k{i}",
            "prompt": f"Write about topic {i} without commas.",
            "instruction_id_list": ["punctuation:no_comma"],
            "kwargs": [{}],
        }
        for i in range(start, start + n)
    ]


# ----------------------------------------------------------------------------------------------------
# GSM8K: SFT and ESSA disjoint, validation on the test questions


@needs_gsm8k
def test_gsm8k_paper_split_on_the_real_data() -> None:
    cfg = Config().replace(
        **{"task.name": "gsm8k", "task.sft_size": 1495, "task.train_size": 5978, "eval.size": 1319, "sft.examples": 1495}
    )
    task = make_task(cfg)
    train, val, sft = task.train(), task.validation(), sft_examples(task, cfg)
    assert (len(sft), len(train), len(val)) == (1495, 5978, 1319)
    assert not {e.id for e in sft} & {e.id for e in train}, "SFT and ESSA questions are disjoint"
    assert not {e.prompt for e in val} & {e.prompt for e in train + list(sft)}, "validation is the test set"
    assert all(e.response is not None and "\\boxed{" in e.response for e in sft)
    again = make_task(cfg.replace(**{"run.seed": 99}))
    assert [e.id for e in sft_examples(again, cfg)] == [e.id for e in sft], "the SFT draw does not depend on the run seed"


def test_gsm8k_split_sizes_on_a_synthetic_file(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", gsm8k_rows(12))
    test = write_jsonl(tmp_path / "test.jsonl", gsm8k_rows(4, start=100))
    base = {"task.name": "gsm8k", "task.path": str(data), "task.val_path": str(test), "eval.size": 4}
    task = make_task(Config().replace(**base, **{"task.sft_size": 3, "task.train_size": 7}))
    cfg = Config().replace(**base, **{"task.sft_size": 3, "task.train_size": 7})
    sft, train = sft_examples(task, cfg), task.train()
    assert (len(sft), len(train), len(task.validation())) == (3, 7, 4)
    assert not {e.id for e in sft} & {e.id for e in train}
    order = [e.id for e in make_task(Config().replace(**base)).train()]
    assert [e.id for e in train] == [i for i in order if i not in {e.id for e in sft}][:7], "both parts keep the file's order"
    # without a reservation SFT and ESSA share the training split (the earlier behaviour)
    plain_cfg = Config().replace(**base, **{"sft.examples": 5})
    plain = make_task(plain_cfg)
    assert [e.id for e in sft_examples(plain, plain_cfg)] == [e.id for e in plain.train()][:5]
    with pytest.raises(TaskError, match=r"task.sft_size=12"):
        make_task(Config().replace(**base, **{"task.sft_size": 12}))
    with pytest.raises(TaskError, match=r"task.train_size=10"):
        make_task(Config().replace(**base, **{"task.sft_size": 3, "task.train_size": 10}))


# ----------------------------------------------------------------------------------------------------
# IFEval: training prompts of their own, the benchmark validates, SFT from sft.path


def test_ifeval_without_training_prompts_refuses_to_train(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = write_jsonl(tmp_path / "bench.jsonl", if_rows(6))
    cfg = Config().replace(**{"task.name": "ifeval", "task.val_path": str(bench)})
    if not IFEVAL.is_file():
        cfg = cfg.replace(**{"task.path": None})
        with pytest.raises(TaskError, match=r"task\.path"):
            make_task(cfg)
        return
    task = make_task(cfg)  # evaluation may still read the benchmark
    with pytest.raises(TaskError, match=r"task.path: no IFEval training prompts given.*541"):
        training_split(task)
    rc = run.main(["--set", "task.name=ifeval", "--set", f"run.dir={tmp_path / 'runs'}", "--set", "log.progress=false"])
    assert rc == exit_codes.BAD_INPUT
    assert "no IFEval training prompts given" in capsys.readouterr().err


def test_ifeval_training_file_is_separate_from_validation(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "if_like.jsonl", if_rows(10))
    bench = write_jsonl(tmp_path / "bench.jsonl", if_rows(5, start=50))
    task = make_task(Config().replace(**{"task.name": "ifeval", "task.path": str(train), "task.val_path": str(bench), "eval.size": 541}))
    assert len(training_split(task)) == 10 and len(task.validation()) == 5
    overlapping = write_jsonl(tmp_path / "overlap.jsonl", if_rows(10, start=48))
    with pytest.raises(TaskError, match=r"training prompt.*validation prompts too"):
        make_task(Config().replace(**{"task.name": "ifeval", "task.path": str(overlapping), "task.val_path": str(bench)}))


@needs_ifeval
def test_ifeval_validates_on_all_541_when_training_prompts_are_given(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "if_like.jsonl", if_rows(10))
    task = make_task(Config().replace(**{"task.name": "ifeval", "task.path": str(train), "eval.size": 541}))
    assert len(task.validation()) == 541 and len(training_split(task)) == 10
    with pytest.raises(TaskError, match="is the IFEval benchmark itself"):
        make_task(Config().replace(**{"task.name": "ifeval", "task.path": str(IFEVAL)}))


def test_sft_file_gives_responses_to_a_task_without_them(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "if_like.jsonl", if_rows(6))
    bench = write_jsonl(tmp_path / "bench.jsonl", if_rows(3, start=50))
    pairs = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"Say {i} without commas.", "response": f"I say {i}."} for i in range(4)])
    base = {"task.name": "ifeval", "task.path": str(train), "task.val_path": str(bench)}
    cfg = Config().replace(**base, **{"sft.path": str(pairs), "sft.examples": 3})
    got = sft_examples(make_task(cfg), cfg)
    assert [(e.prompt, e.response) for e in got] == [(f"Say {i} without commas.", f"I say {i}.") for i in range(3)]
    no_sft = Config().replace(**base)
    assert all(e.response is None for e in sft_examples(make_task(no_sft), no_sft)), "IFEval prompts carry no responses"
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"prompt": "Say hi."}])
    bad = Config().replace(**base, **{"sft.path": str(broken)})
    with pytest.raises(TaskError, match=r"sft\.path=.*'response'"):
        sft_examples(make_task(bad), bad)
