"""The plateau rule in whole fits (lightning_latent/schedule.py's PlateauWatch inside the module): a segment
ends once validation pass@1 stops improving; later segments move up; the data stream and a resumed run
follow the shortened schedule; ``restore_best`` hands the next stage the best weights."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_latent.data.datamodule import LatentDataModule
from lightning_latent.data.layout import CurriculumConfig
from lightning_latent.model.build import ModelConfig
from lightning_latent.module import LatentReasoner
from lightning_latent.schedule import Phase

from conftest import tiny_trainer


class Trace(L.Callback):
    def __init__(self):
        self.steps: list[tuple[int, str, int, list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.pending = (pl_module.step_count, pl_module.segment.name, pl_module.segment.stage, [r.idx for r in batch])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.step_count == self.pending[0] + 1:  # trained (a batch past the end is drawn, not trained)
            self.steps.append(self.pending)


def _run(tmp_path, max_steps=None, ckpt=None):
    L.seed_everything(0, verbose=False)
    never_better = {"every": 2, "patience": 1, "min_gain": 1.0}  # ends each segment at its 2nd evaluation
    m = LatentReasoner(backbone=ModelConfig(n_layer=1, n_embd=32, n_head=2),
                       curriculum=CurriculumConfig(c_thought=1, max_latent_stage=2), batch_size=4,
                       schedule=[Phase("cot", steps=10, plateau=never_better),
                                 Phase("coconut", steps=6, stages=[1, 2], plateau=never_better)])
    trace = Trace()
    cbs = [trace]
    if max_steps is not None:
        cbs.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path), save_last=True, every_n_train_steps=1))
    t = tiny_trainer(tmp_path, enable_checkpointing=max_steps is not None, callbacks=cbs, max_steps=max_steps or -1)
    t.fit(m, datamodule=LatentDataModule(val_limit=4, test_limit=4, eval_batch_size=4), ckpt_path=ckpt)
    return m, trace


def test_segments_end_at_the_plateau_and_the_rest_moves_up(tmp_path):
    m, trace = _run(tmp_path)
    assert [(s.name, s.stage, s.start, s.steps) for s in m.segments] == [
        ("cot", 0, 0, 4), ("coconut", 1, 4, 4), ("coconut", 2, 8, 4)]
    assert m.step_count == m.total_steps == 12
    assert [(t[0], t[1], t[2]) for t in trace.steps] == [(i, "cot", 0) for i in range(4)] + \
        [(i, "coconut", 1) for i in range(4, 8)] + [(i, "coconut", 2) for i in range(8, 12)]
    ids = [i for t in trace.steps for i in t[3]]
    assert ids == list(range(len(ids)))  # the stream continues where the shortened segment stopped
    assert [h["steps_in_stage"] for h in m.plateau.history] == [2, 4, 2, 4, 2, 4]


def test_a_resumed_run_keeps_the_shortened_schedule(tmp_path):
    full, full_trace = _run(tmp_path / "full")
    _run(tmp_path / "a", max_steps=6)  # stopped inside coconut stage 1 (after cot ended early at 4)
    resumed, trace = _run(tmp_path / "b", ckpt=str(tmp_path / "a" / "last.ckpt"))
    assert [s.steps for s in resumed.segments] == [s.steps for s in full.segments]
    assert trace.steps == full_trace.steps[6:]
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


class Weights(L.Callback):
    """The model's weights after every training step, by step count."""

    def __init__(self):
        self.after: dict[int, dict] = {}
        self.before: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[pl_module.step_count] = {k: v.clone() for k, v in pl_module.model.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[pl_module.step_count] = {k: v.clone() for k, v in pl_module.model.state_dict().items()}


@pytest.mark.parametrize("restore", [False, True])
def test_restore_best_hands_the_next_stage_the_best_weights(tmp_path, restore):
    L.seed_everything(0, verbose=False)
    # ends the CoT segment at its 2nd evaluation (step 4); the 1st (step 2) is the best
    rule = {"every": 2, "patience": 1, "min_gain": 1.0, "restore_best": restore}
    m = LatentReasoner(backbone=ModelConfig(n_layer=1, n_embd=32, n_head=2),
                       curriculum=CurriculumConfig(c_thought=1, max_latent_stage=1), batch_size=4,
                       schedule=[Phase("cot", steps=10, plateau=rule), Phase("coconut", steps=2, stages=[1])])
    w = Weights()
    t = tiny_trainer(tmp_path, enable_checkpointing=False, callbacks=[w])
    t.fit(m, datamodule=LatentDataModule(val_limit=4, test_limit=4, eval_batch_size=4))
    assert [s.steps for s in m.segments] == [4, 2]
    start_of_stage1 = w.before[4]
    same_as_best = all(torch.equal(v, w.after[2][k]) for k, v in start_of_stage1.items())
    assert same_as_best is restore  # without it stage 1 starts from step 4's weights, not step 2's
    assert (m.plateau.history[1].get("restored_step") == 2) is restore
