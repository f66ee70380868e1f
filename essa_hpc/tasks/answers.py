r"""Final-answer extraction and comparison for math tasks.

* ``last_boxed(text)`` — the content of the last ``\boxed{...}`` (or ``\fbox{...}``), braces matched;
  None when there is none or it is not closed (malformed).
* ``last_number(text)`` — the last number written in the text (thousands commas allowed).
* ``parse_number(s)`` — a plain number from an answer string (``$``, commas, ``\!``, ``%`` stripped).
* ``math_equal(gold, pred)`` — math-verify's symbolic comparison (``math_verify.parse`` /
  ``verify``): ``\frac{1}{2}`` equals ``0.5``, ``2x+1`` equals ``1+2x``, ``\text{(C)}`` equals ``C``.

math-verify guards parsing with ``signal.alarm``, which only works in the main thread; off the main
thread we call it without its timeout (the plugin runner's thread timeout applies instead).
"""

from __future__ import annotations

import re
import threading
from typing import Any

BOX_COMMANDS = ("\\boxed", "\\fbox")
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_MV_TIMEOUT_S = 5


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} in ``text`` (nested braces allowed), or None."""
    start = max(text.rfind(cmd) for cmd in BOX_COMMANDS)
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None  # unbalanced: not well-formed


def last_number(text: str) -> str | None:
    """The last number in ``text`` as written (e.g. ``"1,000"``, ``"-3.5"``), or None."""
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def parse_number(s: Any) -> float | None:
    """A float from an answer string such as ``"1,000"``, ``"$18"``, ``"\\$18.00"``, ``"85."``; None otherwise."""
    if isinstance(s, bool):
        return None
    if isinstance(s, (int, float)):
        return float(s)
    if not isinstance(s, str):
        return None
    t = s.strip().replace("\\!", "").replace("\\,", "").replace("\\$", "").replace("$", "")
    t = t.replace("\\%", "").replace("%", "").replace(",", "").replace(" ", "").rstrip(".")
    if t.startswith("\\text{") and t.endswith("}"):
        t = t[6:-1]
    try:
        return float(t)
    except ValueError:
        return None


def numbers_equal(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


def _mv_timeout() -> int | None:
    return _MV_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def math_equal(gold: str, pred: str) -> bool:
    r"""True when math-verify finds the answer in ``pred`` (last \boxed{} first, then LaTeX, then a
    plain expression) equal to ``gold`` (an answer string, e.g. ``\frac{1}{2}``)."""
    import logging

    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" warning off-main-thread
    t = _mv_timeout()
    g = parse("\\boxed{" + gold + "}", parsing_timeout=t)
    p = parse(pred, parsing_timeout=t)
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=t))


def numeric_answer(text: str) -> tuple[str | None, bool]:
    """(final answer string, came from a \\boxed{}): the last \\boxed{} content, else the last number."""
    boxed = last_boxed(text)
    if boxed:  # an empty \boxed{} is not an answer
        return boxed, True
    return last_number(text), False


def numeric_match(gold: Any, text: str) -> tuple[bool, bool]:
    """(correct, boxed) for a numeric reference answer (GSM8K, arithmetic).

    The final answer is the last \\boxed{} content, else the last number in the text. It is compared
    numerically; a boxed answer that is not a plain number (``\\frac{36}{2}``) goes to math-verify.
    """
    g = parse_number(gold)
    ans, boxed = numeric_answer(text)
    if ans is None or g is None:
        return False, boxed
    v = parse_number(ans)
    if v is not None:
        return numbers_equal(v, g), boxed
    if boxed:
        return math_equal(str(gold).replace(",", ""), "\\boxed{" + ans + "}"), boxed
    return False, boxed
