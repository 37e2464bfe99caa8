"""Reliability: SIGKILL and resume, a kill while a checkpoint is written, bad numbers, determinism.

Each fit is a real CLI run (``tests/faults_run.py`` = experiments/run.py with ``tests/faults.py``
loaded), fp32 on CPU, one thread, a fixed seed, a tiny model. Comparisons are exact (bit-identical) unless
a tolerance is stated.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TESTS, run_cli_cases, write_gsm8k_folder

FAULTS_RUN = str(TESTS / "faults_run.py")
TINY = ["--model.backbone.n_layer", "1", "--model.backbone.n_embd", "32", "--model.backbone.n_head", "2",
        "--data.val_limit", "8", "--data.test_limit", "8", "--data.eval_batch_size", "8",
        "--model.batch_size", "4", "--model.grpo_prompts", "2", "--model.grpo.group_size", "4",
        "--model.grpo.reward", "text_hash", "--model.grpo.max_new_tokens", "4",
        "--model.evaluation.max_new_tokens", "8", "--trainer.val_check_interval", "1000",
        "--trainer.log_every_n_steps", "1", "--checkpoint.every_n_train_steps", "1",
        "--seed_everything", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false"]
# 3 CoT steps, 4 curriculum steps (stages 1 and 2, two each: "steps" is per stage), 4 GRPO steps: 11 in all.
SCHED = ('[{"kind":"cot","steps":3},{"kind":"coconut","steps":2,"stages":[1,2]},'
         '{"kind":"grpo","steps":4,"name":"dropout_grpo"}]')
TOTAL = 11


def fit(cwd: Path, *extra: str, faults: dict | None = None, expect_kill: bool = False) -> subprocess.CompletedProcess:
    args = [sys.executable, FAULTS_RUN, "fit", *TINY, "--model.schedule", SCHED, *extra]
    if faults is not None:
        args += ["--trainer.callbacks", json.dumps([{"class_path": "faults.Faults", "init_args": faults}])]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    if expect_kill:
        assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr[-3000:])
    else:
        assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return p


def version(cwd: Path, i: int) -> Path:
    return cwd / "logs" / "default" / f"version_{i}"


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def scalars(logdir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    ea.Reload()
    return {t: {e.step: e.value for e in ea.Scalars(t)} for t in ea.Tags()["scalars"]}


TIMING = ("seconds", "time", "per_s", "rollout_s")


def comparable(sc: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    return {t: v for t, v in sc.items() if not any(x in t for x in TIMING)}


def trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


CASES = {
    # killed in the curriculum: 4 steps done (3 CoT + 1 of coconut stage 1), synthetic (endless) stream
    "curriculum": (4, []),
    # killed in GRPO: 9 steps done (2 of 4 GRPO steps), file-backed GSM8K stream with a shuffle buffer
    "grpo_file": (9, ["--data.task", "gsm8k", "--data.val_size", "8", "--data.shuffle_buffer", "16"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, case):
    kill_at, data = CASES[case]
    if case == "grpo_file":
        write_gsm8k_folder(tmp_path / "gsm8k")
        data = [*data, "--data.path", str(tmp_path / "gsm8k")]
    # A: uninterrupted.  B: SIGKILL at step kill_at.  C: B resumed from its last.ckpt.
    fit(tmp_path, *data, faults={"trace": str(tmp_path / "a.jsonl")})
    fit(tmp_path, *data, faults={"trace": str(tmp_path / "b.jsonl"), "kill_at": kill_at}, expect_kill=True)
    last_b = version(tmp_path, 1) / "checkpoints" / "last.ckpt"
    assert load(last_b)["schedule_state"]["step_count"] == kill_at
    fit(tmp_path, *data, "--ckpt_path", str(last_b), faults={"trace": str(tmp_path / "c.jsonl")})
    a, c = version(tmp_path, 0), version(tmp_path, 2)

    # the data: the killed run plus the resumed one saw exactly the uninterrupted run's batches, in order
    ta, tb, tc = trace(tmp_path / "a.jsonl"), trace(tmp_path / "b.jsonl"), trace(tmp_path / "c.jsonl")
    assert [t["step"] for t in ta] == list(range(TOTAL))
    assert [t["step"] for t in tb] == list(range(kill_at))
    assert [t["step"] for t in tc] == list(range(kill_at, TOTAL))
    assert tb + tc == ta

    # the weights (and the frozen GRPO reference, and the optimiser state) at the end
    ck_a, ck_c = load(a / "checkpoints" / "last.ckpt"), load(c / "checkpoints" / "last.ckpt")
    assert ck_c["schedule_state"]["step_count"] == TOTAL
    assert ck_a["state_dict"].keys() == ck_c["state_dict"].keys()
    for k, v in ck_a["state_dict"].items():
        assert torch.equal(v, ck_c["state_dict"][k]), k
    # the metrics: every logged scalar of the steps after the resume point, and the phase-end evaluations
    sa, sc = comparable(scalars(a)), comparable(scalars(c))
    checked = 0
    for tag, series in sc.items():
        for step, value in series.items():
            assert tag in sa and step in sa[tag], (tag, step)
            assert value == sa[tag][step], (tag, step, value, sa[tag][step])
            checked += 1
    assert checked > 20
    assert "train/loss" in sc and any(t.startswith("grpo/") for t in sc)
    pa = json.loads((a / "summary.json").read_text())["phases"]
    pc = json.loads((c / "summary.json").read_text())["phases"]
    resumed_phases = {r["phase"] for r in pc}
    for r in pa:
        if r["phase"] in resumed_phases:
            rc = next(x for x in pc if x["phase"] == r["phase"])
            assert (rc["val_pass@1"], rc["test_pass@1"]) == (r["val_pass@1"], r["test_pass@1"]), r["phase"]
    if case == "grpo_file":
        # the three malformed lines are counted and reported, not silently dropped or fatal
        skipped = json.loads((a / "summary.json").read_text())["skipped_rows"]
        assert sum(skipped.values()) >= 3, skipped


@pytest.mark.slow
def test_kill_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path):
    # the checkpoint after step 6 is half written when the process is killed
    fit(tmp_path, "--trainer.max_steps", "8", faults={"kill_in_save_at": 5}, expect_kill=True)
    ckdir = version(tmp_path, 0) / "checkpoints"
    ck = load(ckdir / "last.ckpt")  # loads: the partial write never replaced it
    assert ck["schedule_state"]["step_count"] == 5
    fit(tmp_path, "--ckpt_path", str(ckdir / "last.ckpt"))
    assert load(version(tmp_path, 1) / "checkpoints" / "last.ckpt")["schedule_state"]["step_count"] == TOTAL


@pytest.mark.slow
def test_two_runs_are_bit_identical(tmp_path):
    (tmp_path / "r1").mkdir()
    (tmp_path / "r2").mkdir()
    fit(tmp_path / "r1")
    fit(tmp_path / "r2", "--data.num_workers", "2")  # the DataLoader worker count changes nothing either
    s1, s2 = comparable(scalars(version(tmp_path / "r1", 0))), comparable(scalars(version(tmp_path / "r2", 0)))
    assert s1 == s2 and len(s1) > 10
    w1 = load(version(tmp_path / "r1", 0) / "checkpoints" / "last.ckpt")["state_dict"]
    w2 = load(version(tmp_path / "r2", 0) / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.equal(v, w2[k]) for k, v in w1.items())


def _module_and_data(steps: int, max_bad: int, tmp_path: Path):
    from lightning_latent.data.datamodule import LatentDataModule
    from lightning_latent.model.build import ModelConfig
    from lightning_latent.module import LatentReasoner
    from lightning_latent.optim import OptimConfig
    from lightning_latent.schedule import Phase

    dm = LatentDataModule(val_limit=4, test_limit=4, eval_batch_size=4)
    m = LatentReasoner(backbone=ModelConfig(n_layer=1, n_embd=32, n_head=2), schedule=[Phase("cot", steps=steps)],
                       batch_size=4, optim=OptimConfig(max_bad_steps=max_bad))
    return m, dm


class _Weights:
    """Callback: a copy of one weight after every training step (keyed by the step count after it)."""

    def __init__(self):
        import lightning as L

        outer = self

        class CB(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                w = pl_module.model.lm.get_input_embeddings().weight
                outer.after[pl_module.step_count] = w.detach().clone()

        self.after: dict[int, torch.Tensor] = {}
        self.cb = CB()


def _trainer(tmp_path: Path, callbacks: list):
    import lightning as L

    return L.Trainer(accelerator="cpu", devices=1, max_epochs=-1, reload_dataloaders_every_n_epochs=1,
                     check_val_every_n_epoch=None, val_check_interval=1000, num_sanity_val_steps=0,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=callbacks)


def test_nonfinite_steps_are_skipped_counted_and_logged(tmp_path, caplog):
    from faults import NaNAt

    m, dm = _module_and_data(steps=6, max_bad=3, tmp_path=tmp_path)
    w = _Weights()
    with caplog.at_level("WARNING", logger="lightning_latent"):
        _trainer(tmp_path, [NaNAt([2, 3]), w.cb]).fit(m, datamodule=dm)
    # steps 3 and 4 (0-based 2 and 3) had NaN losses: no update, the optimiser state untouched
    assert torch.equal(w.after[3], w.after[2]) and torch.equal(w.after[4], w.after[2])
    assert not torch.equal(w.after[5], w.after[4]) and not torch.equal(w.after[2], w.after[1])
    assert all(torch.isfinite(x).all() for x in w.after.values())
    msgs = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(msgs) == 2 and "step 2" in msgs[0] and "batch [" in msgs[0]  # with the batch's record ids
    assert m.nonfinite.bad_steps == 0 and m.step_count == 6  # the count resets after a good step; the run finished


def test_too_many_nonfinite_steps_stop_with_a_checkpoint(tmp_path):
    from faults import NaNAt

    m, dm = _module_and_data(steps=8, max_bad=2, tmp_path=tmp_path)
    w = _Weights()
    with pytest.raises(RuntimeError, match=r"3 non-finite steps in a row \(limit optim.max_bad_steps=2\)"):
        _trainer(tmp_path, [NaNAt([2, 3, 4, 5, 6, 7]), w.cb]).fit(m, datamodule=dm)
    ck = load(tmp_path / "checkpoints" / "nonfinite-stop.ckpt")
    # the saved weights are those of the last good step (no update since)
    emb = next(v for k, v in ck["state_dict"].items() if k.endswith("wte.weight"))
    assert torch.equal(emb, w.after[2])


BAD_INPUTS = [
    (["--model.no_such_key", "3"], r"unrecognized arguments: --model.no_such_key"),
    (["--model.batch_size", "0"], r"batch_size=0"),
    (["--model.backbone.name_or_path", "no-such-org/no-such-model"], r"cannot load tokenizer 'no-such-org/no-such-model'"),
    (["--data.task", "gsm8k", "--data.hub_name", "no-such-org/no-such-data"], r"no-such-org/no-such-data"),
    (["--data.task", "gsm8k", "--data.path", "/nonexistent/gsm8k"], r"missing data path: /nonexistent/gsm8k"),
]


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The CLI on every bad input, in one process (tests/cli_many.py; each case as its own process reports)."""
    cwd = tmp_path_factory.mktemp("bad_inputs")
    return cwd, run_cli_cases([["fit", *TINY, *args] for args, _ in BAD_INPUTS], cwd, {"HF_HUB_OFFLINE": "1"})


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(BAD_INPUTS)), ids=[m for _, m in BAD_INPUTS])
def test_bad_config_and_unreachable_names_fail_before_training(bad_input_runs, case):
    import re

    cwd, runs = bad_input_runs
    r, message = runs[case], BAD_INPUTS[case][1]
    assert r["rc"] != 0 and re.search(message, r["stderr"]), r["stderr"][-3000:]
    assert not list(cwd.glob("logs/**/*.ckpt"))  # nothing trained
