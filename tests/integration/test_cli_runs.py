"""The entry point end to end (``experiments/run.py`` in subprocesses): fast_dev_run, print_config, version
dirs, resume, DDP, bad config."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import GSM8K, REPO as ROOT, run_cli_cases

RUN = str(ROOT / "experiments" / "run.py")
TINY = ["--model.backbone.n_layer", "1", "--model.backbone.n_embd", "32", "--model.backbone.n_head", "2",
        "--data.val_limit", "16", "--data.test_limit", "16", "--data.eval_batch_size", "16",
        "--model.batch_size", "8", "--model.grpo_prompts", "2", "--model.grpo.group_size", "2",
        "--model.evaluation.max_new_tokens", "12", "--model.grpo.max_new_tokens", "6",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def run(args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    p = subprocess.run([sys.executable, RUN, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=e)
    if p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nSTDOUT:\n{p.stdout[-3000:]}\nSTDERR:\n{p.stderr[-5000:]}")
    return p


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


@pytest.mark.slow
def test_fast_dev_run_default(tmp_path):
    """The README's fast_dev_run command, with the embedded default model: one batch of every phase."""
    p = run(["fit", "--trainer.fast_dev_run=true"], tmp_path)
    assert "Trainer.fit" in p.stdout + p.stderr or p.returncode == 0


def test_print_config_lists_schedule(tmp_path):
    p = run(["fit", "--print_config"], tmp_path)
    assert "perturb:" in p.stdout and "arm: dropout_shared" in p.stdout and "curriculum:" in p.stdout


SCHED = '[{"kind":"cot","steps":3},{"kind":"coconut","steps":2,"stages":[1,2]},{"kind":"grpo","steps":3,"name":"dropout_grpo"}]'


