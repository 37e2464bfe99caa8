"""A whole new task in one file, outside the package: ``toy`` ("What is 2 plus 3?" -> ``5``).

Importing this module registers it; nothing in ``lightning_latent`` names it. It brings its own word
vocabulary (a model built from scratch for it speaks only these words), shown by
``tests/test_tasks.py``.
"""
from __future__ import annotations

import random

from datasets import IterableDataset

from lightning_latent.data.records import Record
from lightning_latent.data.synthetic import SyntheticConfig
from lightning_latent.data.tasks import SourceArgs, Task, generated_source, register_task

MAX_OPERAND = 9


def toy_record(split: str, i: int) -> Record:
    """Problem ``i`` of ``split``: a pure function of both (a string-seeded RNG is stable across runs)."""
    rng = random.Random(f"toy/{split}/{i}")
    a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
    return Record(question=f"What is {a} plus {b}?", steps=(f"<<{a}+{b}={a + b}>>",), answer=str(a + b), idx=i)


def toy_vocabulary(_synthetic: SyntheticConfig) -> list[str]:
    """Every word the toy text and the Coconut layout (``\\n``, ``###``) tokenise into."""
    return ["What", "is", "plus", "?", "<<", ">>", "+", "=", "###", "\n",
            *(str(n) for n in range(2 * MAX_OPERAND + 1))]


def toy_source(split: str, args: SourceArgs) -> IterableDataset:
    return generated_source(toy_record, split, args.limit)


TOY = register_task(Task("toy", toy_source, generated=True, vocabulary=toy_vocabulary,
                         description="a test task: one addition of two digits"))
