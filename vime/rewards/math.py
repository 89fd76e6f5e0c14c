"""Answer checkers for text answers: exact match and a math checker that compares the final answer."""

from __future__ import annotations

import re
from fractions import Fraction

from vime.types import Sample

_NUM = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


def _normalise(text: str) -> str:
    return " ".join(str(text).strip().split()).rstrip(".").lower()


def exact_match(sample: Sample) -> float:
    return float(sample.label is not None and _normalise(sample.response) == _normalise(sample.label))


def extract_answer(text: str) -> str | None:
    """The content of the last \\boxed{...}, else the text after 'answer:' / '####', else the last number."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    for marker in ("####", "answer:", "answer is"):
        i = text.lower().rfind(marker)
        if i >= 0:
            tail = text[i + len(marker) :].strip()
            m = _NUM.search(tail)
            return m.group(0) if m else tail.split("\n")[0].strip() or None
    nums = _NUM.findall(text.replace(",", ""))
    return nums[-1] if nums else None


def _last_boxed(text: str) -> str | None:
    i = text.rfind("\\boxed{")
    if i < 0:
        return None
    depth, j = 0, i + len("\\boxed{")
    for k in range(j, len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            if depth == 0:
                return text[j:k]
            depth -= 1
    return None


def _as_number(s: str) -> Fraction | None:
    s = s.replace(",", "").replace("$", "").strip()
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def answers_equal(pred: str | None, label: str) -> bool:
    if pred is None:
        return False
    a, b = _as_number(pred), _as_number(str(label))
    if a is not None and b is not None:
        return a == b
    return _normalise(pred) == _normalise(label)


def math_reward(sample: Sample) -> float:
    return float(answers_equal(extract_answer(sample.response), str(sample.label)))
