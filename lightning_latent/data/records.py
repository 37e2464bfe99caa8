"""One normalised record type and one parser per source format.

Every source (GSM8K JSONL or hub rows, GSM8K-Aug lines, Coconut JSON, the synthetic task) is turned
into :class:`Record` here, so the layout, the model and the rewards never see a format-specific row.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ..answers import is_numeric_answer, normalize_answer


@dataclass(frozen=True)
class Record:
    """A reasoning problem: the question, its reasoning steps (language), and the final answer."""

    question: str
    steps: tuple[str, ...]
    answer: str
    idx: int = -1  # position of the row in its source split; -1 when unknown

log = logging.getLogger("lightning_latent.data")

__all__ = [
    "Record",
    "BadRow",
    "SkipCounter",
    "raise_or_count",
    "parse_gsm8k",
    "parse_gsm8k_aug",
    "parse_coconut_json",
]


class BadRow(ValueError):
    """A source row that cannot become a :class:`Record`.

    ``reason`` is short and machine readable (``missing_field``, ``bad_type``, ``empty_question``,
    ``no_answer``, ``non_numeric_answer``, ``empty_step``, ``unparsable``); it is the key under which
    :class:`SkipCounter` counts the row.
    """

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class SkipCounter:
    """Counts skipped rows per (source, reason); logs each skip at DEBUG and a summary at WARNING.

    A counter lives in the process that iterates the data: with DataLoader workers each worker has its
    own copy, so counts seen by the main process are only those it iterated itself.
    """

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, str]] = Counter()

    def add(self, source: str, reason: str, location: str | None = None) -> None:
        self._counts[(source, reason)] += 1
        log.debug("skipping bad row from %s at %s: %s", source, location or "?", reason)

    def count(self, source: str | None = None, reason: str | None = None) -> int:
        return sum(
            n
            for (s, r), n in self._counts.items()
            if (source is None or s == source) and (reason is None or r == reason)
        )

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def as_dict(self) -> dict[str, int]:
        """Flat ``{"source/reason": count}`` mapping, sorted by key (handy for loggers)."""
        return {f"{s}/{r}": n for (s, r), n in sorted(self._counts.items())}

    def log_summary(self, source: str | None = None) -> None:
        """One WARNING line with the counts (of ``source`` only, if given); silent when nothing was skipped."""
        items = {
            f"{s}/{r}": n for (s, r), n in sorted(self._counts.items()) if source is None or s == source
        }
        if items:
            log.warning("skipped %d bad rows: %s", sum(items.values()), items)

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"


def raise_or_count(
    counter: SkipCounter | None, strict: bool, source: str, location: str, err: BadRow
) -> None:
    """Strict mode: raise ``ValueError`` naming source, location and reason. Otherwise count the skip."""
    if strict:
        raise ValueError(f"{source}: bad row at {location}: {err.reason}") from err
    if counter is not None:
        counter.add(source, err.reason, location)
    else:
        log.debug("skipping bad row from %s at %s: %s", source, location, err.reason)


# ---------------------------------------------------------------------------------------------------
# Parsers


def _get_str(row: Any, key: str) -> str:
    if not isinstance(row, dict):
        raise BadRow("unparsable", f"row is a {type(row).__name__}, not an object")
    if key not in row or row[key] is None:
        raise BadRow("missing_field", key)
    value = row[key]
    if not isinstance(value, str):
        raise BadRow("bad_type", f"{key} is a {type(value).__name__}")
    return value


def _question(row: Any) -> str:
    q = _get_str(row, "question").strip()
    if not q:
        raise BadRow("empty_question")
    return q


def _split_at_marker(text: str) -> tuple[str, str]:
    """``(solution before, answer text after)`` the one ``####`` marker of a GSM8K-style text."""
    body, sep, tail = text.partition("####")
    if not sep:
        raise BadRow("no_answer", "no '####' marker")
    if "####" in tail:
        raise BadRow("unparsable", "several '####' markers")
    return body, tail


def _numeric_answer(tail: str) -> str:
    """The canonical number after a ``####`` marker (:func:`lightning_latent.answers.normalize_answer`)."""
    answer = normalize_answer(tail)
    if not answer:
        raise BadRow("no_answer", "nothing after '####'")
    if not is_numeric_answer(answer):
        raise BadRow("non_numeric_answer", answer[:40])
    return answer


def parse_gsm8k(row: dict, idx: int) -> Record:
    """GSM8K row ``{question, answer}`` where ``answer`` is solution lines then ``#### N``.

    Steps are the stripped non-empty lines before the ``####`` marker (calculator annotations
    ``<<a*b=c>>`` kept as they are); the answer is the text after it, normalised by
    :func:`lightning_latent.answers.normalize_answer` (the rules rewards compare by), and must be numeric.
    """
    question = _question(row)
    body, tail = _split_at_marker(_get_str(row, "answer"))
    answer = _numeric_answer(tail)
    steps = tuple(line.strip() for line in body.splitlines() if line.strip())
    return Record(question=question, steps=steps, answer=answer, idx=idx)


_EQUATION_RE = re.compile(r"<<[^<>]*>>")


def parse_gsm8k_aug(line: str, idx: int) -> Record:
    """GSM8K-Aug (iCoT) line ``question||<<a*b=c>> <<...>> #### N``.

    Steps are the ``<<...>>`` equations (each kept with its brackets); anything else between ``||``
    and ``####`` other than whitespace makes the line unparsable. The answer must be numeric.
    """
    if not isinstance(line, str):
        raise BadRow("bad_type", f"line is a {type(line).__name__}")
    line = line.strip("\r\n")
    question, sep, rest = line.rpartition("||")
    if not sep:
        raise BadRow("unparsable", "no '||' separator")
    question = question.strip()
    if not question:
        raise BadRow("empty_question")
    body, tail = _split_at_marker(rest)
    steps = tuple(_EQUATION_RE.findall(body))
    if _EQUATION_RE.sub("", body).strip():  # checked before the answer: the reason a bad row is counted under
        raise BadRow("unparsable", "text outside <<...>> equations")
    return Record(question=question, steps=steps, answer=_numeric_answer(tail), idx=idx)


def parse_coconut_json(row: dict, idx: int) -> Record:
    """Coconut JSON row ``{question, steps: [str], answer}`` (ProsQA, ProntoQA, Coconut's GSM8K).

    Steps are kept verbatim except surrounding whitespace; an empty step is a bad row. The answer goes
    through :func:`lightning_latent.answers.normalize_answer` (numbers canonical, text only stripped).
    """
    question = _question(row)
    if "steps" not in row or row["steps"] is None:
        raise BadRow("missing_field", "steps")
    raw_steps = row["steps"]
    if not isinstance(raw_steps, (list, tuple)):
        raise BadRow("bad_type", f"steps is a {type(raw_steps).__name__}")
    steps = []
    for s in raw_steps:
        if not isinstance(s, str):
            raise BadRow("bad_type", f"step is a {type(s).__name__}")
        if not s.strip():
            raise BadRow("empty_step")
        steps.append(s.strip())
    answer = normalize_answer(_get_str(row, "answer"))
    if not answer:
        raise BadRow("no_answer")
    return Record(question=question, steps=tuple(steps), answer=answer, idx=idx)
