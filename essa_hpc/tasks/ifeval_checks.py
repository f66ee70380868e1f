"""IFEval instruction checkers (Zhou et al. 2023, arXiv 2311.07911), written for this project.

Why not lm-eval's or Google's module: both import nltk and fetch its ``punkt`` data over the network at
import time (impossible on compute nodes), and lm-eval pulls in datasets/evaluate/sklearn. The rules
below follow the benchmark's definitions; the two places that used nltk are replaced:

* sentences are counted with a rule-based splitter (``split_sentences``: ., ! or ? followed by space
  and not ending a common abbreviation, an initial or a decimal number), where IFEval used punkt;
* words for ``change_case:capital_word_frequency`` are ``\\w+`` runs joined by hyphens/apostrophes,
  where IFEval used nltk's word_tokenize. Counts agree on ordinary prose; they can differ by one on
  unusual punctuation.

Language checks use ``langdetect`` (as IFEval does) with a fixed seed, so they are deterministic.

``build_checker(instruction_id, kwargs, prompt)`` returns a ``str -> bool`` function;
``follows(response, ids, kwargs, prompt, loose)`` checks them all, strictly (the response as is) or
loosely (IFEval's upper bound: also with the first and/or last line removed and/or '*' deleted).
"""

from __future__ import annotations

import collections
import functools
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

Checker = Callable[[str], bool]

RELATIONS = ("less than", "at least")
CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")
_ABBREVIATIONS = frozenset(
    [
        "mr",
        "mrs",
        "ms",
        "dr",
        "prof",
        "sr",
        "jr",
        "st",
        "vs",
        "etc",
        "e.g",
        "i.e",
        "inc",
        "ltd",
        "co",
        "corp",
        "dept",
        "est",
        "fig",
        "no",
        "approx",
        "jan",
        "feb",
        "mar",
        "apr",
        "jun",
        "jul",
        "aug",
        "sep",
        "sept",
        "oct",
        "nov",
        "dec",
        "u.s",
        "u.k",
        "a.m",
        "p.m",
        "ph.d",
        "mt",
        "ave",
        "blvd",
        "gen",
        "col",
        "lt",
        "sgt",
        "capt",
        "rev",
        "hon",
    ]
)


class IFEvalError(ValueError):
    """An unknown instruction id or bad kwargs for one."""


# ------------------------------------------------------------------------------------------ helpers


