"""Built-in synthetic GSM-style task: seeded, endless, with exactly disjoint splits.

A problem is a short arithmetic story over a small fixed vocabulary, e.g.::

    Tom has 12 apples. Tom buys 7 more. Tom gives away 5. Tom doubles them.
    How many apples does Tom have?

with steps ``<<12+7=19>>``, ``<<19-5=14>>``, ``<<14*2=28>>`` and answer ``28``.

* :func:`synthetic_record` is a pure function of ``(cfg, split, i)``: its RNG is seeded from a SHA-256
  of those values (never Python's salted ``hash``).
* Every problem belongs to exactly one split, decided by a SHA-256 of its question text (independent
  of ``cfg.seed``); generation rejection-samples until the problem falls in the requested split, so
  the same question can never appear in two splits, whatever the seeds.
* All numbers (operands, intermediates, answer) are non-negative integers <= ``cfg.max_value`` (at most :data:`MAX_VALUE`);
  multiplication is by 2..4 only.
* Text tokenises with :data:`TOKEN_PATTERN` into words of :func:`synthetic_vocabulary` only.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from .records import Record

__all__ = [
    "SyntheticConfig",
    "DEFAULT_SYNTHETIC",
    "synthetic_record",
    "synthetic_vocabulary",
    "split_of_question",
    "TOKEN_PATTERN",
    "MAX_VALUE",
    "SPLITS",
]

#: The word-level tokenisation rule (also used by :func:`lightning_latent.data.tokenizer.build_word_tokenizer`).
TOKEN_PATTERN = r"\d+|[A-Za-z]+|<<|>>|###|\S"
MAX_VALUE = 999
SPLITS = ("train", "validation", "test")
#: Share of the problem space per split, in percent (hash bucket 0..99).
_SPLIT_BUCKETS = {"train": range(0, 80), "validation": range(80, 90), "test": range(90, 100)}
_MUL_WORDS = {2: "doubles", 3: "triples", 4: "quadruples"}
_ADD_TEMPLATES = ("{name} buys {b} more.", "{name} finds {b} more.")
_SUB_TEMPLATES = ("{name} gives away {b}.", "{name} loses {b}.")
_MUL_TEMPLATE = "{name} {verb} them."
_START_TEMPLATE = "{name} has {a} {item}."
_QUESTION_TEMPLATE = "How many {item} does {name} have?"
_MAX_TRIES = 100_000


@dataclass(frozen=True)
class SyntheticConfig:
    """Difficulty knobs of the synthetic task.

    ``min_steps``..``max_steps`` operations per problem (uniform), the starting amount and every added
    or subtracted amount in ``1..max_number``, operators drawn from ``operators`` (a subset of ``+-*``).
    """

    seed: int = 0
    min_steps: int = 3
    max_steps: int = 3
    max_number: int = 40
    max_value: int = 99  # every intermediate and the answer stay in 0..max_value (a problem is redrawn otherwise)
    operators: str = "+-*"
    names: tuple[str, ...] = ("Tom", "Ann", "Sam", "Mia")
    items: tuple[str, ...] = ("apples", "pens", "cards", "coins")

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if not 1 <= self.max_number <= MAX_VALUE:
            raise ValueError(f"max_number must be in 1..{MAX_VALUE}, got {self.max_number}")
        if not self.max_number <= self.max_value <= MAX_VALUE:
            raise ValueError(f"max_value must be in max_number..{MAX_VALUE}, got {self.max_value}")
        if not self.operators or set(self.operators) - set("+-*"):
            raise ValueError(f"operators must be a non-empty subset of '+-*', got {self.operators!r}")
        for w in (*self.names, *self.items):
            if not re.fullmatch(r"[A-Za-z]+", w):
                raise ValueError(f"names and items must be single ASCII words, got {w!r}")
        if not self.names or not self.items:
            raise ValueError("names and items must be non-empty")


#: The run's synthetic settings when none are given: the one place both ``LatentDataModule`` and
#: ``LatentReasoner`` take their default from (they must agree, since the model's word vocabulary is
#: built from it). ``SyntheticConfig`` is frozen, so sharing one instance as a default is safe.
DEFAULT_SYNTHETIC = SyntheticConfig(max_number=20, max_value=60)


def _stable_int(*parts: object) -> int:
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big")


def split_of_question(question: str) -> str:
    """The split a problem belongs to, from a stable hash of its question text (seed independent)."""
    bucket = _stable_int("lightning_latent.synthetic.split", question) % 100
    for name, buckets in _SPLIT_BUCKETS.items():
        if bucket in buckets:
            return name
    raise AssertionError(bucket)  # pragma: no cover


def _draw(cfg: SyntheticConfig, rng: random.Random) -> tuple[str, tuple[str, ...], str] | None:
    """One candidate problem, or None when a value leaves 0..cfg.max_value (caller resamples)."""
    name = rng.choice(cfg.names)
    item = rng.choice(cfg.items)
    value = rng.randint(1, cfg.max_number)
    sentences = [_START_TEMPLATE.format(name=name, a=value, item=item)]
    steps = []
    for _ in range(rng.randint(cfg.min_steps, cfg.max_steps)):
        op = rng.choice(cfg.operators)
        if op == "+":
            b = rng.randint(1, cfg.max_number)
            result = value + b
            sentences.append(rng.choice(_ADD_TEMPLATES).format(name=name, b=b))
        elif op == "-":
            b = rng.randint(1, cfg.max_number)
            result = value - b
            sentences.append(rng.choice(_SUB_TEMPLATES).format(name=name, b=b))
        else:
            b = rng.randint(2, 4)
            result = value * b
            sentences.append(_MUL_TEMPLATE.format(name=name, verb=_MUL_WORDS[b]))
        if not 0 <= result <= cfg.max_value:
            return None
        steps.append(f"<<{value}{op}{b}={result}>>")
        value = result
    sentences.append(_QUESTION_TEMPLATE.format(item=item, name=name))
    return " ".join(sentences), tuple(steps), str(value)


def synthetic_record(cfg: SyntheticConfig, split: str, i: int) -> Record:
    """The ``i``-th problem of ``split``: a pure function of ``(cfg, split, i)``."""
    if split not in _SPLIT_BUCKETS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if i < 0:
        raise ValueError(f"index must be >= 0, got {i}")
    rng = random.Random(_stable_int("lightning_latent.synthetic", cfg.seed, split, i))
    for _ in range(_MAX_TRIES):
        drawn = _draw(cfg, rng)
        if drawn is None:
            continue
        question, steps, answer = drawn
        if split_of_question(question) == split:
            return Record(question=question, steps=steps, answer=answer, idx=i)
    raise RuntimeError(f"no valid synthetic problem after {_MAX_TRIES} draws; loosen {cfg}")


def synthetic_vocabulary(cfg: SyntheticConfig) -> list[str]:
    """Every token :data:`TOKEN_PATTERN` can produce on synthetic text (and the layout's ``\\n``).

    Words of the templates, names and items, punctuation, the numbers ``"0"..str(cfg.max_value)``, the equation
    symbols ``<< >> + - * =``, the answer marker ``###`` and the step separator ``"\\n"``. Sorted order
    is fixed: words, then symbols, then numbers, so ids are stable for a given config.
    """
    templates = (*_ADD_TEMPLATES, *_SUB_TEMPLATES, _MUL_TEMPLATE, _START_TEMPLATE, _QUESTION_TEMPLATE)
    words: set[str] = set(cfg.names) | set(cfg.items) | set(_MUL_WORDS.values())
    for t in templates:
        words.update(re.findall(TOKEN_PATTERN, re.sub(r"\{\w+\}", " ", t)))
    symbols = ["<<", ">>", "+", "-", "*", "=", "###", ".", "?", "\n"]
    words -= set(symbols)
    return sorted(words) + symbols + [str(n) for n in range(cfg.max_value + 1)]

