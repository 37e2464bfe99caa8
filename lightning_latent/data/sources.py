"""Sources: each turns one dataset format into a streamed ``datasets.IterableDataset`` of rows
``{question: str, steps: list[str], answer: str, idx: int}`` for a split ``train`` / ``validation`` /
``test``.

* Bad rows are skipped and counted per (source, reason) in a :class:`SkipCounter` (the one passed in,
  else :data:`SKIPS`), with a WARNING summary after each full pass; with ``strict=True`` the first
  bad row raises ``ValueError`` naming the file and line (or row).
* Rows longer than the model's context are *not* checked here: the layout does that.
* A missing local file raises ``FileNotFoundError`` naming the path, when the source is built.
* Counters live in the iterating process: with DataLoader workers each worker counts its own rows.
* Under DDP use :func:`split_for_rank`; equal per-rank batch counts are enforced by the datamodule,
  not here (a streamed split can give ranks row counts that differ by one).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import datasets
import datasets.distributed
from datasets import Features, IterableDataset, List, Value

from .records import (
    BadRow,
    Record,
    SkipCounter,
    parse_coconut_json,
    parse_gsm8k,
    parse_gsm8k_aug,
    raise_or_count,
)
from .synthetic import SyntheticConfig, synthetic_record

__all__ = [
    "FEATURES",
    "SKIPS",
    "SPLITS",
    "gsm8k_source",
    "gsm8k_aug_source",
    "coconut_json_source",
    "synthetic_source",
    "split_for_rank",
    "record_to_row",
    "row_to_record",
]

SPLITS = ("train", "validation", "test")
FEATURES = Features(
    {
        "question": Value("string"),
        "steps": List(Value("string")),
        "answer": Value("string"),
        "idx": Value("int64"),
    }
)
#: Default counter for sources built without one.
SKIPS = SkipCounter()
DEFAULT_SYNTHETIC_EVAL_SIZE = 500

PathLike = str | os.PathLike


def record_to_row(r: Record) -> dict:
    return {"question": r.question, "steps": list(r.steps), "answer": r.answer, "idx": r.idx}


def row_to_record(row: Mapping) -> Record:
    return Record(row["question"], tuple(row["steps"]), row["answer"], int(row["idx"]))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"missing data file: {path}")
    return path


def _resolve_split_file(
    path: PathLike | Mapping[str, PathLike], key: str, names: tuple[str, ...], suffix: str
) -> Path:
    """File for split ``key`` under ``path``: a mapping split -> file, a single file, or a folder
    holding ``{name}{suffix}`` (or exactly one ``*_{name}{suffix}``, as in Coconut's ``prosqa_train.json``)."""
    if isinstance(path, Mapping):
        if key not in path:
            raise FileNotFoundError(f"no file given for split {key!r} (got {sorted(path)})")
        return _require_file(Path(path[key]))
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"missing data path: {p}")
    for name in names:
        if (p / f"{name}{suffix}").is_file():
            return p / f"{name}{suffix}"
        prefixed = sorted(p.glob(f"*_{name}{suffix}"))
        if len(prefixed) == 1:
            return prefixed[0]
    raise FileNotFoundError(f"missing data file: {p / (names[0] + suffix)}")


def _from_generator(gen, **kwargs) -> IterableDataset:
    return IterableDataset.from_generator(gen, features=FEATURES, gen_kwargs=kwargs)


def _finish(counter: SkipCounter, source: str, before: int) -> None:
    if counter.count(source) > before:
        counter.log_summary(source)


# ---------------------------------------------------------------------------------------------------
# GSM8K