def count_words(text: str) -> int:
    return len(re.findall(r"\w+", text))


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: split after ., ! or ? (and closing quotes/brackets) followed by whitespace,
    except after common abbreviations, single-letter initials and inside decimal numbers."""
    text = text.strip()
    if not text:
        return []
    out: list[str] = []
    start = 0
    for m in re.finditer(r"[.!?]+[\"'”’)\]]*(?=\s+|$)", text):
        end = m.end()
        if m.group().startswith(".") and len(m.group().rstrip("\"'”’)]")) == 1:
            before = text[start : m.start()].split()
            last = before[-1].lower().lstrip("(\"'") if before else ""
            if last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha()) or re.fullmatch(r"(?:[a-z]\.)+[a-z]", last):
                continue
        piece = text[start:end].strip()
        if piece:
            out.append(piece)
        start = end
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+(?:[-'’]\w+)*", text)


@functools.lru_cache(maxsize=1)
def _langdetect() -> Any:
    try:
        import langdetect
        from langdetect import DetectorFactory
    except ImportError:
        raise IFEvalError("IFEval language checks need the langdetect package (pip install langdetect)") from None
    DetectorFactory.seed = 0
    return langdetect


@functools.lru_cache(maxsize=4096)
def detect_language(text: str) -> str | None:
    """ISO 639-1 code of ``text`` (langdetect, seeded), or None when it cannot tell (no letters)."""
    ld = _langdetect()
    try:
        return str(ld.detect(text))
    except ld.LangDetectException:
        return None


def _compare(count: int, relation: str, threshold: int) -> bool:
    return count < threshold if relation == "less than" else count >= threshold


def _relation(kw: dict[str, Any], key: str) -> str:
    rel = kw.get(key)
    if rel not in RELATIONS:
        raise IFEvalError(f"{key}: expected one of {RELATIONS}, got {rel!r}")
    return str(rel)


def _int(kw: dict[str, Any], key: str) -> int:
    v = kw.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
        raise IFEvalError(f"{key}: expected an integer, got {v!r}")
    return int(v)


def _str(kw: dict[str, Any], key: str) -> str:
    v = kw.get(key)
    if not isinstance(v, str) or not v.strip():
        raise IFEvalError(f"{key}: expected a non-empty string, got {v!r}")
    return v.strip()


def _strs(kw: dict[str, Any], key: str) -> list[str]:
    v = kw.get(key)
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(x, str) and x for x in v):
        raise IFEvalError(f"{key}: expected a non-empty list of strings, got {v!r}")
    return [str(x) for x in v]


# ----------------------------------------------------------------------------------------- checkers
# Each builder validates its kwargs and returns the check. ``prompt`` is the example's prompt.


def _language(kw: dict[str, Any], prompt: str) -> Checker:
    lang = _str(kw, "language")
    _langdetect()

    def check(r: str) -> bool:
        found = detect_language(r)
        return True if found is None else found == lang  # IFEval counts "cannot detect" as followed

    return check


def _num_sentences(kw: dict[str, Any], prompt: str) -> Checker:
    n, rel = _int(kw, "num_sentences"), _relation(kw, "relation")
    return lambda r: _compare(count_sentences(r), rel, n)


def _placeholders(kw: dict[str, Any], prompt: str) -> Checker:
    n = _int(kw, "num_placeholders")
    return lambda r: len(re.findall(r"\[.*?\]", r)) >= n


def _bullets(kw: dict[str, Any], prompt: str) -> Checker:
    n = _int(kw, "num_bullets")

    def check(r: str) -> bool:
        star = re.findall(r"^\s*\*[^\*].*$", r, flags=re.MULTILINE)
        dash = re.findall(r"^\s*-.*$", r, flags=re.MULTILINE)
        return len(star) + len(dash) == n

    return check


def _constrained(kw: dict[str, Any], prompt: str) -> Checker:
    return lambda r: any(opt in r.strip() for opt in CONSTRAINED_RESPONSES)


def _highlights(kw: dict[str, Any], prompt: str) -> Checker:
    n = _int(kw, "num_highlights")

    def check(r: str) -> bool:
        single = [h for h in re.findall(r"\*[^\n\*]*\*", r) if h.strip("*").strip()]
        double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", r) if h[2:-2].strip()]
        return len(single) + len(double) >= n

    return check


def _sections(kw: dict[str, Any], prompt: str) -> Checker:
    splitter, n = _str(kw, "section_spliter"), _int(kw, "num_sections")
    pattern = re.compile(r"\s?" + re.escape(splitter) + r"\s?\d+\s?")
    return lambda r: len(pattern.split(r)) - 1 >= n


def _paragraphs(kw: dict[str, Any], prompt: str) -> Checker:
    n = _int(kw, "num_paragraphs")

    def check(r: str) -> bool:
        parts = re.split(r"\s?\*\*\*\s?", r)
        count = len(parts)
        for i, p in enumerate(parts):
            if not p.strip():
                if i in (0, len(parts) - 1):
                    count -= 1
                else:
                    return False  # an empty paragraph between two dividers
        return count == n

    return check


def _postscript(kw: dict[str, Any], prompt: str) -> Checker:
    marker = _str(kw, "postscript_marker")
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return lambda r: bool(re.findall(pattern, r.lower(), flags=re.MULTILINE))


def _keywords(kw: dict[str, Any], prompt: str) -> Checker:
    words = _strs(kw, "keywords")
    return lambda r: all(re.search(re.escape(w), r, flags=re.IGNORECASE) for w in words)


def _keyword_frequency(kw: dict[str, Any], prompt: str) -> Checker:
    word, n, rel = _str(kw, "keyword"), _int(kw, "frequency"), _relation(kw, "relation")
    return lambda r: _compare(len(re.findall(re.escape(word), r, flags=re.IGNORECASE)), rel, n)


def _forbidden(kw: dict[str, Any], prompt: str) -> Checker:
    words = _strs(kw, "forbidden_words")
    return lambda r: not any(re.search(r"\b" + re.escape(w) + r"\b", r, flags=re.IGNORECASE) for w in words)


def _letter_frequency(kw: dict[str, Any], prompt: str) -> Checker:
    letter = _str(kw, "letter").lower()
    if len(letter) != 1:
        raise IFEvalError(f"letter: expected a single letter, got {letter!r}")
    n, rel = _int(kw, "let_frequency"), _relation(kw, "let_relation")
    return lambda r: _compare(collections.Counter(r.lower())[letter], rel, n)


def _num_words(kw: dict[str, Any], prompt: str) -> Checker:
    n, rel = _int(kw, "num_words"), _relation(kw, "relation")
    return lambda r: _compare(count_words(r), rel, n)


def _json(kw: dict[str, Any], prompt: str) -> Checker:
    def check(r: str) -> bool:
        body = r.strip()
        for fence in ("```json", "```Json", "```JSON", "```"):
            if body.startswith(fence):
                body = body[len(fence) :]
                break
        body = body.removesuffix("```").strip()
        try:
            json.loads(body)
        except ValueError:
            return False
        return True

    return check


def _nth_paragraph_first_word(kw: dict[str, Any], prompt: str) -> Checker:
    n, nth, first = _int(kw, "num_paragraphs"), _int(kw, "nth_paragraph"), _str(kw, "first_word").lower()

    def check(r: str) -> bool:
        parts = re.split(r"\n\n", r)
        count = sum(1 for p in parts if p.strip())
        if nth > count or nth < 1:
            return False
        para = parts[nth - 1].strip()
        if not para:
            return False
        word = para.split()[0].strip().lstrip("'").lstrip('"')
        got = ""
        for ch in word:
            if ch in ".,?!'\"":
                break
            got += ch.lower()
        return count == n and got == first

    return check


def _two_responses(kw: dict[str, Any], prompt: str) -> Checker:
    def check(r: str) -> bool:
        parts = r.split("******")
        valid = []
        for i, p in enumerate(parts):
            if not p.strip():
                if i not in (0, len(parts) - 1):
                    return False
            else:
                valid.append(p.strip())
        return len(valid) == 2 and valid[0] != valid[1]

    return check


def _repeat_prompt(kw: dict[str, Any], prompt: str) -> Checker:
    target = _str(kw, "prompt_to_repeat").lower()
    return lambda r: r.strip().lower().startswith(target)


def _end(kw: dict[str, Any], prompt: str) -> Checker:
    phrase = _str(kw, "end_phrase").lower()
    return lambda r: r.strip().strip('"').lower().endswith(phrase)


def _title(kw: dict[str, Any], prompt: str) -> Checker:
    return lambda r: any(t[2:-2].strip() for t in re.findall(r"<<[^\n]+>>", r))


def _english_capital(kw: dict[str, Any], prompt: str) -> Checker:
    _langdetect()
    return lambda r: r.isupper() and detect_language(r) in ("en", None)


def _english_lowercase(kw: dict[str, Any], prompt: str) -> Checker:
    _langdetect()
    return lambda r: r.islower() and detect_language(r) in ("en", None)


def _no_comma(kw: dict[str, Any], prompt: str) -> Checker:
    return lambda r: "," not in r


def _capital_word_frequency(kw: dict[str, Any], prompt: str) -> Checker:
    n, rel = _int(kw, "capital_frequency"), _relation(kw, "capital_relation")
    return lambda r: _compare(sum(1 for w in _tokens(r) if w.isupper()), rel, n)


def _quotation(kw: dict[str, Any], prompt: str) -> Checker:
    def check(r: str) -> bool:
        s = r.strip()
        return len(s) > 1 and s[0] == '"' and s[-1] == '"'

    return check


BUILDERS: dict[str, Callable[[dict[str, Any], str], Checker]] = {
    "change_case:capital_word_frequency": _capital_word_frequency,
    "change_case:english_capital": _english_capital,
    "change_case:english_lowercase": _english_lowercase,
    "combination:repeat_prompt": _repeat_prompt,
    "combination:two_responses": _two_responses,
    "detectable_content:number_placeholders": _placeholders,
    "detectable_content:postscript": _postscript,
    "detectable_format:constrained_response": _constrained,
    "detectable_format:json_format": _json,
    "detectable_format:multiple_sections": _sections,
    "detectable_format:number_bullet_lists": _bullets,
    "detectable_format:number_highlighted_sections": _highlights,
    "detectable_format:title": _title,
    "keywords:existence": _keywords,
    "keywords:forbidden_words": _forbidden,
    "keywords:frequency": _keyword_frequency,
    "keywords:letter_frequency": _letter_frequency,
    "language:response_language": _language,
    "length_constraints:nth_paragraph_first_word": _nth_paragraph_first_word,
    "length_constraints:number_paragraphs": _paragraphs,
    "length_constraints:number_sentences": _num_sentences,
    "length_constraints:number_words": _num_words,
    "punctuation:no_comma": _no_comma,
    "startend:end_checker": _end,
    "startend:quotation": _quotation,
}
INSTRUCTION_IDS = frozenset(BUILDERS)


def build_checker(instruction_id: str, kwargs: dict[str, Any] | None, prompt: str = "") -> Checker:
    """The check for one instruction; IFEvalError for an unknown id or bad kwargs (None values ignored)."""
    builder = BUILDERS.get(instruction_id)
    if builder is None:
        raise IFEvalError(f"unknown IFEval instruction id {instruction_id!r}")
    kw = {k: v for k, v in (kwargs or {}).items() if v is not None}
    try:
        return builder(kw, prompt)
    except IFEvalError as e:
        raise IFEvalError(f"{instruction_id}: {e}") from None


def loose_variants(response: str) -> list[str]:
    """IFEval's loose evaluation: the response with the first / last / both lines removed, each also
    with every '*' deleted (8 variants, the original first)."""
    lines = response.split("\n")
    cut = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [response, response.replace("*", ""), *cut, *(c.replace("*", "") for c in cut)]


def check_all(checkers: Sequence[Checker], response: str, loose: bool = False) -> list[bool]:
    """Whether each instruction is followed; an empty (whitespace) response follows none."""
    variants = loose_variants(response) if loose else [response]
    return [any(v.strip() and c(v) for v in variants) for c in checkers]


def follows(
    response: str, instruction_ids: Sequence[str], kwargs: Sequence[dict[str, Any] | None], prompt: str = "", loose: bool = False
) -> list[bool]:
    if len(instruction_ids) != len(kwargs):
        raise IFEvalError(f"{len(instruction_ids)} instruction ids but {len(kwargs)} kwargs")
    return check_all([build_checker(i, k, prompt) for i, k in zip(instruction_ids, kwargs)], response, loose)
