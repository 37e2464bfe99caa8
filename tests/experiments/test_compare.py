"""lightning_latent/experiments/compare.py: run comparison from TensorBoard event files (hyperparameters from
the HParams summary or hparams.yaml), and the comparison notebook."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lightning_latent.experiments import compare

from conftest import REPO


def write_run(path: Path, values: dict[str, list[tuple[int, float]]], hparams: dict | None = None) -> None:
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hp_summary

    w = SummaryWriter(str(path))
    for tag, pts in values.items():
        for step, v in pts:
            w.add_scalar(tag, v, step)
    if hparams is not None:
        for s in hp_summary(hparams, {"final/val/pass@1": values["val/pass@1"][-1][1]}):
            w._get_file_writer().add_summary(s)
    w.close()


@pytest.fixture()
def known_logs(tmp_path) -> Path:
    root = tmp_path / "logs"
    write_run(root / "arm_a" / "version_0",
              {"val/pass@1": [(2, 0.2), (4, 0.5), (6, 0.4)], "train/loss": [(1, 3.0), (2, 1.0), (3, 2.0)]},
              {"perturb.p": 0.1, "grpo.group_size": 8, "perturb.arm": "dropout_shared", "seed": 0})
    write_run(root / "arm_b" / "version_0",
              {"val/pass@1": [(2, 0.1), (4, 0.3)], "train/loss": [(1, 2.5), (2, 2.0)]},
              {"perturb.p": 0.3, "grpo.group_size": 8, "perturb.arm": "dropout_shared", "seed": 0})
    # a run without HParams data: hyperparameters from hparams.yaml
    write_run(root / "arm_c" / "version_0", {"val/pass@1": [(2, 0.7)]})
    (root / "arm_c" / "version_0" / "hparams.yaml").write_text("perturb:\n  p: 0.5\ngrpo:\n  group_size: 4\n")
    return root


def test_compare_known_logs(known_logs, tmp_path):
    runs = compare.load_runs(known_logs)
    assert [r.name for r in runs] == ["arm_a/version_0", "arm_b/version_0", "arm_c/version_0"]
    assert runs[0].hparams["perturb.p"] == pytest.approx(0.1) and runs[0].hparams["perturb.arm"] == "dropout_shared"
    assert runs[2].hparams == {"perturb.p": 0.5, "grpo.group_size": 4}
    df = compare.table(runs, ["val/pass@1", "train/loss"])
    assert list(df["run"]) == [r.name for r in runs]
    a, b, c = (df.iloc[i] for i in range(3))
    assert a["val/pass@1 final"] == pytest.approx(0.4) and a["val/pass@1 best"] == pytest.approx(0.5)
    assert a["val/pass@1 step"] == 6
    assert a["train/loss final"] == pytest.approx(2.0) and a["train/loss best"] == pytest.approx(1.0)  # min
    assert b["val/pass@1 best"] == pytest.approx(0.3) and c["val/pass@1 final"] == pytest.approx(0.7)
    assert math.isnan(c["train/loss final"])
    # only the hyperparameters that differ are columns by default
    assert "perturb.p" in df.columns and "grpo.group_size" in df.columns and "seed" in df.columns
    df2 = compare.table(runs[:2], ["val/pass@1"])
    assert "perturb.p" in df2.columns and "grpo.group_size" not in df2.columns

    out = tmp_path / "cmp"
    assert compare.main([str(known_logs), "--out", str(out), "--metrics", "val/pass@1", "train/loss",
                         "--scalars", "val/pass@1", "train/loss"]) == 0
    csv = pd.read_csv(out / "runs.csv")
    assert csv["val/pass@1 best"].tolist() == pytest.approx([0.5, 0.3, 0.7])
    md = (out / "runs.md").read_text()
    assert md.startswith("| run |") and "arm_b/version_0" in md
    assert (out / "val_pass@1.png").stat().st_size > 1000 and (out / "train_loss.png").exists()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """The logs of a small real run: CoT, one latent stage, two GRPO steps (HParams written at fit end)."""
    root = tmp_path_factory.mktemp("logs")
    cmd = [sys.executable, str(REPO / "experiments" / "run.py"), "fit", "--model.backbone.n_layer", "1",
           "--model.backbone.n_embd", "32", "--model.backbone.n_head", "2",
           '--model.schedule=[{"kind":"cot","steps":2},{"kind":"coconut","steps":1},'
           '{"kind":"grpo","steps":2,"name":"dropout_grpo"}]',
           "--model.grpo.group_size", "2", "--model.grpo_prompts", "2", "--model.grpo.max_new_tokens", "8",
           "--model.evaluation.max_new_tokens", "16", "--trainer.val_check_interval", "1",
           "--data.val_limit", "4", "--data.test_limit", "4", "--trainer.accelerator", "cpu",
           "--trainer.enable_progress_bar", "false", "--checkpoint.save_last", "false",
           "--trainer.logger.init_args.save_dir", str(root), "--trainer.logger.init_args.name", "small"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return root


@pytest.mark.slow
def test_hparams_of_a_real_run(small_run):
    (run,) = compare.load_runs(small_run)
    # the defining settings under short names (HParams plugin), the full config from hparams.yaml
    assert run.hparams["p"] == pytest.approx(0.1) and run.hparams["perturb.p"] == pytest.approx(0.1)
    assert run.hparams["K"] == 2 and run.hparams["grpo.group_size"] == 2 and run.hparams["arm"] == "dropout_shared"
    assert not any(k.startswith("_") for k in run.hparams)
    assert "result/test_pass@1" in run.scalars and "phase/dropout_grpo/reward" in run.scalars
    assert "val/pass@1" in run.scalars and len(run.scalars["val/pass@1"]) >= 3


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(small_run, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / "compare_ablations.ipynb", as_version=4)
    env = {"LL_LOGDIR": str(small_run), "LL_COMPARE_OUT": str(tmp_path / "cmp")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert (tmp_path / "cmp" / "runs.csv").exists() and (tmp_path / "cmp" / "val_pass@1.png").exists()
    outputs = "".join(str(o.get("text", "")) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "1 runs" in outputs
