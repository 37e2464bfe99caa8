"""lightning_latent/callbacks.py: the phase-end checks (RL judged by the paired interval) and the environment
record (the callbacks at work in whole runs: tests/integration/test_cli_runs.py)."""
from __future__ import annotations

import pytest
import scipy.stats
import torch


def test_phase_checks_judge_rl_by_the_paired_interval():
    from lightning_latent.callbacks import phase_checks, paired_row

    rows = [{"phase": "cot", "kind": "cot", "test_pass@1": 0.5, "test_ci95": 0.04, "test_n": 500},
            {"phase": "coconut", "kind": "coconut", "test_pass@1": 0.15, "test_ci95": 0.03, "test_n": 500},
            {"phase": "dropout_grpo", "kind": "grpo", "test_pass@1": 0.118, "test_ci95": 0.028, "test_n": 500}]
    (c,) = phase_checks(rows)  # no per-problem record: reported, never judged met
    assert c["check"] == "dropout_grpo above coconut (test pass@1, paired)" and c["met"] is False
    assert "11.8% vs 15.0%, difference -3.2 points" in c["detail"] and "not judged" in c["detail"]
    assert phase_checks(rows[:2]) == []

    # 100 problems: 10 fixed, 2 broken, the rest unchanged -> +8 points, d in {-1, 0, 1}
    before = {i: i < 30 for i in range(100)}
    after = dict(before)
    for i in range(30, 40):
        after[i] = True
    after[0] = after[1] = False
    p = paired_row(before, after, "cpu")
    d = torch.tensor([float(after[i]) - float(before[i]) for i in range(100)], dtype=torch.float64)
    sd = d.std(unbiased=True).item()
    assert p["test_paired_n"] == 100 and p["test_paired_diff"] == pytest.approx(0.08)
    assert p["test_paired_ci95"] == pytest.approx(scipy.stats.t.ppf(0.975, 99) * sd / 10)  # sd / sqrt(100)
    rows[1]["test_pass@1"], rows[2]["test_pass@1"] = 0.30, 0.38
    rows[2].update(p)
    (c,) = phase_checks(rows)
    assert c["met"] is True and "paired difference +8.0 points" in c["detail"] and "n=100" in c["detail"]
    # the same marginal gain, noisier per problem (8 more fixed, 8 more broken): a wider interval
    for i in range(40, 48):
        after[i] = True
    for i in range(2, 10):
        after[i] = False
    wide = paired_row(before, after, "cpu")
    assert wide["test_paired_diff"] == pytest.approx(0.08) and wide["test_paired_ci95"] > p["test_paired_ci95"]
    # a gain whose interval covers 0 is not met
    rows[2].update(test_paired_diff=0.01, test_paired_ci95=0.02, test_paired_n=100)
    assert phase_checks(rows)[0]["met"] is False
    # only problems present in both evaluations are paired
    assert paired_row({0: True, 1: False}, {1: True, 2: True}, "cpu")["test_paired_n"] == 1


def test_environment_record_names_what_a_rerun_needs():
    import os

    from lightning_latent.callbacks import environment_record

    env = environment_record()
    assert {"packages", "git_commit", "python", "platform", "cpu", "cpu_count", "torch_threads", "gpus", "time"} <= set(env)
    assert env["packages"]["torch"] and env["packages"]["lightning"] and "numpy" in env["packages"]
    assert env["cpu_count"] == os.cpu_count() and env["torch_threads"] == torch.get_num_threads()
    assert len(env["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    # the machine's speed, so that a timing names what it was measured on
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(env["matmul_1024_fp32_gflops"], float) and env["matmul_1024_fp32_gflops"] > 0


def test_measuring_the_matmul_throughput_leaves_the_global_rng_alone():
    from lightning_latent.callbacks import matmul_gflops

    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    matmul_gflops(seconds=0.01)
    assert torch.equal(torch.rand(4), expected)


def test_paired_row_names_its_split():
    from lightning_latent.callbacks import paired_row

    row = paired_row({0: True, 1: False, 2: False}, {0: True, 1: True, 2: False}, "cpu", "val")
    assert set(row) == {"val_paired_diff", "val_paired_ci95", "val_paired_n"}
    assert row["val_paired_n"] == 3 and row["val_paired_diff"] == pytest.approx(1 / 3)


def test_compute_meter_logs_what_each_step_spent(tmp_path):
    """ComputeMeter: a CoT step runs one pass over its padded batch and takes one optimiser step; a GRPO step
    (prompts x K rollouts, mu = 2 inner iterations, a reference) takes mu steps and runs the rollouts, the
    replays and the reference; the positions are the model's (and reference's) own counters, by hand."""
    import lightning as L

    from lightning_latent.callbacks import ComputeMeter
    from lightning_latent.data.layout import train_batch

    from conftest import tiny_trainer
    from test_module import tiny_data, tiny_module
    from lightning_latent.schedule import Phase

    m = tiny_module([Phase("cot", steps=1), Phase("grpo", steps=1)])
    m.grpo_cfg.mu = 2
    logged, seen = [], {}
    log = m.log

    def recording_log(name, value, *args, **kwargs):
        if name.startswith("perf/") and name != "perf/rollouts_per_s" and name != "perf/rollout_share":
            logged.append((m.step_count, name, float(value)))
        return log(name, value, *args, **kwargs)

    m.log = recording_log

    positions, ends = {}, {}

    class Batches(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen[pl_module.step_count] = list(batch)
            positions[pl_module.step_count] = pl_module.model.positions_run

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            ref = pl_module.reference
            ends[pl_module.step_count] = (pl_module.model.positions_run, ref.model.positions_run if ref else 0)

    tiny_trainer(tmp_path, callbacks=[Batches(), ComputeMeter()]).fit(m, datamodule=tiny_data())
    import random

    b = train_batch(m.layout, seen[0], 0, True, random.Random("0/0/0"))
    cot = {n: v for s, n, v in logged if s == 1}
    assert cot == {"perf/forward_positions": float(b["input_ids"].numel()), "perf/optimizer_steps": 1.0}
    grpo = {n: v for s, n, v in logged if s == 2}
    assert grpo["perf/optimizer_steps"] == 2.0 and grpo["perf/rollouts"] == len(seen[1]) * m.grpo_cfg.group_size
    # by hand: the policy's positions in the GRPO step (rollouts and 2 replays) plus the new reference's one
    # replay of the same rollouts (its counter starts at 0)
    policy_end, ref_end = ends[2]
    policy_grpo = policy_end - positions[1]
    assert grpo["perf/forward_positions"] == policy_grpo + ref_end and 0 < ref_end < policy_grpo


def test_compute_meter_counts_a_new_reference_from_zero(tmp_path):
    """A second GRPO phase replaces the reference at its first step: that step counts the new reference's
    positions, not the difference from the old one's count (which would be negative)."""
    from lightning_latent.callbacks import ComputeMeter
    from lightning_latent.schedule import Phase

    from conftest import tiny_trainer
    from test_module import tiny_data, tiny_module

    m = tiny_module([Phase("grpo", steps=2), Phase("grpo", steps=1)])
    logged = []
    log = m.log
    m.log = lambda name, value, *a, **kw: (logged.append((name, float(value))) if name == "perf/forward_positions"
                                          else None) or log(name, value, *a, **kw)
    tiny_trainer(tmp_path, callbacks=[ComputeMeter()]).fit(m, datamodule=tiny_data())
    assert len(logged) == 3 and all(v > 0 for _, v in logged)
