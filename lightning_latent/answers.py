"""Final answers: the ONE set of rules for reading, canonicalising and comparing them.

Gold answers parsed from a dataset (:mod:`lightning_latent.data.records`) and answers extracted from
model output for rewards and metrics (:mod:`lightning_latent.rl.rewards`, :mod:`lightning_latent.metrics`)
go through the same functions here, so "the same answer" means one thing everywhere. The module imports
nothing from the package (both ``data/`` and ``rl/`` import it, no cycle).

The rules, in order:

1. Special tokens as decoded by HF tokenizers (``<|eos|>``, ``<|endoftext|>``, ...) become a space.
2. A **number** is what is left, once ``$`` signs and thousands commas (a comma between two digits)
   are removed and trailing ``.`` dropped, when it is a plain decimal literal (``[+-]`` digits with an
   optional fraction: ``"28"``, ``"-3.5"``, ``".5"``, ``"28."``). Its canonical form is exact (no float
   rounding): ``"1,000" -> "1000"``, ``"3.50" -> "3.5"``, ``"-0" -> "0"``, ``"$18." -> "18"``, any
   Unicode decimal digit written as its ASCII digit. Exponents (``"1e3"``), ``"inf"``/``"nan"``,
   fractions (``"1/2"``), percentages and units (``"5%"``, ``"3 dollars"``) are text.
3. Anything else is **text**; its canonical form is only stripped of surrounding whitespace, so a
   ProsQA target ``"Tom is a wumpus."`` is stored exactly as the model must write it.
4. Comparison (:func:`answers_equal`, :func:`answer_key`): two numbers are equal when their float values
   are within 1e-6 (``"28.0" == "28"``); texts are equal after collapsing whitespace, removing ``$`` and
   thousands commas and dropping trailing ``.`` (``"Tom  is a cat." == "Tom is a cat"``); case matters.
"""
from __future__ import annotations

import math
import re
import unicodedata

__all__ = [
    "answer_key",
    "answers_equal",
    "extract_answer",
    "is_numeric_answer",
    "normalize_answer",
]

# Special tokens as decoded by HF tokenizers: <|endoftext|>, <|eos|>, <|end-latent|>, ...
_SPECIAL_TOKEN_RE = re.compile(r"<\|[^|<>]*\|>")
# A comma between two digits is a thousands separator ("1,000"); other commas are content.
_DIGIT_COMMA_RE = re.compile(r"(?<=\d),(?=\d)")
_WHITESPACE_RE = re.compile(r"\s+")
# A decimal literal; \d is any Unicode decimal digit (canonicalised to ASCII below).
_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_NUMERIC_ABS_TOL = 1e-6


def _strip_currency_and_commas(s: str) -> str:
    """Remove every ``$`` and every comma between two digits (rule 2's clean-up, also rule 4's for text)."""
    return _DIGIT_COMMA_RE.sub("", s.replace("$", ""))


def _drop_trailing_dots(s: str) -> str:
    """``"28."`` / ``"28 . ."`` -> ``"28"``: a final full stop ends a sentence, it is not a decimal point."""
    s = s.rstrip()
    while s.endswith("."):
        s = s[:-1].rstrip()
    return s


def _canonical_number(s: str) -> str:
    """Exact canonical decimal form of a string matching ``_NUMBER_RE`` (no float rounding): ASCII
    digits, no leading zeros in the whole part, no trailing zeros in the fraction, no ``+``, no ``-0``."""
    s = "".join(str(unicodedata.decimal(c)) if c.isdecimal() else c for c in s)
    sign = ""
    if s[0] in "+-":
        sign, s = ("-" if s[0] == "-" else ""), s[1:]
    whole, _, frac = s.partition(".")
    whole = whole.lstrip("0") or "0"
    frac = frac.rstrip("0")
    out = whole + ("." + frac if frac else "")
    if out == "0":
        return "0"  # "-0", "-0.0" -> "0"
    return sign + out


def _as_number(text: str) -> str | None:
    """The canonical number ``text`` denotes (rule 2), or None when it is text."""
    s = _drop_trailing_dots(_strip_currency_and_commas(text).strip())
    if s and _NUMBER_RE.fullmatch(s):
        return _canonical_number(s)
    return None


