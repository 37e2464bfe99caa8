"""LightningDataModule: streams records; batches are plain lists of :class:`Record`.

The module (not the data) decides what a batch becomes (a curriculum example at stage k, or GRPO
prompts), so one stream serves every phase. What the training loader yields is planned by the run's
:class:`~lightning_latent.schedule.Schedule`, which the module hands over once (:meth:`LatentDataModule.follow`):
``(records per rank per step, number of steps, records already consumed on this rank)``; each Lightning
"epoch" is the rest of one schedule segment and the loader is rebuilt for the next
(``reload_dataloaders_every_n_epochs=1``). Because a position in the stream is a pure function of the
schedule's step counter, a resumed run continues at the next unseen record, and every rank yields exactly
the same number of batches (finite sources are cycled, epoch by epoch), so no rank hangs at epoch end.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import lightning as L
from datasets import IterableDataset
from torch.utils.data import DataLoader, get_worker_info
from torch.utils.data import IterableDataset as TorchIterable

from ..schedule import Schedule
from .records import Record
from .sources import SKIPS, row_to_record, split_for_rank
from .synthetic import DEFAULT_SYNTHETIC, SyntheticConfig
from .tasks import SourceArgs, get_task

log = logging.getLogger("lightning_latent.data")


class _Batch(list):
    """A training batch (a list of records) that also carries, from a DataLoader worker, the rows that
    worker skipped so far in this loader (``loader``: the loader's record offset). Every worker reads the
    whole stream, so the main process keeps the largest count per loader and sums over loaders."""

    def __init__(self, records: list[Record], loader: int = 0, skips: dict | None = None):
        super().__init__(records)
        self.loader, self.skips = loader, skips

    def __reduce__(self):
        return (_Batch, (list(self), self.loader, self.skips))


@contextmanager
def _hide_worker_info():
    """Inside a DataLoader worker, make ``get_worker_info()`` return None for a moment.

    A ``datasets.IterableDataset`` iterated in a worker gives that worker only its share of the shards
    (and nothing at all when there are fewer shards than workers). Every worker here must read the
    whole stream (it yields only its own batches), so the stream is started as if in the main process."""
    from torch.utils.data._utils import worker as _worker

    saved = _worker._worker_info
    _worker._worker_info = None
    try:
        yield
    finally:
        _worker._worker_info = saved


def _whole_stream(ds) -> Iterator[dict]:
    it = iter(ds)
    with _hide_worker_info():  # the check runs when the generator starts: pull the first row inside
        try:
            first = next(it)
        except StopIteration:
            return
    yield first
    yield from it


class _PlannedBatches(TorchIterable):
    """``n_batches`` lists of ``batch_size`` records, starting after ``offset`` records, cycling the
    source (with ``set_epoch`` for shuffled sources) so the count is exact on every rank."""

    def __init__(self, ds: IterableDataset, batch_size: int, n_batches: int, offset: int):
        self.ds, self.batch_size, self.n_batches, self.offset = ds, batch_size, n_batches, offset

    def _records(self) -> Iterator[Record]:
        epoch = 0
        while True:
            self.ds.set_epoch(epoch)
            n = 0
            for row in _whole_stream(self.ds):
                n += 1
                yield row_to_record(row)
            if n == 0:
                raise ValueError("the training split yielded no usable rows (all skipped or empty)")
            epoch += 1

    def __iter__(self) -> Iterator[list[Record]]:
        # With W DataLoader workers, worker w yields batches w, w+W, ... (reading, not yielding, the
        # others): the loader takes one batch from each worker in turn, so the sequence of batches is
        # the same for any number of workers.
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        base = SKIPS.as_dict()  # a forked worker inherits the parent's counts: report only its own
        it = self._records()
        for _ in range(self.offset):
            next(it)
        for b in range(self.n_batches):
            batch = [next(it) for _ in range(self.batch_size)]
            if b % nw == wid:
                if info is None:
                    yield batch
                else:
                    own = {k: n - base.get(k, 0) for k, n in SKIPS.as_dict().items() if n > base.get(k, 0)}
                    yield _Batch(batch, self.offset, own)


class _Records(TorchIterable):
    """A list of records as an iterable dataset (so Lightning adds no distributed sampler)."""

    def __init__(self, records: list[Record]):
        self.records = records

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)


class LatentDataModule(L.LightningDataModule):
    """Train / validation / test records for one task.

    Args:
        task: a name in :data:`~lightning_latent.data.tasks.TASKS`: ``synthetic`` (built in, endless),
            ``gsm8k`` (hub ``openai/gsm8k`` or local JSONL), ``gsm8k_aug`` (``question||<<...>> #### N``
            lines), ``coconut_json`` (ProsQA / ProntoQA), or any task added with ``register_task``
            (a plain ``str``, checked against the registry, so the CLI accepts registered tasks too).
        path: local file or folder for the file-backed tasks (gsm8k: none means the hub).
        hub_name: hub id, or a local folder laid out like the hub dataset.
        val_size: GSM8K validation = the last ``val_size`` rows of train (a fixed held-out slice).
        val_limit / test_limit: evaluate on the first N rows only (None: the whole split).
        shuffle_buffer: shuffle buffer for file-backed training streams (0: source order).
        strict: raise on the first bad row instead of counting and skipping it.
        num_workers: DataLoader worker processes for the training stream (batches are identical for
            any value; evaluation loaders read in the main process).
    """

    def __init__(
        self,
        task: str = "synthetic",
        path: str | None = None,
        hub_name: str = "openai/gsm8k",
        val_size: int = 500,
        synthetic: SyntheticConfig = DEFAULT_SYNTHETIC,
        val_limit: int | None = 300,
        test_limit: int | None = 1000,
        eval_batch_size: int = 64,
        shuffle_buffer: int = 10_000,
        seed: int = 0,
        strict: bool = False,
        num_workers: int = 0,
    ):
        super().__init__()
        if get_task(task).needs_path and path is None:  # get_task: an unknown name lists the registered ones
            raise ValueError(f"data.task={task!r} needs data.path (a file or folder)")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be >= 0")
        if eval_batch_size < 1:
            raise ValueError(f"data.eval_batch_size={eval_batch_size} must be >= 1")
        self.task, self.path, self.hub_name, self.val_size = task, path, hub_name, val_size
        self.synthetic = synthetic
        self.val_limit, self.test_limit, self.eval_batch_size = val_limit, test_limit, eval_batch_size
        self.shuffle_buffer, self.seed, self.strict = shuffle_buffer, seed, strict
        self.num_workers = num_workers
        self._worker_skips: dict[int, dict[str, int]] = {}
        self.skips = SKIPS
        self.schedule: Schedule | None = None
        self._eval_cache: dict[tuple, list[Record]] = {}  # (split, rank, world) -> its records, read once

    def follow(self, schedule: Schedule) -> None:
        """Plan the training loaders from ``schedule`` (the module's, handed over in its ``setup``): each
        loader serves the rest of the schedule's current segment (:meth:`~lightning_latent.schedule.Schedule.data_plan`)."""
        self.schedule = schedule

    # -- sources ------------------------------------------------------------------------------------
    def source(self, split: str) -> IterableDataset:
        """The stream of ``split`` for this task, from the registry.

        The task is looked up by name on each call (not kept as an object) so the datamodule stays
        picklable whatever the task's functions are."""
        task = get_task(self.task)
        limit = self.val_limit if split == "validation" else self.test_limit if split == "test" else None
        ds = task.source(split, SourceArgs(path=self.path, hub_name=self.hub_name, val_size=self.val_size,
                                           synthetic=self.synthetic, strict=self.strict, limit=limit))
        if task.generated:  # already seeded and sized by `limit`: neither shuffled nor cut here
            return ds
        if split == "train" and self.shuffle_buffer > 0:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        return ds.take(limit) if limit is not None else ds

    def _rank(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def setup(self, stage: str | None = None) -> None:
        # Build the sources once so a missing file or a bad path fails here, before any training.
        splits = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",),
                  "predict": ("test",)}.get(stage or "fit", ("train", "validation", "test"))
        for s in splits:
            self.source(s)

    # -- loaders ------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        if self.schedule is None:
            raise RuntimeError("LatentDataModule has no schedule to plan training batches from: the module's "
                               "setup() hands it over (LatentReasoner does; call follow(schedule) otherwise)")
        batch_size, n_batches, offset = self.schedule.data_plan()
        rank, world = self._rank()
        ds = split_for_rank(self.source("train"), rank, world)
        return DataLoader(_PlannedBatches(ds, batch_size, n_batches, offset), batch_size=None,
                          num_workers=self.num_workers)

    def _eval_loader(self, split: str) -> DataLoader:
        # An iterable (never a sampler from Lightning: the records are already this rank's share), batches of
        # eval_batch_size records in the split's order, as the plateau and phase-end evaluations take them.
        return DataLoader(_Records(self.eval_records(split)), batch_size=self.eval_batch_size, collate_fn=list)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def eval_records(self, split: str) -> list[Record]:
        """All records of an evaluation split (this rank's share). Read once per data module and kept: every
        validation, plateau and phase-end evaluation of a run reads the same problems (a study's RL cell
        evaluates 2,000 of them ten times), and a bad row is counted as skipped once, not once per read."""
        rank, world = self._rank()
        key = (split, rank, world)
        if key not in self._eval_cache:
            self._eval_cache[key] = [row_to_record(r) for r in split_for_rank(self.source(split), rank, world)]
        return self._eval_cache[key]

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, _Batch):
            seen = self._worker_skips.setdefault(batch.loader, {})
            for k, n in (batch.skips or {}).items():
                seen[k] = max(seen.get(k, 0), n)
        return batch

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        """Batches are lists of Records: the module's steps build tensors and move them themselves."""
        return batch

    def skip_report(self) -> dict[str, int]:
        """Rows skipped so far, per ``source/reason``: this process's counts plus the training workers'
        (the workers' own counts are lost with them otherwise)."""
        total = dict(self.skips.as_dict())
        for counts in self._worker_skips.values():
            for k, n in (counts or {}).items():
                total[k] = total.get(k, 0) + n
        return dict(sorted(total.items()))
