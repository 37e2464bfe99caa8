"""lightning_latent/experiments/hparams.py: hyperparameters flattened for TensorBoard, and the HParams data
read back from the event files of two tiny runs: the defining settings under short names (only those that
apply to the arm), per-phase metrics, and the experiment description at the log root (settings that differ
only, test pass@1 first)."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
from tensorboard.plugins.hparams import metadata

from lightning_latent.experiments import compare
from lightning_latent.experiments.hparams import flatten_hparams, write_experiment
from lightning_latent.experiments import reporting
from lightning_latent.experiments.reporting import read_events

from conftest import REPO

TINY = ["--model.backbone.n_layer", "1", "--model.backbone.n_embd", "32", "--model.backbone.n_head", "2",
        "--model.batch_size", "8", "--model.grpo_prompts", "2", "--data.val_limit", "4", "--data.test_limit", "4",
        "--data.eval_batch_size", "4", "--model.grpo.max_new_tokens", "4", "--model.evaluation.max_new_tokens", "8",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--checkpoint.save_last", "false",
        "--model.schedule", '[{"kind":"grpo","steps":2,"name":"rl"}]']


def experiment_of(acc):
    from tensorboard.plugins.hparams import metadata

    content = acc.PluginTagToContent("hparams")
    return metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hp")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name, arm, k in (("none", "none", 2), ("dropout", "dropout_shared", 3)):
        cmd = [sys.executable, str(REPO / "experiments" / "run.py"), "fit",  # the config first: TINY overrides it
               "--config", str(REPO / "experiments" / "configs" / "synthetic" / "arms" / f"{arm}.yaml"), *TINY,
               "--model.grpo.group_size", str(k), "--trainer.default_root_dir", str(root),
               "--trainer.logger.init_args.name", name]
        r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return root


@pytest.mark.slow
def test_hparams_read_back(two_runs):
    none = reporting.hparams_from_plugin(read_events(two_runs / "none" / "version_0"))
    drop = reporting.hparams_from_plugin(read_events(two_runs / "dropout" / "version_0"))
    assert drop["arm"] == "dropout_shared" and drop["p"] == pytest.approx(0.1) and drop["K"] == 3
    assert drop["sites"] and drop["scope"] and drop["task"] == "synthetic" and "seed" in drop and "lr" in drop
    assert none["arm"] == "none" and none["K"] == 2 and "beta" in none and "mu" in none and "prompts" in none
    assert "p" not in none and "sites" not in none  # meaningless for an arm without dropout masks
    assert not any("." in k for k in drop)  # short names only
    acc = read_events(two_runs / "dropout" / "version_0")
    tags = acc.Tags()["scalars"]
    for t in ("result/test_pass@1", "result/val_pass@1", "result/reward", "result/frac_zero_std",
              "phase/rl/val_pass@1", "phase/rl/test_pass@1", "phase/rl/reward", "phase/rl/frac_zero_std"):
        assert t in tags, t
    assert not any(t.startswith(("final/", "best/")) for t in tags)  # no final/train/loss for a GRPO run
    assert metadata.EXPERIMENT_TAG not in acc.PluginTagToContent("hparams")  # one description, at the root
    exp = experiment_of(read_events(two_runs))  # written by the runs themselves
    assert [m.name.tag for m in exp.metric_infos][:2] == ["result/test_pass@1", "result/val_pass@1"]


@pytest.mark.slow
def test_experiment_at_the_root(two_runs):
    for old in two_runs.glob("events.out.tfevents.*"):
        old.unlink()
    path = write_experiment(two_runs)
    assert path is not None and path.parent == two_runs
    exp = experiment_of(read_events(two_runs))
    names = [h.name for h in exp.hparam_infos]
    assert set(names) == {"arm", "p", "K"}  # what differs; sites, scope, task, seed, lr ... equal: left out
    assert all(h.differs for h in exp.hparam_infos)
    assert exp.metric_infos[0].name.tag == "result/test_pass@1" and exp.metric_infos[0].display_name == "test_pass@1"
    # the root file is no run for compare, and a second call replaces it
    assert [r.name for r in compare.load_runs(two_runs)] == ["dropout/version_0", "none/version_0"]
    write_experiment(two_runs)
    assert len(list(two_runs.glob("events.out.tfevents.*"))) == 1
    df = compare.table(compare.load_runs(two_runs))
    assert list(df.columns[1:4]) == ["arm", "p", "K"]


def test_flatten_hparams():
    @dataclass
    class Inner:
        p: float = 0.1
        sites: list = field(default_factory=lambda: ["attn", "mlp"])

    flat = flatten_hparams({"perturb": Inner(), "init_from": None, "schedule": [{"kind": "grpo", "steps": 4}]})
    assert flat == {"perturb.p": 0.1, "perturb.sites": '["attn", "mlp"]', "init_from": "None",
                    "schedule": '[{"kind": "grpo", "steps": 4}]'}
