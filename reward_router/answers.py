"""Final answers of math solutions, compared by value: what the ``verifier`` RM scores with and
what a trainer checks its own completions with (ground: no project imports).

The final answer of a text is, in order of preference: the number after GSM8K's ``#### ``,
the content of the last ``\\boxed{...}``, or the last number in the text. Numbers compare by
value (``1,000`` = ``1000.0`` = ``1e3``; ``3/4`` = ``0.75``), anything else as normalised text.

>>> final_answer("so she makes 9 * 2 = $18 a day.\\n#### 18")
'18'
>>> final_answer(r"the area is \\boxed{\\frac{1}{2}}")
'\\\\frac{1}{2}'
>>> answers_match("1,000", "1000.0"), answers_match(r"\\frac{3}{4}", "0.75")
(True, True)
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

_HASHES = re.compile(r"####\s*([^\n]+)")
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")
_FRAC = re.compile(r"^\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")


def _last_boxed(text: str) -> str | None:
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None  # unbalanced braces: no trustworthy box


def final_answer(text: str) -> str | None:
    """The final answer of a solution, or None when there is none."""
    hashes = _HASHES.findall(text)
    if hashes:
        return hashes[-1].strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _as_number(answer: str) -> Fraction | None:
    s = answer.strip().rstrip(".").replace("$", "").replace(",", "").replace("\\!", "")
    s = s.removesuffix("\\%").removesuffix("%").strip()
    m = _FRAC.match(s)
    try:
        if m:
            return Fraction(m.group(1).strip()) / Fraction(m.group(2).strip())
        if re.fullmatch(r"-?\d+/\d+", s):
            return Fraction(s)
        value = float(s)
    except (ValueError, ZeroDivisionError):
        nums = _NUMBER.findall(s)
        # "18 dollars", "x = 5": a single number inside words is the answer.
        if len(nums) == 1 and nums[0] != s:
            return _as_number(nums[0])
        return None
    return Fraction(value).limit_denominator(10**6) if math.isfinite(value) else None


def _normalise_text(answer: str) -> str:
    return re.sub(r"\s+|\\[,;! ]|\\text\{|\}|\{|\$", "", answer).lower().rstrip(".")


def answers_match(predicted: str, reference: str) -> bool:
    """Whether two final answers are the same number (tolerance 1e-6) or the same text."""
    a, b = _as_number(predicted), _as_number(reference)
    if a is not None and b is not None:
        return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))
    return _normalise_text(predicted) == _normalise_text(reference)
