"""Reading the final answer out of what a model wrote, in the forms models write it.

A checker that only accepts a completion starting with the number gives a real instruct model
all-zero groups: it writes "The answer is 579." or "123 + 456 = 579". The precedence follows the
conventions of the math benchmarks: an explicit `\\boxed{...}` (MATH, Hendrycks et al. 2021), then a
GSM8K-style `#### N` line (Cobbe et al. 2021), then "the answer is N", then the result of the last
equation ("... = N"), then a completion that starts with the number (what the tiny model is taught),
then the last number in the text.

Real models also correct themselves, reason before answering and write numbers in LaTeX, so:
within a form the LAST occurrence wins (a model that writes `\\boxed{12}`, then "wait", then
`\\boxed{13}` means 13; lighteval and Math-Verify take the last box too); an equation in a check
after the answer ("Check: 19 - 7 = 12") is not the answer; reasoning (`<think>...</think>`, also
when the template opened the block in the prompt, and a block the budget cut off) is never read
(`without_reasoning`, also used for code and tool calls); and `1{,}234`, `12\\,000`, `\\$9{,}500`,
`\\frac{3}{4}`, `\\dfrac12`, the Unicode minus and trailing periods read as the numbers they are.
"""

from __future__ import annotations

import re
from decimal import Decimal
from fractions import Fraction

__all__ = ["final_number", "reasoning_spans", "without_reasoning"]

# A number: thousands groups or plain digits, a decimal part, and a denominator (a written or LaTeX
# fraction). Not preceded by a word character or a point, so "x2", the "5" of "1.5" and the "-3" of
# "5-3" are not numbers of their own.
_NUMBER = r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?"
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = re.compile(r"####\s*(" + _NUMBER + r")")
_WRAP = r"[\s$*]*(?:\\[(\[])?[\s$*]*"  # $, **bold**, \( or \[ around a stated number
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)" + _WRAP + "(" + _NUMBER + r")", re.IGNORECASE)
_EQUALS = re.compile(r"=" + _WRAP + "(" + _NUMBER + r")")
_LEADING = re.compile(r"\s*\$?\s*(" + _NUMBER + r")")
_ANY = re.compile(_NUMBER)
_CHECK = re.compile(r"\b(?:check|verif|sanity)\w*", re.IGNORECASE)

_THINK_OPEN = re.compile(r"<think(?:ing)?>")
_THINK_CLOSE = re.compile(r"</think(?:ing)?>")

# LaTeX spellings of numbers, rewritten to plain ones before reading (order matters: fractions last).
_LATEX = (
    (re.compile(r"(?<=\d)\{,\}(?=\d{3})"), ","),  # 1{,}234
    (re.compile(r"(?<=\d)(?:\\[,!;: ]|~|[\u00a0\u2009\u202f])(?=\d{3})"), ""),  # 12\,000, 12 000 (thin space)
    (re.compile(r"\\\$"), "$"),  # \$9,500
    (re.compile("\u2212"), "-"),  # the Unicode minus sign
)
_FRACTION = re.compile(r"\\[dt]?frac\s*(?:\{\s*(-?\d+)\s*\}|(\d))\s*(?:\{\s*(-?\d+)\s*\}|(\d))")


def reasoning_spans(text: str) -> list[tuple[int, int]]:
    """The reasoning in `text` as (start, end) character offsets, in order, tags included.

    Every `<think>...</think>` (or `<thinking>`) block; the text up to a closing tag whose opening
    tag is not in `text` (templates such as DeepSeek-R1's open the block in the prompt); and an
    opening tag never closed, to the end (reasoning the token budget cut off).
    """
    spans, at = [], 0
    first_close, first_open = _THINK_CLOSE.search(text), _THINK_OPEN.search(text)
    if first_close and (first_open is None or first_close.start() < first_open.start()):
        spans.append((0, first_close.end()))
        at = first_close.end()
    while opened := _THINK_OPEN.search(text, at):
        closed = _THINK_CLOSE.search(text, opened.end())
        at = closed.end() if closed else len(text)
        spans.append((opened.start(), at))
    return spans


def without_reasoning(text: str) -> str:
    """`text` without its reasoning (`reasoning_spans`): what a reader takes as the model's answer
    (empty when the budget cut the reasoning off before any answer)."""
    kept, at = [], 0
    for start, end in reasoning_spans(text):
        kept.append(text[at:start])
        at = end
    return "".join(kept) + text[at:]


def _plain(text: str) -> str:
    """LaTeX number spellings as plain numbers: `1{,}234` -> `1,234`, `\\frac{-3}{4}` -> `-3/4`."""
    for pattern, replacement in _LATEX:
        text = pattern.sub(replacement, text)

    def fraction(match: re.Match[str]) -> str:
        top, bottom = int(match.group(1) or match.group(2)), int(match.group(3) or match.group(4))
        return f"{'-' if (top < 0) != (bottom < 0) else ''}{abs(top)}/{abs(bottom)}"

    return _FRACTION.sub(fraction, text)


def _boxed(text: str) -> list[str]:
    """The contents of every `\\boxed{...}` / `\\fbox{...}`, braces balanced, in order."""
    contents = []
    for match in _BOXED.finditer(text):
        depth, at = 1, match.end()
        while at < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[at], 0)
            at += 1
        if depth == 0:
            contents.append(text[match.end() : at - 1])
    return contents


def _canonical(number: str) -> str:
    """One string per value: '1,234' -> '1234', '7.0' -> '7', '-0' -> '0', '6/8' and '0.75' ->
    '0.75', '1/3' -> '1/3' (a terminating decimal when the value has one, else the reduced fraction)."""
    try:
        value = Fraction(number.replace(",", ""))
    except ZeroDivisionError:
        return number
    if value.denominator == 1:
        return str(value.numerator)
    rest = value.denominator
    for prime in (2, 5):
        while rest % prime == 0:
            rest //= prime
    if rest != 1:
        return f"{value.numerator}/{value.denominator}"
    return format((Decimal(value.numerator) / Decimal(value.denominator)).normalize(), "f")


def _before_check(text: str) -> str:
    """The text before the first check ("Check: 19 - 7 = 12") that follows a number: a check's
    equations restate the answer, they are not it."""
    for match in _CHECK.finditer(text):
        if _ANY.search(text, 0, match.start()):
            return text[: match.start()]
    return text


def final_number(text: str) -> str | None:
    """The answer a completion states, as a canonical number string; None when it states none.

    Args:
        text: the completion (decoded, special tokens removed). Reasoning is left out first
            (`without_reasoning`), then LaTeX number spellings are read as plain numbers.

    Returns:
        In order of precedence, the LAST of: the first number inside `\\boxed{...}`, `#### N`,
        "answer is N" (or "answer: N", "answer = N"); else the last "= N" before any check of the
        answer; else a leading number; else the last number anywhere. Canonical form
        (`_canonical`): thousands separators dropped, trailing zeros after a decimal point removed,
        fractions as their decimal when it terminates, else reduced `p/q`.
    """
    text = _plain(without_reasoning(text))
    for boxed in reversed(_boxed(text)):
        match = _ANY.search(boxed)
        if match:
            return _canonical(match.group(0))
    for pattern in (_HASHES, _ANSWER_IS):
        found = pattern.findall(text)
        if found:
            return _canonical(found[-1])
    answer = _before_check(text)
    equations = _EQUALS.findall(answer)
    if equations:
        return _canonical(equations[-1])
    match = _LEADING.match(answer)
    if match:
        return _canonical(match.group(1))
    numbers = _ANY.findall(answer)
    return _canonical(numbers[-1]) if numbers else None
