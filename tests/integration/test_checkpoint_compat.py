"""A checkpoint written before the ``model`` -> ``backbone`` rename (``tests/fixtures/pre_rename``) still
rebuilds (lightning_latent/checkpoints.py), starts a new run and resumes through the CLI (a subprocess)."""
from __future__ import annotations

import json
import subprocess
import sys

import torch

from lightning_latent.checkpoints import load_module
from lightning_latent.model.build import ModelConfig
from lightning_latent.module import LatentReasoner
from lightning_latent.schedule import Phase

from conftest import FIXTURES


PRE_RENAME = FIXTURES / "pre_rename"


def test_checkpoint_written_before_the_backbone_rename_loads(tmp_path):
    """A checkpoint whose hyperparameters say ``model=`` (and name the configs ``lightning_latent.module.*``)
    still rebuilds, starts a new run (init_from) and resumes under the new names (--ckpt_path)."""
    ck = PRE_RENAME / "last.ckpt"
    assert "model" in torch.load(ck, map_location="cpu", weights_only=False)["hyper_parameters"]
    m = load_module(str(ck))
    assert m.backbone_cfg.n_layer == 1 and m.step_count == 3 and m.segment.kind == "grpo"
    fresh = LatentReasoner(backbone=ModelConfig(n_layer=1, n_embd=32, n_head=2, n_positions=128), max_length=128,
                           init_from=str(ck), schedule=[Phase("grpo", steps=1)])
    assert all(torch.equal(v, fresh.model.state_dict()[k]) for k, v in m.model.state_dict().items())
    # Lightning's own loading (weights_only=True) through the CLI: one more GRPO step on top of the old run.
    args = [sys.executable, str(PRE_RENAME.parents[2] / "experiments" / "run.py"), "fit",
            "--model.backbone.n_layer", "1", "--model.backbone.n_embd", "32", "--model.backbone.n_head", "2",
            "--model.backbone.n_positions", "128", "--model.max_length", "128",
            "--model.schedule", '[{"kind":"cot","steps":2},{"kind":"grpo","steps":2,"name":"dropout_grpo"}]',
            "--model.grpo.group_size", "2", "--model.grpo_prompts", "2", "--model.grpo.beta", "0.05",
            "--data.val_limit", "4", "--data.test_limit", "4", "--data.eval_batch_size", "4",
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
            "--ckpt_path", str(ck)]
    p = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    assert summary["steps"] == 4