def normalize_answer(text: str) -> str:
    """Canonical form of a final answer: a number's exact canonical decimal, else the text stripped.

    ``"1,000" -> "1000"``, ``"3.50" -> "3.5"``, ``"-0" -> "0"``, ``" $18. " -> "18"``,
    ``"28<|eos|>" -> "28"``, ``"  Tom is a wumpus. " -> "Tom is a wumpus."``. This is what a
    :class:`~lightning_latent.data.records.Record` stores as its gold answer.
    """
    if not isinstance(text, str):
        raise TypeError(f"answer must be a str, got {type(text).__name__}")
    s = text
    while "<|" in s:  # until none is left: removing "<|x|>" from "<|<|x|>|>" leaves a token "<| |>"
        t = _SPECIAL_TOKEN_RE.sub(" ", s)
        if t == s:
            break
        s = t
    number = _as_number(s)
    return number if number is not None else s.strip()


def is_numeric_answer(text: str) -> bool:
    """True when ``text`` is a decimal literal, e.g. the canonical number :func:`normalize_answer` made."""
    return bool(text) and _NUMBER_RE.fullmatch(text) is not None


def extract_answer(text: str) -> str | None:
    """Return the final answer written after the LAST ``####`` / ``###`` marker, or None.

    Why the last marker: a model may emit ``###`` inside its reasoning before the final one, and the
    GSM8K solution format puts the answer after the final marker. The answer runs to the end of that
    line; special tokens (``<|eos|>``, ``<|endoftext|>``, ...) are removed first so decoded output
    such as ``"### 28 <|eos|>"`` yields ``"28"``. ``$`` signs and thousands commas are removed so
    that ``"$1,000"`` yields ``"1000"``; otherwise the answer is returned as written (``"28.0"``
    stays ``"28.0"`` in prediction files), :func:`answers_equal` does the canonicalising.

    A marker followed by nothing returns ``""`` (the model did commit to an answer, an empty one),
    which is distinct from None (no marker at all); both earn reward 0 against a non-empty gold.
    """
    idx = text.rfind("###")
    if idx < 0:
        return None
    rest = text[idx + 3 :].lstrip("#")
    # Replace (not delete) special tokens so "28<|eos|>junk" cannot fuse into "28junk".
    rest = _SPECIAL_TOKEN_RE.sub(" ", rest)
    line = rest.split("\n", 1)[0]
    return _strip_currency_and_commas(line).strip()


def _comparable(answer: str) -> tuple[float | None, str]:
    """``(float value, "")`` for a number with a finite float value, else ``(None, text form)``.

    The text form of a text answer is rule 4's (whitespace collapsed, ``$`` / thousands commas
    removed, trailing ``.`` dropped); a number too large for a float compares by its exact canonical
    decimal instead of as ``inf``.
    """
    canon = normalize_answer(answer)
    if is_numeric_answer(canon):
        x = float(canon)
        if math.isfinite(x):
            return x, ""
        return None, canon
    return None, _drop_trailing_dots(_WHITESPACE_RE.sub(" ", _strip_currency_and_commas(canon)).strip())


def answers_equal(pred: str | None, gold: str) -> bool:
    """True when ``pred`` is the same answer as ``gold`` (rule 4).

    Numeric comparison (absolute tolerance 1e-6) when both sides are numbers, because the model may
    write ``28.0`` or ``28.`` for a gold ``28``; otherwise exact match of the text forms. A missing
    prediction (None) is never correct.
    """
    if pred is None:
        return False
    (pn, ps), (gn, gs) = _comparable(pred), _comparable(gold)
    if pn is not None and gn is not None:
        return math.isclose(pn, gn, rel_tol=1e-9, abs_tol=_NUMERIC_ABS_TOL)
    return pn is None and gn is None and ps == gs


def answer_key(answer: str | None) -> str | None:
    """Hashable canonical key so that equal answers (in the :func:`answers_equal` sense) collide.

    Used for majority voting and for counting distinct answers per group. Numbers map to the repr of
    their float value rounded to 6 decimals (so ``"28"``, ``"28.0"`` and ``"$28"`` share a key);
    everything else maps to its text form. None stays None.
    """
    if answer is None:
        return None
    x, s = _comparable(answer)
    if x is None:
        return "s:" + s
    x = round(x, 6) + 0.0  # + 0.0 turns -0.0 into 0.0
    return "n:" + repr(x)
