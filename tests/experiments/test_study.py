"""The ablation driver on a tiny budget: every file written, a rerun skips finished cells."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_latent.metrics import mean_and_ci95
from lightning_latent.experiments.study import score

from conftest import REPO as ROOT


def test_score_and_intervals_by_hand():
    rows = [{"correct": True, "gold": "3", "samples": ["3", "4"]},
            {"correct": False, "gold": "5", "samples": ["4", "4"]},
            {"correct": False, "gold": "7", "samples": ["7", "1"]}]
    s = score(rows, 2)
    assert s["pass@1"] == pytest.approx(1 / 3) and s["n_eval"] == 3
    # pass@2 with n=2: 1 if any sample correct -> problems 1 and 3
    assert s["pass@2"] == pytest.approx(2 / 3)
    # maj@2: ties go to the first-seen answer -> "3" (correct), "4" (wrong), "7" (correct)
    assert s["maj@2"] == pytest.approx(2 / 3)
    # sampled pass@1: the mean share of correct samples (1/2, 0, 1/2)
    assert s["sampled_pass@1"] == pytest.approx(1 / 3)
    m, h = mean_and_ci95([0.2, 0.4])  # across seeds: t quantile with df = 1
    assert m == pytest.approx(0.3) and h == pytest.approx(12.7062047 * 0.14142135623730953 / 2 ** 0.5)


@pytest.mark.slow
def test_ablate_tiny_writes_everything_and_resumes(tmp_path):
    out, work = tmp_path / "study", tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "experiments" / "ablate.py"), "--out", str(out), "--seeds", "1",
           "--budget", "tiny", "--arms", "none", "dropout_shared", "sft_continue", "--work", str(work), "--jobs", "2"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
    assert p.returncode == 0, p.stderr[-4000:]
    for f in ("results.csv", "results.md", "pass1_per_arm.png", "training_curves.png", "diversity.csv",
              "diversity.png"):
        assert (out / f).exists() and (out / f).stat().st_size > 0, f
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["arm"] for r in rows} == {"coconut_start", "none", "dropout_shared", "sft_continue"}
    for r in rows:
        assert set(r) >= {"arm", "seed", "pass@1", "maj@2", "pass@2", "frac_zero_std", "n_eval"}
        assert r["n_eval"] == "8"
    none = next(r for r in rows if r["arm"] == "none")
    assert float(none["frac_zero_std"]) == 1.0  # greedy, unperturbed: every group collapses
    div = list(csv.DictReader(open(out / "diversity.csv")))
    zero = [r for r in div if r["arm"] == "dropout_shared" and float(r["strength"]) == 0.0 and r["answers"] == "greedy"]
    assert zero and all(float(r["frac_zero_std"]) == 1.0 for r in zero)
    assert (work / "tb" / "dropout_shared" / "seed0").is_dir() and not (out / "tb").exists()
    md = (out / "results.md").read_text()
    assert "dropout_shared − temperature" not in md and "dropout_shared − coconut_start" in md
    assert "## Learning speed" in md and "step 2" in md  # validation pass@1 at the budget's step counts
    assert all("sampled_pass@1" in r for r in rows)
    # Rerun: every cell is skipped (no new run directories, nothing retrained).
    before = sorted(p.name for p in (work / "cells").glob("*.json"))
    mtimes = {p: p.stat().st_mtime for p in (work / "cells").glob("*.json")}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-4000:]
    assert sorted(p.name for p in (work / "cells").glob("*.json")) == before
    assert all(p.stat().st_mtime == t for p, t in mtimes.items())
    # On another machine: the start checkpoint is missing and one arm unfinished. The start is rebuilt
    # (same seed, same run: the same weights) and the arm trains and scores as it did the first time.
    start = Path(json.loads((work / "cells" / "coconut_s0.json").read_text())["ckpt"])
    first = json.loads((work / "cells" / "test_none_s0.json").read_text())
    start.unlink()
    for cell in ("train_none_s0.json", "test_none_s0.json"):
        (work / "cells" / cell).unlink()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-4000:]
    assert start.exists()
    again = json.loads((work / "cells" / "test_none_s0.json").read_text())
    assert again["correct"] == first["correct"] and again["pass@1"] == first["pass@1"]


def test_plateau_budget_starts_from_the_plateau_config_as_run_by_hand(tmp_path, monkeypatch):
    """The plateau start is plateau.yaml with its own validation size (its stages are judged on it), so
    the study's start is the same run as `run.py fit --config plateau.yaml` with that seed."""
    from lightning_latent.experiments.study import BUDGETS, Study

    seen = []

    def fake_run(self, args, name, version, cell, resumable=False):
        seen.append(args)
        return tmp_path / name / version

    monkeypatch.setattr(Study, "_run", fake_run)
    st = Study(tmp_path / "out", seeds=1, budget="plateau", work=tmp_path / "work")
    st.coconut(0)
    (args,) = seen
    assert args[:3] == ["fit", "--config", str(ROOT / "experiments" / "configs" / "synthetic" / "plateau.yaml")]
    assert "--data.val_limit" not in args and args[args.index("--seed_everything") + 1] == "0"
    b = BUDGETS["plateau"]
    assert b.test_limit >= 5000 and b.val_limit >= 2000 and all(n % b.val_interval == 0 for n in b.curve_steps)


