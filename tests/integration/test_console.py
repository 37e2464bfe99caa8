"""The console of a tiny fit, captured as a user's file would be: plain progress lines, no warning we can
act on. Fails on a warning raised from this package and on any of the known third-party ones
(lightning_latent/quiet.py, or fixed at the cause) coming back; other third-party warning lines are
listed in the test output but do not fail it."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

# Each known warning (fixed at the cause or silenced in quiet.py) by a fragment of its text.
KNOWN = {
    "LeafSpec deprecation": "isinstance(treespec, LeafSpec)",
    "transfer_batch_to_device override": "You have overridden `transfer_batch_to_device`",
    "ModelCheckpoint manual-optimisation lecture": "Using ModelCheckpoint with manual optimization",
    "modules in eval mode": "module(s) in eval mode at the start of training",
    "weights_only unset": "`weights_only` was not set",
    "litlogger advertisement": "try installing [litlogger]",
}
WARNING_LINE = re.compile(r"^(?P<file>\S+\.py):\d+: (?P<cat>\w*Warning)\b")

TINY = ["--model.backbone.n_layer", "1", "--model.backbone.n_embd", "32", "--model.backbone.n_head", "2",
        "--model.batch_size", "8", "--model.grpo_prompts", "2", "--model.grpo.group_size", "2",
        "--data.val_limit", "8", "--data.test_limit", "8", "--data.eval_batch_size", "8",
        "--model.grpo.max_new_tokens", "6", "--model.evaluation.max_new_tokens", "8", "--trainer.accelerator", "cpu"]


def run_fit(tmp_path: Path, *extra: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PYTHONWARNINGS", None)
    # every_n_train_steps=2 saves under manual optimisation (Lightning's lecture, before StepCheckpoint);
    # the phase-end checkpoints left weights_only unset before.
    cmd = [sys.executable, str(REPO / "experiments" / "run.py"), "fit", *TINY,
           "--model.schedule", '[{"kind":"cot","steps":4},{"kind":"coconut","steps":2,"stages":[1,2]},'
           '{"kind":"grpo","steps":2,"name":"dropout_grpo"}]',
           "--checkpoint.every_n_train_steps", "2", "--trainer.default_root_dir", str(tmp_path),
           "--progress.every", "2", *extra]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    return out


def check_warnings(out: str) -> None:
    back = [name for name, frag in KNOWN.items() if frag in out]
    ours, others = [], []
    for line in out.splitlines():
        m = WARNING_LINE.match(line.strip())
        if m:
            (ours if "lightning_latent" in m["file"] else others).append(line.strip())
    if others:  # listed, not failed: a new third-party warning is for a human to judge
        print("third-party warning lines:\n" + "\n".join(others))
    assert not back, f"known warnings came back: {back}"
    assert not ours, "warnings from lightning_latent:\n" + "\n".join(ours)


@pytest.mark.slow
def test_tiny_fit_console(tmp_path):
    out = run_fit(tmp_path)
    check_warnings(out)
    # plain progress lines (the output is not a terminal): phase headers, every 2 steps, the evaluations
    assert "▶ cot: steps 0-4 of 10" in out and "▶ coconut · stage 1 (1/2): steps 4-6 of 10" in out
    assert re.search(r"\[cot\] step 2/4 \| run 2/10 \(20%\) \| \d+:\d\d:\d\d elapsed, ~\d+:\d\d:\d\d left \| loss ", out)
    assert re.search(r"\[dropout_grpo · grpo stage 4\] step 2/2 \| run 10/10 .* reward .* zero-std .* kept \d/2", out)
    assert "eval after cot: validation: 8 problems" in out and "eval after dropout_grpo: test: 8 problems" in out
    assert "Epoch" not in out  # Lightning's own bar is replaced
    # --trainer.default_root_dir puts the logs, checkpoints and summary.json under it
    v = tmp_path / "default" / "version_0"
    assert (v / "summary.json").exists() and (v / "checkpoints" / "last.ckpt").exists()
    assert not (tmp_path / "logs").exists()
