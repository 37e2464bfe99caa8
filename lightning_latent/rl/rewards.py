"""Answer extraction and rewards for GRPO (docs/design.md#grpo-loss).

The reward is the exact match of the extracted final answer against the gold answer. GSM8K style
answers follow a ``####`` marker (the dataset) or a ``###`` marker (the Coconut layout,
``... step_n \\n ### answer <eos>``); the comparison is numeric when both sides are numbers so that
``"28.0"``, ``"28"``, ``"$28"`` and ``"28."`` all count as the same answer. Extraction and comparison
(:func:`extract_answer`, :func:`answers_equal`, :func:`answer_key`, :func:`normalize_answer`) are the
rules of :mod:`lightning_latent.answers`, the same ones gold answers are parsed with.

Rewards are pluggable: anything satisfying :class:`RewardFn` can be registered in :data:`REWARDS`
and selected by name in config through :func:`get_reward`.
"""

from __future__ import annotations

from typing import Protocol

import torch

# The answer rules live in one place; re-exported here because rewards are where callers look for them.
from ..answers import answer_key, answers_equal, extract_answer, normalize_answer

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