@pytest.mark.slow
def test_fit_writes_version_dir_and_summary_then_resumes(tmp_path):
    args = ["fit", *TINY, "--model.schedule", SCHED, "--trainer.val_check_interval", "4",
            "--trainer.log_every_n_steps", "1", "--checkpoint.every_n_train_steps", "1"]
    run(args, tmp_path)
    v0 = tmp_path / "logs" / "default" / "version_0"
    for f in ("config.yaml", "env.json", "summary.json", "checkpoints/last.ckpt"):
        assert (v0 / f).exists(), f
    env = json.loads((v0 / "env.json").read_text())
    assert env["packages"]["torch"] and "cpu_count" in env
    summary = json.loads((v0 / "summary.json").read_text())
    assert [r["phase"] for r in summary["phases"]] == ["cot", "coconut", "dropout_grpo"]
    assert summary["checks"][0]["check"] == "dropout_grpo above coconut (test pass@1, paired)"
    coconut, grpo = summary["phases"][1], summary["phases"][2]
    # paired on the same 16 test problems: the mean per-problem difference is the difference of the means
    assert grpo["test_paired_n"] == 16
    assert grpo["test_paired_diff"] == pytest.approx(grpo["test_pass@1"] - coconut["test_pass@1"])
    for r in summary["phases"]:
        assert r["test_n"] == 16 and 0.0 <= r["test_pass@1"] <= 1.0 and "test_ci95" in r
    ck = torch.load(v0 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ck["schedule_state"]["step_count"] == 10 and ck["schedule_state"]["kind"] == "grpo"
    assert "tokenizer" in ck

    # A second run gets its own version directory (the config saver never overwrites).
    full = scalars(v0)["train/loss"]
    # Stop after step 4 (mid-curriculum: coconut stage 1), then resume from that checkpoint.
    stop_args = ["fit", *TINY, "--model.schedule", SCHED, "--trainer.val_check_interval", "4",
                 "--trainer.log_every_n_steps", "1", "--checkpoint.every_n_train_steps", "1",
                 "--trainer.max_steps", "4"]
    run(stop_args, tmp_path)
    v1 = tmp_path / "logs" / "default" / "version_1"
    ck1 = torch.load(v1 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    st = ck1["schedule_state"]
    assert (st["step_count"], st["phase"], st["stage"], st["step_in_stage"]) == (4, "coconut", 1, 1)
    run([*args, "--ckpt_path", str(v1 / "checkpoints" / "last.ckpt")], tmp_path)
    v2 = tmp_path / "logs" / "default" / "version_2"
    resumed = dict(scalars(v2)["train/loss"])
    ck2 = torch.load(v2 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ck2["schedule_state"]["step_count"] == 10
    # Same losses as the uninterrupted run for every step after the resume point.
    full_d = dict(full)
    common = sorted(set(full_d) & set(resumed))
    assert len(common) >= 3
    for s in common:
        assert abs(full_d[s] - resumed[s]) < 1e-5, (s, full_d[s], resumed[s])
    final_full = ck["state_dict"]
    for k, v in ck2["state_dict"].items():
        if k.startswith("model."):
            assert torch.allclose(v, final_full[k], atol=1e-6), k


def test_bad_config_value_names_it(tmp_path):
    """Each refused before training with the value named (one process for the four: tests/cli_many.py)."""
    import re

    cases = [(["--model.perturb.p", "1.5"], r"perturb.p=1.5"), (["--model.grpo.group_size", "1"], r"group_size=1"),
             (["--model.perturb.sites", "[attn, ffn]"], r"unknown site 'ffn'"),
             (["--model.grpo.beta", "-0.1"], r"beta=-0.1")]
    runs = run_cli_cases([["fit", *TINY, *args] for args, _ in cases], tmp_path)
    for (args, message), r in zip(cases, runs):
        assert r["rc"] != 0 and re.search(message, r["stderr"]), (args, r["stderr"][-3000:])
    assert not list(tmp_path.glob("logs/**/*.ckpt"))  # nothing trained


def test_missing_checkpoint_and_corrupt_checkpoint(tmp_path):
    with pytest.raises(AssertionError, match=r"does not exist"):
        run(["fit", *TINY, "--model.init_from", str(tmp_path / "nope.ckpt")], tmp_path)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(AssertionError, match=r"unreadable or corrupt"):
        run(["fit", *TINY, "--model.init_from", str(bad)], tmp_path)


DDP_SCRIPT = textwrap.dedent('''
    import json, os, sys
    import lightning as L
    from lightning_latent.data.datamodule import LatentDataModule
    from lightning_latent.model.build import ModelConfig
    from lightning_latent.module import LatentReasoner
    from lightning_latent.schedule import Phase

    class Trace(L.Callback):
        def __init__(self): self.seen = []
        def on_train_batch_start(self, trainer, m, batch, i): self.seen.append([r.idx for r in batch])
        def on_train_end(self, trainer, m):
            with open(os.path.join(sys.argv[1], f"rank{trainer.global_rank}.json"), "w") as f:
                json.dump({"seen": self.seen, "steps": m.step_count}, f)

    task = sys.argv[2]
    dm = LatentDataModule(task=task, path=sys.argv[3] if len(sys.argv) > 3 else None, val_limit=8,
                          test_limit=8, eval_batch_size=8, val_size=51, shuffle_buffer=0)
    m = LatentReasoner(backbone=ModelConfig(n_layer=1, n_embd=32, n_head=2, n_positions=512),
                       schedule=[Phase("cot", steps=3), Phase("coconut", steps=2, stages=[1]),
                                 Phase("grpo", steps=2)], batch_size=4, grpo_prompts=2, max_length=512)
    m.grpo_cfg.group_size = 2; m.grpo_cfg.max_new_tokens = 4; m.eval_cfg.max_new_tokens = 8
    t = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=-1, reload_dataloaders_every_n_epochs=1,
                  check_val_every_n_epoch=None, val_check_interval=4, num_sanity_val_steps=0, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, callbacks=[Trace()])
    t.fit(m, datamodule=dm)
''')


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("task", ["synthetic", "gsm8k"])
def test_ddp_two_process_fit_disjoint_no_hang(tmp_path, task):
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    extra = []
    if task == "gsm8k":
        # The real rows (tests/fixtures/gsm8k: 300) minus the validation slice (51) are an odd count: ranks get
        # 125 and 124 rows.
        extra = [str(GSM8K)]
    p = subprocess.run([sys.executable, str(script), str(tmp_path), task, *extra], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0, p.stderr[-4000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["steps"] == r1["steps"] == 7
    assert len(r0["seen"]) == len(r1["seen"]) == 7
    s0 = {i for b in r0["seen"] for i in b}
    s1 = {i for b in r1["seen"] for i in b}
    assert s0 and s1 and not (s0 & s1)


def test_last_checkpoint_is_the_final_step(tmp_path):
    """The schedule ends at 3 + 2 + 2 x 2 = 9 optimiser steps (mu=2), not a multiple of every_n_train_steps=4:
    last.ckpt must still hold the end of the run (what `test --ckpt_path last.ckpt` and a resume use), not
    step 8 (the middle of GRPO)."""
    sched = '[{"kind":"cot","steps":3},{"kind":"coconut","steps":2,"stages":[1]},{"kind":"grpo","steps":2,"name":"g"}]'
    run(["fit", *TINY, "--model.schedule", sched, "--model.grpo.mu", "2", "--checkpoint.every_n_train_steps", "4",
         "--trainer.val_check_interval", "100"], tmp_path)
    ck = torch.load(tmp_path / "logs" / "default" / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu",
                    weights_only=False)
    assert ck["schedule_state"]["step_count"] == 7 and ck["global_step"] == 9


@pytest.mark.slow
def test_testing_a_checkpoint_under_another_schedule_names_the_mismatch(tmp_path):
    """A start trained longer by its own one-phase schedule (what the study's converged check does) and then
    tested under the full curriculum's schedule was scored at the curriculum's step 2: its CoT phase, a wrong
    number (8.1% for a 35% fully latent model). Now that is an error naming both places; the checkpoint's own
    schedule tests it."""
    floor = '[{"kind":"coconut","steps":2,"stages":[2],"name":"coconut_floor"}]'
    run(["fit", *TINY, "--model.schedule", floor, "--trainer.val_check_interval", "100"], tmp_path)
    ckpt = tmp_path / "logs" / "default" / "version_0" / "checkpoints" / "last.ckpt"
    with pytest.raises(AssertionError, match=r"'coconut_floor' \(stage 2, the latent layout\).*'cot' \(stage 0"):
        run(["test", *TINY, "--model.schedule", SCHED, "--ckpt_path", str(ckpt)], tmp_path)
    p = run(["test", *TINY, "--model.schedule", floor, "--ckpt_path", str(ckpt)], tmp_path)
    assert "test/pass@1" in p.stdout + p.stderr


def test_reference_gap_of_an_arm_without_signal_is_exactly_zero(tmp_path):
    """``scripts/reference_gap.py`` around a real ``fit``: ``none``'s advantages are all 0 and, at the phase's start,
    the reference is the policy, so every inner iteration has a log-prob gap and a gradient of exactly 0 (with a
    gradient of 1e-8, Adam would move the weights: ``docs/design.md#hazards``)."""
    out = tmp_path / "gap.json"
    args = ["fit", "--config", str(ROOT / "experiments" / "configs" / "synthetic" / "arms" / "none.yaml"), *TINY,
            "--model.grpo.mu", "2", "--model.schedule", '[{"kind": "grpo", "steps": 2, "name": "none"}]',
            "--trainer.val_check_interval", "100", "--summary.splits", "[]", "--summary.evaluate_start", "false"]
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "reference_gap.py"), str(out), "--", *args],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(p.stdout.strip().splitlines()[-1]) == report
    rows = report["iterations"]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]  # 2 GRPO steps x mu 2
    assert all(r["max_abs_advantage"] == 0.0 and r["max_abs_logp_minus_ref"] == 0.0 and r["grad_norm"] == 0.0
               for r in rows)
