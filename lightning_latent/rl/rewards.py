"""Answer extraction and rewards for GRPO (DESIGN.md section 2, "GRPO loss").

The reward is the exact match of the extracted final answer against the gold answer. GSM8K style
answers follow a ``####`` marker (the dataset) or a ``###`` marker (the Coconut layout,
``... step_n \\n ### answer <eos>``); the comparison is numeric when both sides are numbers so that
``"28.0"``, ``"28"``, ``"$28"`` and ``"28."`` all count as the same answer.

Rewards are pluggable: anything satisfying :class:`RewardFn` can be registered in :data:`REWARDS`
and selected by name in config through :func:`get_reward`.
"""

from __future__ import annotations

import math
import re
from typing import Protocol

import torch

__all__ = [
    "REWARDS",
    "RewardFn",
    "answer_key",
    "answers_equal",
    "exact_match_reward",
    "extract_answer",
    "get_reward",
    "normalize_answer",
]

# Special tokens as decoded by HF tokenizers: <|endoftext|>, <|eos|>, <|end-latent|>, ...
_SPECIAL_TOKEN_RE = re.compile(r"<\|[^|<>]*\|>")
# A comma between two digits is a thousands separator ("1,000"); other commas are content.
_DIGIT_COMMA_RE = re.compile(r"(?<=\d),(?=\d)")
_WHITESPACE_RE = re.compile(r"\s+")
_NUMERIC_ABS_TOL = 1e-6


def extract_answer(text: str) -> str | None:
    """Return the final answer written after the LAST ``####`` / ``###`` marker, or None.

    Why the last marker: a model may emit ``###`` inside its reasoning before the final one, and the
    GSM8K solution format puts the answer after the final marker. The answer runs to the end of that
    line; special tokens (``<|eos|>``, ``<|endoftext|>``, ...) are removed first so decoded output
    such as ``"### 28 <|eos|>"`` yields ``"28"``. ``$`` signs and thousands commas are removed so
    that ``"$1,000"`` yields ``"1000"``.

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


def _strip_currency_and_commas(s: str) -> str:
    return _DIGIT_COMMA_RE.sub("", s.replace("$", ""))


def normalize_answer(s: str) -> str:
    """Canonical textual form of an answer: special tokens, ``$`` and thousands commas removed,
    whitespace collapsed, one trailing ``.`` dropped ("28." is a sentence end, not a decimal)."""
    s = _SPECIAL_TOKEN_RE.sub(" ", s)
    s = _strip_currency_and_commas(s)
    s = _WHITESPACE_RE.sub(" ", s).strip()
    if s.endswith("."):
        s = s[:-1].rstrip()
    return s


def _as_number(s: str) -> float | None:
    """Parse a normalised answer as a finite float, else None (``"nan"``/``"inf"`` stay text)."""
    try:
        x = float(s)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def answers_equal(pred: str | None, gold: str) -> bool:
    """True when ``pred`` is the same answer as ``gold``.

    Numeric comparison (absolute tolerance 1e-6) when both sides parse as numbers, because the
    model may write ``28.0`` or ``28.`` for a gold ``28``; otherwise exact string match after
    :func:`normalize_answer`. A missing prediction (None) is never correct.
    """
    if pred is None:
        return False
    p, g = normalize_answer(pred), normalize_answer(gold)
    pn, gn = _as_number(p), _as_number(g)
    if pn is not None and gn is not None:
        return math.isclose(pn, gn, rel_tol=1e-9, abs_tol=_NUMERIC_ABS_TOL)
    return p == g


def answer_key(answer: str | None) -> str | None:
    """Hashable canonical key so that equal answers (in the :func:`answers_equal` sense) collide.

    Used for majority voting and for counting distinct answers per group. Numbers map to the repr of
    their float value rounded to 6 decimals (so ``"28"``, ``"28.0"`` and ``"$28"`` share a key);
    everything else maps to its normalised text. None stays None.
    """
    if answer is None:
        return None
    s = normalize_answer(answer)
    x = _as_number(s)
    if x is None:
        return "s:" + s
    x = round(x, 6) + 0.0  # + 0.0 turns -0.0 into 0.0
    return "n:" + repr(x)


class RewardFn(Protocol):
    """A reward: decoded completions and gold answers in, float32 rewards of shape ``[len(texts)]``
    out. Pure and batched so it can run on every rollout of a step at once."""

    def __call__(self, texts: list[str], golds: list[str]) -> torch.Tensor: ...


def exact_match_reward(texts: list[str], golds: list[str]) -> torch.Tensor:
    """1.0 where the answer extracted from ``texts[i]`` equals ``golds[i]``, else 0.0 (float32).

    ``golds`` are plain answers (e.g. ``"28"``), not solution text; they are normalised the same way
    as predictions. Raises ValueError on a length mismatch rather than silently truncating.
    """
    if len(texts) != len(golds):
        raise ValueError(f"texts and golds differ in length: {len(texts)} != {len(golds)}")
    values = [1.0 if answers_equal(extract_answer(t), g) else 0.0 for t, g in zip(texts, golds)]
    return torch.tensor(values, dtype=torch.float32)


REWARDS: dict[str, RewardFn] = {"exact_match": exact_match_reward}


def get_reward(name: str) -> RewardFn:
    """Look up a reward by its config name; unknown names raise ValueError listing the choices."""
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; choices: {sorted(REWARDS)}") from None
