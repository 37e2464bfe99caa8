"""lightning_latent/checkpoints.py: a module rebuilt from one of our checkpoints with its own settings, weights
and place in the schedule; older hyperparameter names upgraded (a checkpoint written before the rename,
resumed through the CLI: tests/integration/test_checkpoint_compat.py)."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_latent.checkpoints import load_module, upgrade_hparams
from lightning_latent.data.datamodule import LatentDataModule
from lightning_latent.data.layout import CurriculumConfig
from lightning_latent.model.build import ModelConfig
from lightning_latent.module import LatentReasoner
from lightning_latent.schedule import Phase

from conftest import tiny_trainer


def test_upgrade_hparams_renames_model_to_backbone():
    old = {"model": ModelConfig(n_layer=1), "batch_size": 4}
    assert upgrade_hparams(old) == {"backbone": ModelConfig(n_layer=1), "batch_size": 4}
    new = {"backbone": ModelConfig(n_layer=2), "model": "something else"}
    assert upgrade_hparams(new) is new  # already today's names: left alone


def test_load_module_rebuilds_settings_weights_and_place(tmp_path):
    L.seed_everything(0, verbose=False)
    m = LatentReasoner(backbone=ModelConfig(n_layer=1, n_embd=32, n_head=2), batch_size=4,
                       curriculum=CurriculumConfig(c_thought=1, max_latent_stage=1),
                       schedule=[Phase("cot", steps=2), Phase("coconut", steps=2, stages=[1])])
    t = tiny_trainer(tmp_path, max_steps=3)
    t.fit(m, datamodule=LatentDataModule(val_limit=4, test_limit=4, eval_batch_size=4))
    path = tmp_path / "run.ckpt"
    t.save_checkpoint(str(path))
    back = load_module(str(path))
    assert back.step_count == 3 and back.segment.kind == "coconut" and back.segment.stage == 1
    assert back.backbone_cfg.n_layer == 1 and back.hparams.batch_size == 4
    assert all(torch.equal(v, back.model.state_dict()[k]) for k, v in m.model.state_dict().items())
    assert back.tokenizer.get_vocab() == m.tokenizer.get_vocab()
    assert load_module(str(path), batch_size=2).hparams.batch_size == 2  # overrides replace saved settings
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match="not a lightning-latent checkpoint"):
        load_module(str(tmp_path / "foreign.ckpt"))
