"""One normalised record type and one parser per source format.

Every source (GSM8K JSONL or hub rows, GSM8K-Aug lines, Coconut JSON, the synthetic task) is turned
into :class:`Record` here, so the layout, the model and the rewards never see a format-specific row.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Record:
    """A reasoning problem: the question, its reasoning steps (language), and the final answer."""

    question: str
    steps: tuple[str, ...]
    answer: str
    idx: int = -1  # position of the row in its source split; -1 when unknown
