"""lightning_latent/data/datamodule.py: training batches planned from the schedule (the same batches for any
number of DataLoader workers), evaluation records, skipped rows reported from workers, argument checks."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_latent.data.datamodule import LatentDataModule
from lightning_latent.data.synthetic import synthetic_record
from lightning_latent.schedule import Phase, Schedule, flatten

from conftest import GSM8K, write_gsm8k_folder


def test_training_batches_do_not_depend_on_dataloader_workers(tmp_path):
    from lightning_latent.data.datamodule import LatentDataModule, _PlannedBatches

    def batches(workers: int, task_kwargs: dict) -> list[list[int]]:
        dm = LatentDataModule(**task_kwargs)
        ds = _PlannedBatches(dm.source("train"), batch_size=3, n_batches=7, offset=5)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
        return [[r.idx for r in b] for b in loader]

    write_gsm8k_folder(tmp_path / "g")
    for kw in ({}, {"task": "gsm8k", "path": str(tmp_path / "g"), "val_size": 8, "shuffle_buffer": 16}):
        ref = batches(0, kw)
        assert len(ref) == 7 and all(len(b) == 3 for b in ref)
        assert batches(2, kw) == ref and batches(3, kw) == ref


def _trainer(tmp_path: Path, callbacks: list):
    import lightning as L

    return L.Trainer(accelerator="cpu", devices=1, max_epochs=-1, reload_dataloaders_every_n_epochs=1,
                     check_val_every_n_epoch=None, val_check_interval=1000, num_sanity_val_steps=0,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=callbacks)


@pytest.mark.parametrize("workers", [0, 2])
def test_skipped_rows_are_reported_with_any_number_of_workers(tmp_path, workers):
    """Bad training lines read inside DataLoader workers still reach the run's skip report."""
    from lightning_latent.data.datamodule import LatentDataModule
    from lightning_latent.data.sources import SKIPS
    from lightning_latent.model.build import ModelConfig
    from lightning_latent.module import LatentReasoner
    from lightning_latent.schedule import Phase

    SKIPS._counts.clear()
    write_gsm8k_folder(tmp_path / "g", n_train=40, bad=3)
    dm = LatentDataModule(task="gsm8k", path=str(tmp_path / "g"), val_size=4, val_limit=4, test_limit=4,
                          eval_batch_size=4, shuffle_buffer=0, num_workers=workers)
    # 12 steps x 4 records = 48 > 36 training rows: the stream wraps once; the first pass skips the three
    # bad lines (after good rows 7, 13, 19), the second pass reads 12 good rows and so meets the first again
    m = LatentReasoner(backbone=ModelConfig(n_layer=1, n_embd=32, n_head=2), schedule=[Phase("cot", steps=12)],
                       batch_size=4)
    _trainer(tmp_path, []).fit(m, datamodule=dm)
    report = dm.skip_report()
    train_skips = {k: v for k, v in report.items() if k.startswith("gsm8k")}
    assert sum(train_skips.values()) == 4, report


def test_train_loader_serves_the_rest_of_the_current_segment(tmp_path):
    """The loader built at a step serves the segment's remaining steps at its batch size, continuing the
    stream where the steps before it stopped (what a resume or a plateau-shortened segment relies on)."""
    segs = flatten([Phase("cot", steps=3), Phase("grpo", steps=2)], 1, {"sft": 4, "grpo": 2}, {"sft": 1e-3, "grpo": 1e-4})
    schedule = Schedule(segs)
    dm = LatentDataModule(val_limit=4, test_limit=4)
    with pytest.raises(RuntimeError, match="no schedule"):
        dm.train_dataloader()
    dm.follow(schedule)
    schedule.step = 1  # one CoT step done: 2 batches of 4 left, after record 3
    assert [[r.idx for r in b] for b in dm.train_dataloader()] == [[4, 5, 6, 7], [8, 9, 10, 11]]
    schedule.step = 4  # the second GRPO step: one batch of 2 prompts, after 3 x 4 + 1 x 2 records
    (batch,) = list(dm.train_dataloader())
    assert [r.idx for r in batch] == [14, 15]
    assert batch[0] == synthetic_record(dm.synthetic, "train", 14)


def test_eval_records_and_argument_checks():
    dm = LatentDataModule(task="gsm8k", path=str(GSM8K), val_size=20, val_limit=5, test_limit=3)
    val, test = dm.eval_records("validation"), dm.eval_records("test")
    assert [r.idx for r in val] == [280, 281, 282, 283, 284]  # the first 5 of the last 20 training rows
    assert [r.idx for r in test] == [0, 1, 2] and all(float(r.answer) == float(r.answer) for r in test)
    with pytest.raises(ValueError, match="num_workers=-1"):
        LatentDataModule(num_workers=-1)
    with pytest.raises(ValueError, match="eval_batch_size=0"):
        LatentDataModule(eval_batch_size=0)
    with pytest.raises(FileNotFoundError):
        LatentDataModule(task="gsm8k", path="/nonexistent/gsm8k").setup("fit")
