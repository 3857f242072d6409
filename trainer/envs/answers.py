"""Reading the final answer out of what a model wrote, in the forms models write it.

A checker that only accepts a completion starting with the number gives a real instruct model
all-zero groups: it writes "The answer is 579." or "123 + 456 = 579". The precedence follows the
conventions of the math benchmarks: an explicit `\\boxed{...}` (MATH, Hendrycks et al. 2021), then a
GSM8K-style `#### N` line (Cobbe et al. 2021), then "the answer is N", then the result of the last
equation ("... = N"), then a completion that starts with the number (what the tiny model is taught),
then the last number in the text.
"""

from __future__ import annotations

import re

__all__ = ["final_number"]

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
_BOXED = re.compile(r"\\boxed\{\s*(" + _NUMBER + r")\s*\}")
_HASHES = re.compile(r"####\s*(" + _NUMBER + r")")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*\$?\s*(" + _NUMBER + r")", re.IGNORECASE)
_EQUALS = re.compile(r"=\s*(" + _NUMBER + r")")
_LEADING = re.compile(r"\s*(" + _NUMBER + r")")
_ANY = re.compile(_NUMBER)


def _canonical(number: str) -> str:
    """'1,234' -> '1234', '7.0' -> '7', '-0' -> '0': equal values compare equal as strings."""
    value = number.replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return "0" if value in ("-0", "") else value


def final_number(text: str) -> str | None:
    """The answer a completion states, as a canonical number string; None when it states none.

    Args:
        text: the completion (decoded, special tokens removed).

    Returns:
        The first match of, in order: `\\boxed{N}`, `#### N`, "answer is N" (or "answer: N"),
        the last "= N", a leading number, the last number anywhere. Thousands separators are dropped and trailing
        zeros after a decimal point removed.
    """
    for pattern in (_BOXED, _HASHES, _ANSWER_IS):
        match = pattern.search(text)
        if match:
            return _canonical(match.group(1))
    equations = _EQUALS.findall(text)
    if equations:
        return _canonical(equations[-1])
    match = _LEADING.match(text)
    if match:
        return _canonical(match.group(1))
    numbers = _ANY.findall(text)
    return _canonical(numbers[-1]) if numbers else None
