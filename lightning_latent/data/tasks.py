"""The task registry: everything the package varies on per task, in one :class:`Task` per name.

A task used to be spread over several files (a parser in ``records.py``, a source in ``sources.py``, a
name in the datamodule's ``Literal``, a rule for which tasks need ``--data.path``, a dispatch, and the
from-scratch tokenizer in ``model/build.py``). Now :class:`~lightning_latent.data.datamodule.LatentDataModule`
and :func:`~lightning_latent.model.build.build_tokenizer` only ask :data:`TASKS`, so a new task is one
file that builds a :class:`Task` and calls :func:`register_task` (in the process that runs, before the
datamodule is built)::

    from lightning_latent.data.tasks import Task, generated_source, register_task

    register_task(Task("toy", source=lambda split, args: generated_source(toy_record, split, args.limit),
                       generated=True))

Built in: ``synthetic``, ``gsm8k``, ``gsm8k_aug``, ``coconut_json`` (ProsQA, ProntoQA and Coconut's
GSM8K are ``coconut_json`` files).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from datasets import IterableDataset

from .records import (
    Record,
    SkipCounter,
    parse_coconut_json,
    parse_gsm8k,
    parse_gsm8k_aug,
)
from .sources import (
    DEFAULT_SYNTHETIC_EVAL_SIZE,
    _check_split,
    _from_generator,
    coconut_json_source,
    gsm8k_aug_source,
    gsm8k_source,
    record_to_row,
    synthetic_source,
)
from .synthetic import SyntheticConfig, synthetic_vocabulary

__all__ = [
    "SourceArgs",
    "Task",
    "TASKS",
    "register_task",
    "get_task",
    "task_names",
    "word_vocabulary",
    "generated_source",
]


@dataclass(frozen=True)
class SourceArgs:
    """What the datamodule knows that a task's source may need; each source reads only what it uses.

    One object instead of a growing keyword list, so a new datamodule setting does not change every
    source factory's signature.
    """

    path: str | None = None  #: ``--data.path``: a file or folder (file-backed tasks)
    hub_name: str = "openai/gsm8k"  #: ``--data.hub_name``: hub id or hub-layout folder
    val_size: int = 500  #: ``--data.val_size``: held-out rows at the end of train (GSM8K)
    synthetic: SyntheticConfig | None = None  #: ``--data.synthetic`` (the synthetic task)
    strict: bool = False  #: raise on the first bad row instead of counting and skipping it
    #: This split's evaluation limit (``val_limit`` / ``test_limit``; None for train). A ``generated``
    #: task sizes its evaluation splits with it; other tasks are cut by the datamodule instead.
    limit: int | None = None
    counter: SkipCounter | None = None  #: where skipped rows are counted (None: ``sources.SKIPS``)


#: ``(split, args) -> datasets.IterableDataset`` of rows ``{question, steps, answer, idx}``
#: (:data:`~lightning_latent.data.sources.FEATURES`); a ``datasets`` stream because the datamodule
#: needs its ``shuffle`` / ``take`` / ``set_epoch`` and ``split_dataset_by_node``.
SourceFactory = Callable[[str, SourceArgs], IterableDataset]


@dataclass(frozen=True)
class Task:
    """One task: how its rows are read, what it needs, and what a from-scratch model speaks.

    Attributes:
        name: the ``--data.task`` value.
        source: ``(split, args) -> IterableDataset`` for ``train`` / ``validation`` / ``test``.
        parse: the row parser the source applies (raw row, index) -> :class:`Record`, raising
            :class:`~lightning_latent.data.records.BadRow`; for tools that parse one row by hand.
            None when the source builds records itself (a generated task).
        needs_path: the task reads local files only, so ``--data.path`` is required (checked when the
            datamodule is built, not at the first batch).
        generated: the source is a seeded generator (already in random order, endless for ``train``,
            evaluation splits sized by ``args.limit`` inside the source): the datamodule neither
            shuffles it nor cuts it. False for a file / hub dataset: the datamodule shuffles ``train``
            with ``--data.shuffle_buffer`` and cuts evaluation splits to ``val_limit`` / ``test_limit``.
        vocabulary: the word vocabulary of a model built from scratch (no ``--model.name_or_path`` /
            ``--model.tokenizer``), from the run's synthetic settings (which it may ignore); the
            word-level tokenizer is built over it. None: the synthetic vocabulary, as for every task
            before the registry (a from-scratch model on GSM8K files of synthetic problems). With a
            pretrained model the model's own (HF) tokenizer is used whatever this says.
        reward: the reward this task is scored with by default (a name in
            :data:`~lightning_latent.rl.rewards.REWARDS`); informational until the module reads it
            (``--model.grpo.reward`` decides today).
        description: one line for error messages and docs.
    """

    name: str
    source: SourceFactory
    parse: Callable[[Any, int], Record] | None = None
    needs_path: bool = False
    generated: bool = False
    vocabulary: Callable[[SyntheticConfig], list[str]] | None = None
    reward: str = "exact_match"
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or self.name != self.name.strip():
            raise ValueError(f"task name must be a non-empty string without surrounding spaces, got {self.name!r}")
        if not callable(self.source):
            raise TypeError(f"task {self.name!r}: source must be callable (split, args) -> IterableDataset")


#: Every known task by name; add to it with :func:`register_task`.
TASKS: dict[str, Task] = {}


def register_task(task: Task, replace: bool = False) -> Task:
    """Add ``task`` to :data:`TASKS` and return it.

    A second, different task under a taken name raises unless ``replace=True`` (so a typo cannot
    silently shadow a built-in task); registering an equal task again (a re-imported module) is a no-op.
    """
    if not isinstance(task, Task):
        raise TypeError(f"register_task expects a Task, got {type(task).__name__}")
    old = TASKS.get(task.name)
    if old is not None and old != task and not replace:
        raise ValueError(f"task {task.name!r} is already registered; pass replace=True to override it")
    TASKS[task.name] = task
    return task


def task_names() -> list[str]:
    """Registered task names, in registration order (built-ins first)."""
    return list(TASKS)


def get_task(name: str) -> Task:
    """The registered task ``name``; an unknown name raises ``ValueError`` listing the registered ones."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"data.task={name!r} is unknown; registered tasks: {', '.join(TASKS)} "
                         "(register another with lightning_latent.data.tasks.register_task)") from None