def _count_jsonl_rows(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def _gen_gsm8k_jsonl(
    file: str, start: int, stop: int | None, source: str, strict: bool, counter: SkipCounter
) -> Iterator[dict]:
    before = counter.count(source)
    row_idx = -1
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row_idx += 1
            if row_idx < start:
                continue
            if stop is not None and row_idx >= stop:
                break
            try:
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise BadRow("unparsable", "invalid JSON") from e
                yield record_to_row(parse_gsm8k(row, row_idx))
            except BadRow as err:
                raise_or_count(counter, strict, source, f"{file}:{lineno}", err)
    _finish(counter, source, before)


def _load_hub(hub_name: str, config: str | None, hub_split: str, **load_kwargs) -> IterableDataset:
    try:
        dd = datasets.load_dataset(hub_name, config, streaming=True, **load_kwargs)
    except ValueError:
        # A local folder laid out like the hub (``main/train-*.parquet``) but without the README that
        # declares configs only has the "default" config: read the config's folder instead.
        if config and os.path.isdir(os.path.join(hub_name, config)):
            dd = datasets.load_dataset(hub_name, data_dir=config, streaming=True, **load_kwargs)
        else:
            raise
    return dd[hub_split]


def _gen_gsm8k_hub(
    hub_name: str,
    config: str | None,
    hub_split: str,
    start: int,
    stop: int | None,
    source: str,
    strict: bool,
    counter: SkipCounter,
    load_kwargs: tuple,
) -> Iterator[dict]:
    before = counter.count(source)
    ds = _load_hub(hub_name, config, hub_split, **dict(load_kwargs))
    if start:
        ds = ds.skip(start)
    if stop is not None:
        ds = ds.take(stop - start)
    for i, row in enumerate(ds, start=start):
        try:
            yield record_to_row(parse_gsm8k(row, i))
        except BadRow as err:
            raise_or_count(counter, strict, source, f"{hub_name}[{hub_split}] row {i}", err)
    _finish(counter, source, before)


def gsm8k_source(
    split: str,
    path: PathLike | Mapping[str, PathLike] | None = None,
    hub_name: str = "openai/gsm8k",
    config: str | None = "main",
    val_size: int = 500,
    strict: bool = False,
    counter: SkipCounter | None = None,
    **load_kwargs,
) -> IterableDataset:
    """GSM8K as a streamed split.

    ``path``: a folder with ``train.jsonl`` / ``test.jsonl``, a mapping ``{"train": f, "test": f}``,
    or one JSONL file (used as the raw split that ``split`` needs). Without ``path`` the data is
    streamed with ``datasets.load_dataset(hub_name, config, streaming=True)``; ``hub_name`` may be a
    local folder laid out like the hub (``main/train-00000-of-00001.parquet``...).

    ``validation`` is the last ``val_size`` rows of the raw train split (by row index) and ``train``
    is every row before them; ``test`` is the raw test split. ``idx`` is the row's index in its raw
    split. Extra ``load_kwargs`` go to ``load_dataset``.
    """
    _check_split(split)
    if val_size < 0:
        raise ValueError(f"val_size must be >= 0, got {val_size}")
    counter = SKIPS if counter is None else counter
    raw_split = "test" if split == "test" else "train"
    source = f"gsm8k/{split}"
    if path is not None:
        file = _resolve_split_file(path, raw_split, (raw_split,), ".jsonl")
        start, stop = 0, None
        if split != "test":
            n = _count_jsonl_rows(file)
            cut = max(n - val_size, 0)
            start, stop = (0, cut) if split == "train" else (cut, None)
        return _from_generator(
            _gen_gsm8k_jsonl, file=str(file), start=start, stop=stop, source=source, strict=strict,
            counter=counter,
        )
    start, stop = 0, None
    if split != "test":
        n = _hub_num_rows(hub_name, config, "train", load_kwargs)
        cut = max(n - val_size, 0)
        start, stop = (0, cut) if split == "train" else (cut, None)
    return _from_generator(
        _gen_gsm8k_hub, hub_name=hub_name, config=config, hub_split=raw_split, start=start, stop=stop,
        source=source, strict=strict, counter=counter, load_kwargs=tuple(sorted(load_kwargs.items())),
    )


def _hub_num_rows(hub_name: str, config: str | None, hub_split: str, load_kwargs: dict) -> int:
    """Rows of a hub split: from the dataset card's split info when present, else by streaming once."""
    ds = _load_hub(hub_name, config, hub_split, **load_kwargs)
    splits = ds.info.splits
    if splits and hub_split in splits and splits[hub_split].num_examples:
        return int(splits[hub_split].num_examples)
    cols = ds.column_names or []
    if cols:
        ds = ds.select_columns(cols[:1])
    return sum(1 for _ in ds)


# ---------------------------------------------------------------------------------------------------
# GSM8K-Aug


_AUG_NAMES = {"train": ("train",), "validation": ("valid", "validation", "val"), "test": ("test",)}


def _file_source(gen, name: str, split: str, path, suffix: str, strict: bool,
                 counter: SkipCounter | None) -> IterableDataset:
    """One split of a file-per-split format (``train`` / ``valid`` / ``test`` + suffix)."""
    _check_split(split)
    file = _resolve_split_file(path, split, _AUG_NAMES[split], suffix)
    return _from_generator(gen, file=str(file), source=f"{name}/{split}", strict=strict,
                           counter=SKIPS if counter is None else counter)


def _gen_aug(file: str, source: str, strict: bool, counter: SkipCounter) -> Iterator[dict]:
    before = counter.count(source)
    row_idx = -1
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row_idx += 1
            try:
                yield record_to_row(parse_gsm8k_aug(line, row_idx))
            except BadRow as err:
                raise_or_count(counter, strict, source, f"{file}:{lineno}", err)
    _finish(counter, source, before)


def gsm8k_aug_source(
    split: str,
    path: PathLike | Mapping[str, PathLike],
    strict: bool = False,
    counter: SkipCounter | None = None,
) -> IterableDataset:
    """GSM8K-Aug (iCoT) text: one ``question||<<...>> <<...>> #### N`` per line.

    ``path``: a folder with ``train.txt`` / ``valid.txt`` / ``test.txt``, a mapping split -> file, or
    the file of this split. Blank lines are ignored (not counted as bad rows).
    """
    return _file_source(_gen_aug, "gsm8k_aug", split, path, ".txt", strict, counter)


# ---------------------------------------------------------------------------------------------------
# Coconut JSON


def _gen_coconut(file: str, source: str, strict: bool, counter: SkipCounter) -> Iterator[dict]:
    before = counter.count(source)
    with open(file, encoding="utf-8") as f:
        try:
            rows = json.load(f)
        except ValueError as e:
            raise ValueError(f"{source}: {file} is not valid JSON: {e}") from e
    if not isinstance(rows, list):
        raise ValueError(f"{source}: {file} must hold a JSON list of rows, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        try:
            yield record_to_row(parse_coconut_json(row, i))
        except BadRow as err:
            raise_or_count(counter, strict, source, f"{file} row {i}", err)
    _finish(counter, source, before)


def coconut_json_source(
    split: str,
    path: PathLike | Mapping[str, PathLike],
    strict: bool = False,
    counter: SkipCounter | None = None,
) -> IterableDataset:
    """Coconut JSON (``[{question, steps, answer}, ...]``: ProsQA, ProntoQA, Coconut's GSM8K).

    ``path``: a folder with ``train.json`` / ``valid.json`` / ``test.json`` (or Coconut's
    ``prosqa_train.json`` style names), a mapping split -> file, or the file of this split. A missing
    file raises ``FileNotFoundError`` naming it. A file that is not a JSON list raises ``ValueError``
    when iterated (that is a broken file, not a bad row). Bad-row locations are ``file row i``.
    """
    return _file_source(_gen_coconut, "coconut_json", split, path, ".json", strict, counter)


# ---------------------------------------------------------------------------------------------------
# Synthetic


def _gen_synthetic(cfg: SyntheticConfig, split: str, start: int, size: int | None) -> Iterator[dict]:
    i = start
    while size is None or i < start + size:
        yield record_to_row(synthetic_record(cfg, split, i))
        i += 1


def synthetic_source(
    split: str, cfg: SyntheticConfig | None = None, size: int | None = None, start: int = 0
) -> IterableDataset:
    """The synthetic task: problems ``start, start+1, ...`` of ``split``.

    ``size=None`` means endless for ``train`` and :data:`DEFAULT_SYNTHETIC_EVAL_SIZE` rows for
    ``validation`` / ``test``.
    """
    _check_split(split)
    cfg = SyntheticConfig() if cfg is None else cfg
    if size is None and split != "train":
        size = DEFAULT_SYNTHETIC_EVAL_SIZE
    if size is not None and size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    return _from_generator(_gen_synthetic, cfg=cfg, split=split, start=start, size=size)


# ---------------------------------------------------------------------------------------------------
# DDP


def split_for_rank(ds: IterableDataset, rank: int, world_size: int) -> IterableDataset:
    """This rank's part of ``ds`` (``datasets.distributed.split_dataset_by_node``).

    The sources here have one shard, so each rank keeps every ``world_size``-th row starting at
    ``rank``; ranks may get row counts that differ by one. Equal per-rank batch counts (needed so DDP
    ranks do not hang at epoch end) are enforced by the datamodule, not here.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if world_size == 1:
        return ds
    return datasets.distributed.split_dataset_by_node(ds, rank=rank, world_size=world_size)