@pytest.mark.slow
def test_an_unfinished_start_resumes_from_its_last_checkpoint(tmp_path):
    """A start killed mid-curriculum (here: stopped at step 3 of 6, its cell never recorded) is continued
    from its last.ckpt in the same run directory, not trained again from step 0, and ends with exactly the
    weights of an uninterrupted start."""
    from dataclasses import replace

    import torch

    from lightning_latent.experiments.study import BUDGETS, Study

    sched = '[{"kind":"cot","steps":2},{"kind":"coconut","steps":2,"stages":[1,2]}]'
    full = replace(BUDGETS["tiny"], coconut_args=["--model.schedule", sched, "--checkpoint.every_n_train_steps", "1",
                                                  "--data.test_limit", "8"])
    stopped = replace(full, coconut_args=[*full.coconut_args, "--trainer.max_steps", "3"])
    work = tmp_path / "work"
    Study(tmp_path / "out", seeds=1, budget=stopped, work=work, diversity=False).coconut(0)
    (work / "cells" / "coconut_s0.json").unlink()  # as if killed at step 3: the cell was never recorded
    ckpt = Study(tmp_path / "out", seeds=1, budget=full, work=work, diversity=False).coconut(0)

    runs = [line for line in (work / "cells" / "coconut_s0.log").read_text().splitlines() if line.startswith("$ ")]
    assert len(runs) == 2 and "--ckpt_path" not in runs[0] and "--ckpt_path" in runs[1]  # resumed, kept one log
    resumed = torch.load(ckpt, map_location="cpu", weights_only=False)
    ref = torch.load(Study(tmp_path / "out2", seeds=1, budget=full, work=tmp_path / "work2", diversity=False).coconut(0),
                     map_location="cpu", weights_only=False)
    assert resumed["schedule_state"]["step_count"] == ref["schedule_state"]["step_count"] == 6
    assert resumed["state_dict"].keys() == ref["state_dict"].keys()
    for k, v in ref["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k


def test_a_start_whose_resume_fails_is_trained_again_from_scratch(tmp_path, monkeypatch):
    """An unreadable last.ckpt (or one from other code) costs the attempt, not the study: the cell logs a
    warning and starts again in a clean directory. Arm and test cells never resume."""
    from lightning_latent.experiments.study import Study

    st = Study(tmp_path / "out", seeds=1, budget="tiny", work=tmp_path / "work")
    vdir = st.tb / "coconut" / "seed0"
    (vdir / "checkpoints").mkdir(parents=True)
    (vdir / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    calls = []

    def fake_process(self, cell, args, name, version, logf):
        calls.append(("--ckpt_path" in args, (vdir / "checkpoints" / "last.ckpt").exists()))
        if "--ckpt_path" in args:
            raise RuntimeError(f"cell {cell} failed (exit 1); see {logf}")
        return self.tb / name / version

    monkeypatch.setattr(Study, "_run_process", fake_process)
    st.coconut(0)
    assert calls == [(True, True), (False, False)]  # resume tried, then a fresh run in an emptied directory
    calls.clear()
    (vdir / "checkpoints").mkdir(parents=True)
    (vdir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    st._run(["fit"], "coconut", "seed0", "train_none_s0")  # not resumable: straight to a fresh run
    assert calls == [(False, False)]


def test_reward_trends_in_the_report(tmp_path):
    """results.md judges each arm's training reward per seed ("learns": last 20% above the first 20% by
    > 2 SE), only for curves logged at every step."""
    from lightning_latent.experiments.study import Study

    st = Study(tmp_path / "out", seeds=2, arms=("none", "temperature"), budget="plateau", work=tmp_path / "work")

    def cell(name, rewards):
        (st.cells / f"{name}.json").write_text(json.dumps({"curves": {"grpo/reward_mean": [
            [i + 1, r] for i, r in enumerate(rewards)]}, "frac_zero_std": 0.5}))
    cell("train_temperature_s0", [0.5 + 0.002 * i + 0.01 * (-1) ** i for i in range(100)])  # rises 0.16
    cell("train_temperature_s1", [0.5 + 0.02 * i for i in range(10)])  # every 10 steps: not judged
    cell("train_none_s0", [0.7 + 0.01 * (-1) ** i for i in range(100)])  # flat
    report = st.reporter()
    trends = report.reward_trends()
    assert set(trends) == {"none", "temperature"} and set(trends["temperature"]) == {0}
    t = trends["temperature"][0]
    assert t["learns"] and t["window"] == 20 and t["last"] - t["first"] == pytest.approx(0.16)
    assert not trends["none"][0]["learns"] and trends["none"][0]["diff"] == pytest.approx(0.0, abs=1e-12)
    report.write_markdown([], {}, [])
    md = (st.out / "results.md").read_text()
    assert "## Training reward" in md and "| temperature | 1 / 1 | 0.519 -> 0.679 (" in md and "| none | 0 / 1 |" in md


def test_mean_over_seeds_matches_steps_not_positions():
    """Seeds logged at different intervals are averaged step by step, at the steps all of them logged
    (before: by list position, so step 10 of one seed was averaged with step 1 of another)."""
    from lightning_latent.experiments.study_report import mean_over_seeds

    every_step = [(i, float(i)) for i in range(1, 21)]
    every_tenth = [(10, 100.0), (20, 200.0)]
    assert mean_over_seeds([every_tenth, every_step]) == ([10, 20], [55.0, 110.0])
    assert mean_over_seeds([every_step]) == ([s for s, _ in every_step], [v for _, v in every_step])


@pytest.mark.slow
def test_cells_in_workers_give_the_numbers_of_one_process_per_cell(tmp_path):
    """The tiny budget's cells run in a long-lived worker (the default) and one process per cell: every
    cell record is the same (validation and reward curves, start validation, per-problem test correctness,
    sampled pass@1, pass@k, maj@k), and so are the chosen checkpoints' step and weights. The once-per-seed
    start validation equals what an RL cell's phase summary measured at its start (before, every arm
    evaluated it in its own cell)."""
    import torch

    from lightning_latent.experiments.study import Study

    def study(name: str, in_process: bool, start_from: Study | None = None) -> Study:
        # one arm (a masked RL cell and its test cell) beside the seed's start and supervised cells: every kind of
        # cell the worker runs; a second arm added only a second copy of the same kinds (and 25 s to CI)
        st = Study(tmp_path / name, seeds=1, arms=("dropout_shared",), budget="tiny",
                   work=tmp_path / f"{name}_work", diversity=False, in_process=in_process)
        if start_from is not None:
            # the seed's start as the worker built it: the first cell a worker runs (no earlier cell's state can
            # reach it), so rebuilding it in a process only cost CI time; every cell after it runs again here
            st.cells.mkdir(parents=True, exist_ok=True)
            shutil.copy(start_from.cells / "coconut_s0.json", st.cells / "coconut_s0.json")
        st.run()
        return st

    a = study("workers", True)
    b = study("processes", False, start_from=a)
    names = sorted(f.stem for f in a.cells.glob("*.json"))
    assert names == sorted(f.stem for f in b.cells.glob("*.json")) and "val_start_latent_s0" in names
    for name in names:
        ca, cb = json.loads((a.cells / f"{name}.json").read_text()), json.loads((b.cells / f"{name}.json").read_text())
        keep = lambda c: {k: v for k, v in c.items() if k not in ("seconds", "ckpt", "start")}  # noqa: E731
        assert keep(ca) == keep(cb), name
        if name.startswith("train_"):
            ka, kb = (torch.load(c["ckpt"], map_location="cpu", weights_only=False) for c in (ca, cb))
            assert ka["schedule_state"]["step_count"] == kb["schedule_state"]["step_count"]
            assert all(torch.equal(v, kb["state_dict"][k]) for k, v in ka["state_dict"].items()), name
    assert json.loads((a.cells / "test_dropout_shared_s0.json").read_text())["n_eval"] == 8
    # the old way: the RL cell's own phase summary evaluates the start on the same validation problems
    start = json.loads((a.cells / "coconut_s0.json").read_text())["ckpt"]
    args = [*a._arm_args(0, "dropout_shared", start, 1), "--summary.splits", '["validation"]']
    vdir = b._run(args, "old_way", "seed0", "old_way")
    row = next(r for r in json.loads((vdir / "summary.json").read_text())["phases"] if r["phase"] == "start")
    assert row["val_pass@1"] == json.loads((a.cells / "val_start_latent_s0.json").read_text())["val_pass@1"]


def test_the_converged_check_pairs_sft_continue_at_the_floor_lr_with_its_start(tmp_path):
    """Issue 22's converged check: ``sft_continue`` from the start for the RL budget's steps at the budget's
    floor lr, its final weights against the start on the same validation problems. The cell's start
    validation is the once-per-seed one, the gain is the paired mean (end minus start on the same n), and
    "converged" is a gain of at most ``converged_gain``."""
    from dataclasses import replace

    from lightning_latent.experiments.study import BUDGETS, Study

    b = replace(BUDGETS["tiny"], converged_lr=3.0e-2, converged_gain=0.01)
    st = Study(tmp_path / "out", seeds=1, arms=("none",), budget=b, work=tmp_path / "work", diversity=False)
    st.run()
    c = json.loads((st.cells / "converged_s0.json").read_text())
    assert c["start_val"] == json.loads((st.cells / "val_start_latent_s0.json").read_text())["val_pass@1"]
    assert c["val_n"] == 8 and c["lr"] == 3.0e-2 and c["steps"] == b.grpo_steps
    assert c["gain"] == pytest.approx(c["end_val"] - c["start_val"], abs=1e-9)
    assert c["converged"] == (c["gain"] <= 0.01)
    md = (st.out / "results.md").read_text()
    assert "## Converged check of each start" in md
    assert f"| 0 | 0 | {100 * c['start_val']:.1f} | {100 * c['end_val']:.1f} | {100 * c['gain']:+.2f} ± " in md
    # the tiny model at a tiny lr: the same answers, a gain of exactly 0, converged
    st2 = Study(tmp_path / "out2", seeds=1, arms=(), budget=replace(b, converged_lr=1.0e-12),
                work=tmp_path / "work2", diversity=False)
    c2 = st2.converged(0, json.loads((st.cells / "coconut_s0.json").read_text())["ckpt"])
    assert c2["gain"] == 0.0 and c2["converged"] and c2["start_val"] == c["start_val"]


@pytest.mark.slow
def test_a_start_that_fails_its_check_trains_longer_at_the_floor(tmp_path):
    """Issue 22: "a start that fails it trains longer". A check no start can pass (a gain of at most -1) makes
    the study extend the start once (max_extensions 1): its fully latent stage at the floor lr from the start's
    weights, checked again; the arms then start from the extension, the CoT arm still from the curriculum's
    CoT model, and the report lists both checks."""
    from dataclasses import replace

    import torch

    from lightning_latent.experiments.study import BUDGETS, Study

    b = replace(BUDGETS["tiny"], converged_lr=3.0e-2, converged_gain=-1.0, max_extensions=1, extension_steps=2,
                final_stage=3)
    st = Study(tmp_path / "out", seeds=1, arms=("none",), budget=b, work=tmp_path / "work", diversity=False)
    st.run()
    start = json.loads((st.cells / "start_s0.json").read_text())
    base = json.loads((st.cells / "coconut_s0.json").read_text())["ckpt"]
    ext = json.loads((st.cells / "extend_s0_x1.json").read_text())
    assert start == {"ckpt": ext["ckpt"], "extensions": 1, "converged": False}
    assert ext["from"] == base and ext["steps"] == 2 and ext["lr"] == 3.0e-2 and "/extend/seed0_x1/" in ext["ckpt"]
    c0, c1 = (json.loads((st.cells / f"{n}.json").read_text()) for n in ("converged_s0", "converged_s0_x1"))
    assert (c0["start"], c0["extension"], c1["start"], c1["extension"]) == (base, 0, ext["ckpt"], 1)
    cfg = (st.tb / "extend" / "seed0_x1" / "config.yaml").read_text()
    assert "name: coconut_floor" in cfg and "lr: 0.03" in cfg and f"init_from: {base}" in cfg
    w0, w1 = (torch.load(f, map_location="cpu", weights_only=False)["state_dict"] for f in (base, ext["ckpt"]))
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)  # it trained
    assert "init_from: " + ext["ckpt"] in (st.tb / "none" / "seed0" / "config.yaml").read_text()
    # the start's test cell scores the extension at its own stage (under the curriculum's schedule its step 2
    # would be the coconut phase's stage 1, and the test refuses such a checkpoint)
    import yaml

    sched = yaml.safe_load((st.tb / "test_coconut" / "seed0" / "config.yaml").read_text())["model"]["schedule"]
    assert [(ph["name"], ph["stages"]) for ph in sched] == [("coconut_floor", [3])]
    tested = json.loads((st.cells / "test_coconut_s0.json").read_text())
    assert tested["extension"] is True and tested["n_eval"] == b.test_limit
    # a test cell of the extended start written before the fix (no "extension" record) is not trusted
    stale = {k: v for k, v in tested.items() if k != "extension"}
    (st.cells / "test_coconut_s0.json").write_text(json.dumps({**stale, "pass@1": -1.0}))
    assert st.evaluate(0, "coconut", ext["ckpt"], None)["pass@1"] == tested["pass@1"]
    md = (st.out / "results.md").read_text()
    assert "| 0 | 0 |" in md and "| 0 | 2 |" in md and md.count("**no**") == 2


@pytest.mark.slow
def test_a_start_converged_under_its_masks_is_checked_and_repaired_masks_off(tmp_path):
    """A start trained under masks (p_train 0.2) can be converged under them and not masks off, the model
    evaluation scores (docs/results/paper_setting/: +20 points from 300 masks-off steps at p_train 0.2). With
    ``masks_off_check`` the study checks it masks off once the masked check passes, and repairs it (an extension
    with p_train 0) while that fails; the arms start from the repair, under their own masks again. The masked
    check is given as passed (a hand-written cell), the masks-off one cannot pass (a gain of at most -1)."""
    from dataclasses import replace

    import yaml

    from lightning_latent.experiments.study import BUDGETS, Study

    tiny = BUDGETS["tiny"]
    b = replace(tiny, common=[*tiny.common, "--model.perturb.p_train", "0.2"], converged_lr=3.0e-2,
                converged_gain=-1.0, max_extensions=1, extension_steps=2, final_stage=3, masks_off_check=True)
    st = Study(tmp_path / "out", seeds=1, arms=("none",), budget=b, work=tmp_path / "work", diversity=False)
    base = st.coconut(0)
    # (as the first pipeline's cells were written: no record of the start it checked, so it is trusted)
    passed = {"start_val": 0.5, "end_val": 0.5, "val_n": 8, "gain": 0.0, "gain_ci95": 0.0, "lr": 3.0e-2,
              "steps": 2, "converged": True, "extension": 0, "seconds": 0.0}
    (st.cells / "converged_s0.json").write_text(json.dumps(passed))
    st.run()
    cell = lambda n: json.loads((st.cells / f"{n}.json").read_text())  # noqa: E731
    p_train = lambda d: yaml.safe_load((st.tb / d / "config.yaml").read_text())["model"]["perturb"]["p_train"]  # noqa: E731
    off0, rep, c1, start = cell("converged_off_s0"), cell("extend_s0_x1"), cell("converged_s0_x1"), cell("start_s0")
    assert off0["masks_off"] and off0["start"] == base and not off0["converged"]
    assert rep["masks_off"] and rep["from"] == base and "/repair/seed0_x1/" in rep["ckpt"]
    assert c1["start"] == rep["ckpt"] and "masks_off" not in c1  # after the repair: the masked check first
    assert start == {"ckpt": rep["ckpt"], "extensions": 1, "converged": False, "repairs": 1, "masks_off_check": True}
    # which masks each run trained under: the start and the masked check at 0.2, the masks-off runs at 0
    assert (p_train("coconut/seed0"), p_train("converged_off/seed0"), p_train("repair/seed0_x1"),
            p_train("converged/seed0_x1"), p_train("none/seed0")) == (0.2, 0.0, 0.0, 0.2, 0.2)
    assert "init_from: " + rep["ckpt"] in (st.tb / "none" / "seed0" / "config.yaml").read_text()
    md = (st.out / "results.md").read_text()
    assert "| 0 | 0 | on |" in md and "| 0 | 0 | off |" in md and "| 0 | 2 (the last masks off) | on |" in md

    # a start cell from before the masks-off check is checked again from its cells (nothing runs again)
    (st.cells / "start_s0.json").write_text(json.dumps({"ckpt": base, "extensions": 0, "converged": True}))
    files = sorted(p.name for p in st.cells.iterdir())
    assert st.start(0) == rep["ckpt"] and sorted(p.name for p in st.cells.iterdir()) == files
    # a seed's cells from another start are refused, not mixed into its row
    (st.cells / "val_start_latent_s0.json").write_text(json.dumps({**cell("val_start_latent_s0"), "start": base}))
    with pytest.raises(RuntimeError, match="move its val_start/train/test cells"):
        st._arm_chain(0, "none", rep["ckpt"])
    with pytest.raises(RuntimeError, match="move its val_start/train/test cells"):
        st.evaluate(0, "coconut", rep["ckpt"], None)
    # an extension cell of another start or kind is refused too
    with pytest.raises(RuntimeError, match="extended"):
        st.extend(0, base, 1, masks_off=False)


def test_a_converged_budget_starts_from_the_probes_run_and_passes_each_arm_its_noise(tmp_path, monkeypatch):
    """The converged_<task> budgets (issue 22): seed 0's start is scripts/difficulty.py's probe of the task
    (the same arguments after converged.yaml), every cell gets the task and p_train, the dropout arms their
    rollout p, and an arm's test cell samples under its own noise (the start's under the shared sampler)."""
    from lightning_latent.experiments.study import BUDGETS, Study
    from lightning_latent.experiments.tasks import probe_args

    b = BUDGETS["converged_p4_20"]
    st = Study(tmp_path / "out", seeds=1, budget="converged_p4_20", work=tmp_path / "work")
    seen: list[list[str]] = []
    monkeypatch.setattr(Study, "_run", lambda self, args, name, version, cell, resumable=False: seen.append(args))
    with pytest.raises(TypeError):  # (no run happened: there is no run directory to read)
        st.coconut(0)
    args = seen[-1]
    probe = probe_args("p4_20")  # scripts/difficulty.py's run of the task, logger arguments aside
    assert args[:3] == probe[:3] == ["fit", "--config", str(ROOT / "experiments" / "configs" / "synthetic" / "converged.yaml")]
    opts, probe_opts = dict(zip(args[3::2], args[4::2])), dict(zip(probe[3::2], probe[4::2]))
    assert len(args) == len(set(args[3::2])) * 2 + 3 and len(probe) == len(probe_opts) * 2 + 3  # no key twice
    own = ("--model.perturb.p_train", "--model.perturb.unmasked_share")  # the budget's, equal to the YAML's
    assert {k: v for k, v in opts.items() if k not in own} == probe_opts
    import yaml

    converged_yaml = yaml.safe_load((ROOT / "experiments" / "configs" / "synthetic" / "converged.yaml").read_text())
    assert opts["--model.perturb.p_train"] == str(converged_yaml["model"]["perturb"]["p_train"]) == "0.1"
    assert opts["--model.perturb.unmasked_share"] == str(converged_yaml["model"]["perturb"]["unmasked_share"]) == "0.5"
    assert opts["--seed_everything"] == "0" == opts["--data.seed"] and "--data.val_limit" not in opts
    assert json.loads(opts["--data.synthetic"])["max_steps"] == 4 and opts["--model.curriculum.max_latent_stage"] == "4"
    train = dict(zip(*[iter(st._arm_args(0, "dropout_greedy", "S.ckpt", 3)[3:])] * 2))
    assert train["--model.perturb.p"] == "0.1" and train["--model.perturb.p_train"] == "0.1"
    assert "--model.perturb.p" not in dict(zip(*[iter(st._arm_args(0, "temperature", "S.ckpt", 3)[3:])] * 2))
    for arm, own in (("dropout_greedy", True), (None, False)):
        seen.clear()
        with pytest.raises(TypeError):
            st.evaluate(0, arm or "coconut", "S.ckpt", arm)
        opts = dict(zip(seen[-1][1::2], seen[-1][2::2]))
        assert (opts["--model.evaluation.perturb"] == "null") == own and opts["--model.evaluation.k"] == "8"
        assert (opts["--model.evaluation.temperature"] == "null") == own
    assert BUDGETS["converged_p4_20_pt0"].arm_args["dropout_shared"] == ["--model.perturb.p", "0.1"]
    assert BUDGETS["converged_p4_20_pt0.2"].arm_args["dropout_shared"] == ["--model.perturb.p", "0.2"]
    assert b.converged_lr == 1.0e-5 and b.own_noise and b.val_limit == 2000 and b.test_limit == 5000


def test_an_arms_test_cell_samples_under_its_own_noise(tmp_path):
    """Budget.own_noise and Budget.arm_args on the tiny budget: the arm's train and test cells get its rollout
    p, and its test cell samples pass@k with the arm's own perturber and temperature (null on the command
    line: resolved by the module to the arm's rollout temperature, here greedy)."""
    from dataclasses import replace

    import yaml

    from lightning_latent.experiments.study import BUDGETS, Study

    b = replace(BUDGETS["tiny"], own_noise=True, arm_args={"dropout_greedy": ["--model.perturb.p", "0.3"]})
    st = Study(tmp_path / "out", seeds=1, arms=("dropout_greedy",), budget=b, work=tmp_path / "work", diversity=False)
    st.run()
    cell = json.loads((st.cells / "test_dropout_greedy_s0.json").read_text())
    assert cell["n_eval"] == 8 and "pass@2" in cell and "sampled_pass@1" in cell
    for run in ("dropout_greedy", "test_dropout_greedy"):
        cfg = yaml.safe_load((st.tb / run / "seed0" / "config.yaml").read_text())
        assert cfg["model"]["perturb"]["p"] == 0.3 and cfg["model"]["perturb"]["arm"] == "dropout_greedy"
    ev = yaml.safe_load((st.tb / "test_dropout_greedy" / "seed0" / "config.yaml").read_text())["model"]["evaluation"]
    assert ev["temperature"] is None and ev["perturb"] is None
    start = yaml.safe_load((st.tb / "test_coconut" / "seed0" / "config.yaml").read_text())["model"]["evaluation"]
    assert start["temperature"] == 1.0 and start["perturb"]["arm"] == "dropout_shared"
    md = (st.out / "results.md").read_text()
    assert "under each arm's own training noise" in md and "## Compute per arm" in md
    compute = json.loads((st.cells / "train_dropout_greedy_s0.json").read_text())["compute"]
    k, prompts, steps, mu = 2, 2, b.grpo_steps, 2  # the tiny budget: 2 prompts x K=2; the recipe's mu
    assert compute["rollouts"] == steps * prompts * k and compute["optimizer_steps"] == steps * mu
    assert compute["forward_positions"] > 0 and set(compute) == {"rollouts", "forward_positions", "optimizer_steps"}


def test_study_run_finishes_a_seed_before_the_next_seeds_start(tmp_path, monkeypatch):
    """Study.run's order (one job): seed 0's start, its test and arms, then seed 1's start... A study stopped
    at a session's end has whole seeds; before 2026-12-06 every start came first (hours of starts, no arm)."""
    from lightning_latent.experiments.study import Study

    st = Study(tmp_path / "out", seeds=3, arms=("none", "temperature"), budget="tiny", work=tmp_path / "work",
               diversity=False, jobs=1)
    ran = []
    monkeypatch.setattr(Study, "start", lambda self, s: ran.append(f"start{s}") or f"ckpt{s}")
    monkeypatch.setattr(Study, "evaluate", lambda self, s, tag, ckpt, cfg: ran.append(f"test_{tag}{s}:{ckpt}"))
    monkeypatch.setattr(Study, "_arm_chain", lambda self, s, arm, ckpt: ran.append(f"{arm}{s}:{ckpt}"))
    monkeypatch.setattr(Study, "report", lambda self: None)
    st.run()
    assert ran == ["start0",  # (run's own first call: the diversity measurement's start)
                   "start0", "test_coconut0:ckpt0", "none0:ckpt0", "temperature0:ckpt0",
                   "start1", "test_coconut1:ckpt1", "none1:ckpt1", "temperature1:ckpt1",
                   "start2", "test_coconut2:ckpt2", "none2:ckpt2", "temperature2:ckpt2"]


@pytest.mark.slow
def test_a_killed_arm_training_resumes_to_exactly_the_uninterrupted_cell(tmp_path, monkeypatch):
    """An RL cell SIGKILLed at step 3 of 4 (its last checkpoint at the validation of step 2) is continued from
    that checkpoint, not trained again from step 0, and its cell is the uninterrupted one's: the same curves
    (no step counted twice in the compute sums), the same best checkpoint, bit for bit."""
    from dataclasses import replace

    import torch
    from conftest import TESTS

    import lightning_latent.experiments.study as study_mod

    monkeypatch.setattr(study_mod, "RUN_SCRIPT", TESTS / "faults_run.py")  # run.py + the text_hash reward
    arm, work = "dropout_shared", tmp_path / "work"

    def budget(kill_at=None):
        faults = [{"class_path": "faults.Faults", "init_args": {"kill_at": kill_at}}]
        return replace(study_mod.BUDGETS["tiny"], grpo_steps=4, val_interval=2, curve_steps=(2, 4), arm_args={
            arm: ["--model.grpo.reward", "text_hash", "--trainer.callbacks", json.dumps(faults)]})

    st = study_mod.Study(tmp_path / "out", seeds=1, arms=(arm,), budget=budget(), work=work, diversity=False,
                         in_process=False)
    start = st.start(0)
    ref = st.train_arm(0, arm, start)  # uninterrupted; then moved aside
    vdir, cell = st.tb / arm / "seed0", st.cells / f"train_{arm}_s0.json"
    shutil.move(vdir, tmp_path / "ref_run")
    cell.unlink()
    (st.cells / f"train_{arm}_s0.log").unlink()

    st.budget = budget(kill_at=3)
    with pytest.raises(RuntimeError, match="failed"):
        st.train_arm(0, arm, start)
    assert not cell.exists()
    killed = torch.load(vdir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert killed["schedule_state"]["step_count"] == 2
    st.budget = budget()
    got = st.train_arm(0, arm, start)

    runs = [ln for ln in (st.cells / f"train_{arm}_s0.log").read_text().splitlines() if ln.startswith("$ ")]
    assert len(runs) == 2 and "--ckpt_path" not in runs[0] and "--ckpt_path" in runs[1]
    assert got.pop("resumed") is True and "resumed" not in ref
    for r in (ref, got):
        r.pop("seconds"), r.pop("ckpt")
    assert got == ref  # curves (every step once), frac_zero_std, the compute sums, the start's validation
    assert [s for s, _ in got["curves"]["grpo/reward_mean"]] == [0, 1, 2, 3]  # (step 2 was logged twice)
    assert len({v for _, v in got["curves"]["grpo/reward_mean"]}) > 1  # a real learning signal (text_hash)
    a = torch.load(tmp_path / "ref_run" / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(vdir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert sorted(p.name for p in (vdir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]  # no best-v1


def test_sft_continue_trains_at_the_lr_its_start_ended_at(tmp_path, monkeypatch):
    """The control "training longer": at 1e-4 (the coconut.yaml starts' constant lr) by default, and at the floor
    lr for a converged start, which decayed to it (before 2026-12-06 it restarted at 1e-4, 10x its last lr:
    -10 points on seed 0 of issue 22's study, a restart rather than training longer)."""
    from lightning_latent.experiments.study import BUDGETS, Study
    from lightning_latent.experiments.tasks import FLOOR_LR

    class Seen(Exception):
        pass

    def lr_of(budget):
        def fake_run(self, args, name, version, cell, resumable=False):
            raise Seen(json.loads(args[args.index("--model.schedule") + 1])[0])

        monkeypatch.setattr(Study, "_run", fake_run)
        monkeypatch.setattr(Study, "start_val", lambda self, seed, arm, start: 0.5)
        st = Study(tmp_path / budget, seeds=1, arms=("sft_continue",), budget=budget, work=tmp_path / budget)
        with pytest.raises(Seen) as e:
            st.train_arm(0, "sft_continue", "start.ckpt")
        phase = e.value.args[0]
        assert phase["kind"] == "sft" and phase["steps"] == st.budget.grpo_steps
        return phase["lr"]

    assert lr_of("default") == 1.0e-4
    assert lr_of("converged_p4_40") == FLOOR_LR == BUDGETS["converged_p4_40"].converged_lr == 1.0e-5
    assert BUDGETS["converged_p4_40"].with_settings({"grpo": {"model.optim.grpo_lr": 1.25e-6}}).sft_lr == FLOOR_LR
    # the only default of that lr is the budget's: a command built without one (the start's 0-step validation) has it
    args = Study(tmp_path / "c", seeds=1, budget="converged_p4_40")._arm_args(0, "sft_continue", "S.ckpt", 0)
    assert json.loads(args[args.index("--model.schedule") + 1])[0]["lr"] == FLOOR_LR
