"""Final answers out of text: GSM8K-style numbers and LaTeX `\\boxed{...}` answers.

Numbers (`final_number`):
  * the text's GSM8K calculator annotations `<<48/2=24>>` and every `$` are dropped first;
  * with a `####` in the text, the answer is the first number after the *last* `####` (GSM8K's final-
    answer line); a `####` followed by no number gives no answer (the text declared an answer and it is
    not a number: no fallback to earlier numbers);
  * without `####`, the answer is the last number in the text;
  * a number is an optional minus sign (ASCII or U+2212) not glued to a preceding word or digit (`5-3`
    reads as 5 and 3), digits with optional thousands commas (`1,000`; commas are removed, so `1,2`
    reads as 12, as in GSM8K's own grading), an optional decimal part, and optionally `/` and a second
    such number: a fraction, `3/4` == 0.75 (a zero denominator is no number). Scientific notation and
    number words are not read.
Values are exact rationals (`fractions.Fraction`), so `1,000` == `1000.0` and `3/4` == `0.75` exactly.

Boxed answers (`last_boxed`): the content of the last `\\boxed{...}` (or `\\fbox{...}`) whose braces
balance, nested braces included (`\\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}`); a box cut off before its
closing brace (a truncated sample) is skipped.
"""

from __future__ import annotations

import re
from fractions import Fraction

_ANNOTATION = re.compile(r"<<[^<>]*>>")
_PLAIN = r"(?:\d(?:[\d,]*\d)?(?:\.\d+)?|\.\d+)"
_NUMBER = re.compile(rf"(?<![\w.])([-\u2212]?)({_PLAIN})(?:/({_PLAIN}))?")
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _value(sign: str, numerator: str, denominator: str | None) -> Fraction | None:
    """The exact value of one matched number; None for a zero denominator."""
    value = Fraction(numerator.replace(",", ""))
    if denominator is not None:
        d = Fraction(denominator.replace(",", ""))
        if d == 0:
            return None
        value /= d
    return -value if sign else value


def numbers(text: str) -> list[Fraction | None]:
    """Every number in `text` (module docstring's rules, annotations and `$` dropped), in order."""
    text = _ANNOTATION.sub("", text).replace("$", "")
    return [_value(*m.groups()) for m in _NUMBER.finditer(text)]


def final_number(text: str) -> Fraction | None:
    """The text's final answer as an exact number, or None (module docstring).

    Args:
      text: a completion or a GSM8K solution (`... #### 72`), or a bare number (`"1,000"`, `"-3.5"`).

    Returns:
      The first number after the last `####` if there is a `####`, else the last number; None if there
      is none.
    """
    text = str(text)
    if "####" in text:
        found = numbers(text.rsplit("####", 1)[1])
        return found[0] if found else None
    found = numbers(text)
    return found[-1] if found else None


def last_boxed(text: str) -> str | None:
    """The content of the last balanced `\\boxed{...}` (or `\\fbox{...}`) in `text`, or None."""
    for m in reversed(list(_BOX.finditer(text))):
        depth, i = 1, m.end()
        while i < len(text):
            if text[i] == "\\":  # an escaped character (`\{`, `\}`) does not open or close
                i += 2
                continue
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[m.end() : i]
            i += 1
    return None
