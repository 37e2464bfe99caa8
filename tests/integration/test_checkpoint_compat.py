"""Checkpoints written by older code still rebuild (lightning_latent/checkpoints.py), start a new run and
resume through the CLI (a subprocess): one from before the ``model`` -> ``backbone`` rename
(``tests/fixtures/pre_rename``), one from before issue 20's move of the tooling and the recipe defaults
(``tests/fixtures/pre_layout``)."""
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
PRE_LAYOUT = FIXTURES / "pre_layout"


def resume_one_more_grpo_step(ck, tmp_path) -> dict:
    """``--ckpt_path ck`` with the command line of the runs that wrote both fixtures (CoT 2 steps, GRPO 1)
    and one GRPO step more: the summary of the resumed run."""
    args = [sys.executable, str(FIXTURES.parents[1] / "experiments" / "run.py"), "fit",
            "--model.backbone.n_layer", "1", "--model.backbone.n_embd", "32", "--model.backbone.n_head", "2",
            "--model.backbone.n_positions", "128", "--model.max_length", "128",
            "--model.schedule", '[{"kind":"cot","steps":2},{"kind":"grpo","steps":2,"name":"dropout_grpo"}]',
            "--model.grpo.group_size", "2", "--model.grpo_prompts", "2", "--model.grpo.beta", "0.05",
            "--data.val_limit", "4", "--data.test_limit", "4", "--data.eval_batch_size", "4",
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
            "--ckpt_path", str(ck)]
    p = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(next(tmp_path.rglob("summary.json")).read_text())


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
    assert resume_one_more_grpo_step(ck, tmp_path)["steps"] == 4


def test_checkpoint_written_before_the_tooling_moved_loads(tmp_path):
    """Written at commit 6187983 (before issue 20): it rebuilds with the settings it holds, starts a new run
    (init_from) and resumes through the CLI (--ckpt_path)."""
    from lightning_latent.rl.update import GRPOConfig

    ck = PRE_LAYOUT / "last.ckpt"
    saved = torch.load(ck, map_location="cpu", weights_only=False)["hyper_parameters"]
    m = load_module(str(ck))
    assert m.backbone_cfg.n_layer == 1 and m.step_count == 3 and m.segment.kind == "grpo"
    assert m.grpo_cfg == GRPOConfig(**saved["grpo"]) and m.grpo_cfg.group_size == 2 and m.grpo_cfg.beta == 0.05
    fresh = LatentReasoner(backbone=ModelConfig(n_layer=1, n_embd=32, n_head=2, n_positions=128), max_length=128,
                           init_from=str(ck), schedule=[Phase("grpo", steps=1)])
    assert all(torch.equal(v, fresh.model.state_dict()[k]) for k, v in m.model.state_dict().items())
    assert resume_one_more_grpo_step(ck, tmp_path)["steps"] == 4
