"""IFEval checkers: a followed and a broken response for every instruction id, the data file, the task."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from essa_hpc.config import Config
from essa_hpc.tasks import TaskError, make_task
from essa_hpc.tasks.ifeval_checks import (
    INSTRUCTION_IDS,
    IFEvalError,
    build_checker,
    count_sentences,
    count_words,
    follows,
    loose_variants,
    split_sentences,
)


def shared_data() -> Path:
    env = os.environ.get("ESSA_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


IFEVAL = shared_data() / "ifeval" / "input_data.jsonl"
needs_ifeval = pytest.mark.skipif(not IFEVAL.is_file(), reason=f"IFEval data not found at {IFEVAL} (set ESSA_SHARED_DATA)")

LONG_EN = "The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden fence near the barn"

# (instruction id, kwargs, a response that follows it, a response that does not)
CASES: list[tuple[str, dict, str, str]] = [
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 3, "capital_relation": "at least"},
        "The NASA and ESA teams met the UN panel.",
        "The NASA team met the panel.",
    ),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 2, "capital_relation": "less than"},
        "Only one WORD is loud here.",
        "TWO LOUD words here.",
    ),
    ("change_case:english_capital", {}, LONG_EN.upper() + ".", LONG_EN + "."),
    ("change_case:english_lowercase", {}, LONG_EN.lower() + ".", LONG_EN + "."),
    (
        "combination:repeat_prompt",
        {"prompt_to_repeat": "Write a poem about cats."},
        "Write a poem about cats. Cats nap in the sun.",
        "Here is a poem: cats nap in the sun.",
    ),
    ("combination:two_responses", {}, "Answer one.\n******\nAnswer two.", "Answer one.\n******\nAnswer one."),
    ("combination:two_responses", {}, "First.\n******\nSecond.", "Only one response here."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], see you at [address].", "Dear [name], see you soon."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello there.\n\nP.S. Bring snacks.", "Hello there. Bring snacks."),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hello.\nP.P.S. One more thing.", "Hello.\nP.S. One more thing."),
    ("detectable_format:constrained_response", {}, "My answer is yes.", "Yes, definitely."),
    ("detectable_format:json_format", {}, '```json\n{"a": 1, "b": [2, 3]}\n```', "a: 1, b: 2"),
    (
        "detectable_format:multiple_sections",
        {"section_spliter": "Section", "num_sections": 2},
        "Section 1\nIntro text.\nSection 2\nMore text.",
        "Section 1\nAll text in one section.",
    ),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "* one\n* two\n- three", "* one\n* two"),
    (
        "detectable_format:number_highlighted_sections",
        {"num_highlights": 2},
        "This is *important* and *urgent*.",
        "This is *important* only.",
    ),
    ("detectable_format:title", {}, "<<Ode to Joy>>\nA poem follows.", "Ode to Joy\nA poem follows."),
    ("keywords:existence", {"keywords": ["river", "stone"]}, "The River carried a stone.", "The river was calm."),
    ("keywords:forbidden_words", {"forbidden_words": ["bad", "ugly"]}, "A badge is good.", "That was bad."),
    ("keywords:frequency", {"keyword": "moon", "frequency": 2, "relation": "at least"}, "The moon. The Moon again.", "The moon once."),
    ("keywords:frequency", {"keyword": "moon", "frequency": 2, "relation": "less than"}, "The moon once.", "moon moon moon"),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 3, "let_relation": "at least"}, "Zebras zigzag lazily.", "Zebras run."),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "less than"}, "A zebra.", "Zebras zigzag."),
    (
        "language:response_language",
        {"language": "fr"},
        "Le chat dort sur le canapé pendant que la pluie tombe doucement sur la ville.",
        "The cat sleeps on the sofa while the rain falls softly over the city.",
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "however"},
        "First paragraph.\n\nHowever, the second one.\n\nThird paragraph.",
        "First paragraph.\n\nBut the second one.\n\nThird paragraph.",
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 1, "first_word": "cats"},
        '"Cats" rule.\n\nDogs drool.',
        "Cats rule.\n\nDogs drool.\n\nBirds sing.",
    ),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, "One.\n***\nTwo.\n***\nThree.", "One.\n***\nTwo."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "***\nOne.\n***\nTwo.\n***", "One.\n***\n***\nTwo."),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 3, "relation": "less than"},
        "One sentence. Two sentences.",
        "One. Two. Three. Four.",
    ),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 3, "relation": "at least"},
        "Dr. Smith came. He sat! Why?",
        "Dr. Smith came at 3.5 p.m. and left.",
    ),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"}, "one two three four five", "one two three"),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, "one two three", "one two three four five six"),
    ("punctuation:no_comma", {}, "No commas here.", "Commas, here."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. Any other questions?", "Any other questions? Done."),
    ("startend:quotation", {}, '"All quoted."', '"Not closed.'),
]


@pytest.mark.parametrize(("iid", "kwargs", "good", "bad"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_checker_positive_and_negative(iid: str, kwargs: dict, good: str, bad: str) -> None:
    check = build_checker(iid, kwargs, prompt="")
    assert check(good)
    assert not check(bad)


def test_every_registered_id_has_cases() -> None:
    assert {c[0] for c in CASES} == set(INSTRUCTION_IDS)


@needs_ifeval
def test_every_id_in_the_data_is_covered_and_every_row_builds() -> None:
    rows = [json.loads(line) for line in IFEVAL.read_text().splitlines() if line.strip()]
    ids = {i for r in rows for i in r["instruction_id_list"]}
    assert ids <= INSTRUCTION_IDS, ids - INSTRUCTION_IDS
    assert ids <= {c[0] for c in CASES}
    for r in rows:
        for iid, kw in zip(r["instruction_id_list"], r["kwargs"]):
            assert callable(build_checker(iid, kw, r["prompt"]))


def test_sentence_and_word_counts() -> None:
    assert count_words("Hello, world! It's 3.5 degrees.") == 7  # \w+ runs, as IFEval counts
    assert split_sentences("Mr. Brown arrived. It was 3.5 degrees! Was it cold? Yes") == [
        "Mr. Brown arrived.",
        "It was 3.5 degrees!",
        "Was it cold?",
        "Yes",
    ]
    assert count_sentences("e.g. this is one sentence. And J. K. Rowling wrote two.") == 2
    assert count_sentences("") == 0


def test_empty_response_follows_nothing_and_loose_variants() -> None:
    assert follows("   ", ["punctuation:no_comma"], [{}]) == [False]
    # strict fails (a preamble line), loose passes once the first line is dropped
    resp = "Sure, here it is:\n<<Title>>\nno commas at all"
    assert follows(resp, ["punctuation:no_comma"], [{}]) == [False]
    assert follows(resp, ["punctuation:no_comma"], [{}], loose=True) == [True]
    assert len(loose_variants("a\nb\nc")) == 8


def test_bad_ids_and_kwargs() -> None:
    with pytest.raises(IFEvalError, match="unknown IFEval instruction id"):
        build_checker("nonsense:thing", {})
    with pytest.raises(IFEvalError, match="relation"):
        build_checker("length_constraints:number_words", {"num_words": 3, "relation": "about"})
    with pytest.raises(IFEvalError, match="num_words"):
        build_checker("length_constraints:number_words", {"relation": "at least"})


@needs_ifeval
def test_ifeval_task_rewards_and_modes() -> None:
    cfg = Config().replace(**{"task.name": "ifeval"})
    task = make_task(cfg)
    train, val = task.train(), task.validation()
    assert len(train) + len(val) == 541 and 1 <= len(val) <= 128
    assert not {e.id for e in train} & {e.id for e in val}
    assert task.system_prompt == "You are a helpful, honest, and concise assistant."
    ex = next(e for e in train if e.columns["instruction_id_list"] == ["punctuation:no_comma"])
    r = task.reward([ex, ex, ex], ["no commas here", "a, b", ""])
    assert r.values.tolist() == [1.0, 0.0, 0.0]
    assert r.failures == 0 and r.components["prompt_strict"].tolist() == [1.0, 0.0, 0.0]
    # multi-instruction prompt: fraction vs all-or-nothing
    multi = next(
        e
        for e in train
        if e.columns["instruction_id_list"]
        == ["punctuation:no_comma", "detectable_format:number_highlighted_sections", "length_constraints:number_words"]
    )
    frac = task.reward([multi], ["Short and *sweet* without commas"]).values[0]
    assert frac == pytest.approx(1 / 3)
    strict_task = make_task(cfg.replace(**{"task.ifeval_reward": "prompt"}))
    assert strict_task.reward([multi], ["Short and *sweet* without commas"]).values[0] == 0.0


def test_ifeval_bad_data_names_the_row(tmp_path: Path) -> None:
    p = tmp_path / "if.jsonl"
    rows = [
        {"key": 1, "prompt": "Say hi.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
        {"key": 2, "prompt": "Say hi.", "instruction_id_list": ["made:up"], "kwargs": [{}]},
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(TaskError, match=r"record 2: unknown IFEval instruction id 'made:up'"):
        make_task(Config().replace(**{"task.name": "ifeval", "task.path": str(p)}))


def test_ifeval_rewards_are_deterministic() -> None:
    check = build_checker("language:response_language", {"language": "en"})
    text = "This is clearly an English sentence about the weather today."
    assert all(check(text) for _ in range(5))
    assert np.isclose(sum(follows(text, ["language:response_language", "punctuation:no_comma"], [{"language": "en"}, {}])), 2)