def word_vocabulary(task: str | None, synthetic: SyntheticConfig | None = None) -> list[str]:
    """The vocabulary of a from-scratch model's word tokenizer for ``task`` (None: ``synthetic``).

    ``synthetic`` None means ``SyntheticConfig()`` (what ``build_tokenizer`` has always used then).
    """
    t = get_task("synthetic" if task is None else task)
    make = t.vocabulary or synthetic_vocabulary
    return make(SyntheticConfig() if synthetic is None else synthetic)


def _gen_records(record_fn: Callable[[str, int], Record], split: str, size: int | None) -> Iterator[dict]:
    i = 0
    while size is None or i < size:
        yield record_to_row(record_fn(split, i))
        i += 1


def generated_source(record_fn: Callable[[str, int], Record], split: str, size: int | None) -> IterableDataset:
    """A ``generated`` task's stream: rows of ``record_fn(split, 0), record_fn(split, 1), ...``.

    Sized like the synthetic task (pass ``args.limit`` as ``size``): ``size`` None means endless for
    ``train`` and :data:`~lightning_latent.data.sources.DEFAULT_SYNTHETIC_EVAL_SIZE` rows for
    ``validation`` / ``test`` (an endless evaluation split would never finish). ``record_fn`` should
    be a pure, module-level function of ``(split, i)`` so the stream replays identically on every
    rank, worker and resume.
    """
    _check_split(split)
    if size is None and split != "train":
        size = DEFAULT_SYNTHETIC_EVAL_SIZE
    if size is not None and size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    return _from_generator(_gen_records, record_fn=record_fn, split=split, size=size)


# ---------------------------------------------------------------------------------------------------
# Built-in tasks (the datamodule's former dispatch, unchanged)


def _synthetic_source(split: str, args: SourceArgs) -> IterableDataset:
    return synthetic_source(split, args.synthetic, size=args.limit)


def _gsm8k_source(split: str, args: SourceArgs) -> IterableDataset:
    return gsm8k_source(split, path=args.path, hub_name=args.hub_name, val_size=args.val_size,
                        strict=args.strict, counter=args.counter)


def _gsm8k_aug_source(split: str, args: SourceArgs) -> IterableDataset:
    return gsm8k_aug_source(split, args.path, strict=args.strict, counter=args.counter)


def _coconut_json_source(split: str, args: SourceArgs) -> IterableDataset:
    return coconut_json_source(split, args.path, strict=args.strict, counter=args.counter)


register_task(Task("synthetic", _synthetic_source, generated=True, vocabulary=synthetic_vocabulary,
                   description="built-in GSM-style arithmetic, endless and seeded"))
register_task(Task("gsm8k", _gsm8k_source, parse=parse_gsm8k,
                   description="hub openai/gsm8k, a hub-layout folder, or local train/test JSONL"))
register_task(Task("gsm8k_aug", _gsm8k_aug_source, parse=parse_gsm8k_aug, needs_path=True,
                   description="GSM8K-Aug (iCoT) lines 'question||<<...>> #### N'"))
register_task(Task("coconut_json", _coconut_json_source, parse=parse_coconut_json, needs_path=True,
                   description="Coconut JSON: ProsQA, ProntoQA, Coconut's GSM8K"))
