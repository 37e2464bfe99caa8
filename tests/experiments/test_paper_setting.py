"""Issue 22's pipeline (experiments/paper_setting.py): its choice rules by hand, the settings it hands the
study, and the grids it asks the sweep driver for."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from lightning_latent.experiments.paper_setting import (ADOPTED, RECIPE_LRS, PaperSetting, choose_noise,
                                                        choose_p_train, choose_recipe, edge_lr, missing_grid_points,
                                                        more_seeds_needed, primary_intervals, rl_gain)
from lightning_latent.experiments.study import BUDGETS, Study
from lightning_latent.experiments.sweep.space import load_sweep_config
from lightning_latent.metrics import t975


def test_rl_gain_is_the_best_validation_minus_the_start():
    cell = {"start_val": 0.40, "curves": {"val/pass@1": [(25, 0.38), (50, 0.47), (75, 0.45)]}}
    assert rl_gain(cell) == pytest.approx(0.07)
    with pytest.raises(ValueError, match="no validation curve"):
        rl_gain({"start_val": 0.4, "curves": {}})


def test_p_train_rule_largest_gain_ties_to_the_lower_rate():
    assert choose_p_train({0.05: 0.02, 0.1: 0.05, 0.2: 0.01}) == 0.1
    assert choose_p_train({0.05: 0.03, 0.1: 0.03, 0.2: 0.01}) == 0.05
    with pytest.raises(ValueError):
        choose_p_train({})


def test_p_train_rule_takes_only_starts_in_the_band_else_the_nearest():
    gains = {0.05: 0.02, 0.1: 0.05, 0.2: 0.01}
    assert choose_p_train(gains, {0.05: 0.45, 0.1: 0.84, 0.2: 0.30}) == 0.05  # 0.1's larger gain is out
    assert choose_p_train(gains, {0.05: 0.62, 0.1: 0.84, 0.2: 0.70}) == 0.05  # none in: the nearest
    assert choose_p_train(gains, {0.05: 0.40, 0.1: 0.50, 0.2: 0.30}) == 0.1  # all in: the gain decides


def _trials(rows):
    return pd.DataFrame([{"state": "COMPLETE", **r} for r in rows])


def test_recipe_is_chosen_on_the_mean_over_the_three_arms():
    rows = []
    # lr 5e-5 / off: the best single trial (0.9) but a worse mean (0.9 + 0.3 + 0.3) / 3 = 0.5
    # lr 1e-4 / on: no single trial above 0.6, mean (0.6 + 0.6 + 0.6) / 3 = 0.6 -> chosen
    for lr, ds, vals in ((5e-5, False, (0.9, 0.3, 0.3)), (1e-4, True, (0.6, 0.6, 0.6))):
        for arm, v in zip(("temperature", "dropout_shared", "dropout_greedy"), vals):
            rows.append({"value": v, "params_model.perturb.arm": arm, "params_model.optim.grpo_lr": lr,
                         "params_model.grpo.dynamic_sampling": ds})
    # a point missing an arm is never chosen, however good
    rows.append({"value": 0.99, "params_model.perturb.arm": "temperature", "params_model.optim.grpo_lr": 2e-5,
                 "params_model.grpo.dynamic_sampling": False})
    assert choose_recipe(_trials(rows)) == {"model.optim.grpo_lr": 1e-4, "model.grpo.dynamic_sampling": True}


def test_noise_is_chosen_per_arm_ties_to_the_lower_value():
    df = _trials([{"value": v, "params_model.perturb.arm": a, "params_model.perturb.p": p}
                  for a, p, v in (("dropout_shared", 0.05, 0.5), ("dropout_shared", 0.1, 0.7), ("dropout_shared", 0.2, 0.6),
                                  ("dropout_greedy", 0.05, 0.4), ("dropout_greedy", 0.1, 0.4), ("dropout_greedy", 0.2, 0.3))])
    assert choose_noise(df, "model.perturb.p") == {"dropout_shared": 0.1, "dropout_greedy": 0.05}
    t = _trials([{"value": v, "params_model.grpo.answer_temperature": x} for x, v in ((0.7, 0.5), (1.3, 0.6))])
    assert choose_noise(t, "model.grpo.answer_temperature", "temperature") == {"temperature": 1.3}
    with pytest.raises(ValueError, match="no completed trial"):
        choose_noise(t.assign(state="FAIL"), "model.grpo.answer_temperature", "temperature")


def test_primary_intervals_by_hand():
    pass1 = {("dropout_shared", 0): 0.50, ("temperature", 0): 0.48, ("dropout_shared", 1): 0.40,
             ("temperature", 1): 0.40, ("dropout_shared", 2): 0.45, ("temperature", 2): 0.44,
             ("dropout_greedy", 0): 0.41, ("none", 0): 0.40}
    iv = primary_intervals(pass1)
    d = [0.02, 0.0, 0.01]  # mean 0.01, sd 0.01, half-width t(2) * 0.01 / sqrt(3)
    assert iv["dropout_shared - temperature"]["mean"] == pytest.approx(0.01)
    assert iv["dropout_shared - temperature"]["ci95"] == pytest.approx(t975(2) * 0.01 / math.sqrt(3))
    assert iv["dropout_shared - temperature"]["seeds"] == 3 == len(d)
    assert iv["dropout_greedy - none"]["seeds"] == 1 and math.isnan(iv["dropout_greedy - none"]["ci95"])


def test_more_seeds_rule():
    wide_zero = {"a": {"mean": 0.005, "ci95": 0.02}, "b": {"mean": 0.05, "ci95": 0.01}}
    assert more_seeds_needed(wide_zero, 5)
    assert not more_seeds_needed(wide_zero, 10)  # the cap
    assert not more_seeds_needed({"a": {"mean": 0.03, "ci95": 0.02}}, 5)  # excludes 0
    assert not more_seeds_needed({"a": {"mean": 0.002, "ci95": 0.008}}, 5)  # includes 0 but within ±1 point
    assert more_seeds_needed({"a": {"mean": 0.0, "ci95": float("nan")}}, 1)


def test_settings_reach_every_grpo_arm_and_override_the_budget():
    b = BUDGETS["converged_p4_20"].with_settings(
        {"grpo": {"model.optim.grpo_lr": 1e-4, "model.grpo.dynamic_sampling": True},
         "arms": {"dropout_shared": {"model.perturb.p": 0.2}, "temperature": {"model.grpo.answer_temperature": 1.3}}})
    shared = b.arm_args["dropout_shared"]
    # the budget's rollout p first, the chosen one after it: the later argument wins
    assert shared == ["--model.perturb.p", "0.1", "--model.optim.grpo_lr", "0.0001",
                      "--model.grpo.dynamic_sampling", "true", "--model.perturb.p", "0.2"]
    assert b.arm_args["temperature"][-2:] == ["--model.grpo.answer_temperature", "1.3"]
    assert "--model.optim.grpo_lr" in b.arm_args["none"] and "--model.optim.grpo_lr" in b.arm_args["cot_grpo"]
    assert "sft_continue" not in b.arm_args  # a supervised control: no GRPO recipe
    st = Study("unused", budget=b, seeds=1)
    train = st._arm_args(0, "dropout_shared", "S.ckpt", 3)
    assert train[train.index("--model.perturb.p", train.index("--model.perturb.p") + 1) + 1] == "0.2"
    for bad, msg in (({"recipe": {}}, "unknown keys"), ({"arms": {"nope": {}}}, "unknown arms"),
                     ({"grpo": {"lr": 1}}, "run.py keys")):
        with pytest.raises(ValueError, match=msg):
            BUDGETS["converged_p4_20"].with_settings(bad)


@pytest.fixture
def chosen(tmp_path):
    start = tmp_path / "start.ckpt"
    start.write_text("")
    ps = PaperSetting("p4_40", tmp_path / "work", tmp_path / "out", tmp_path / "study", grid_steps=150)
    ps.choose("p_train", {"chosen": 0.2, "rates": {"0.2": {"start": str(start)}}})
    ps.choose("recipe", {"model.optim.grpo_lr": 2e-5, "model.grpo.dynamic_sampling": False})
    return ps, start


def _config(ps, name, config, sets, n):
    args = ps.sweep_args(name, config, sets, n)
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    return load_sweep_config(args[args.index("--config") + 1], sets, args[args.index("--init-from") + 1]), args


def test_the_grids_are_the_planned_ones(chosen):
    """What the sweep driver reads from the pipeline's --set values: the task, the start, p_train, the grid's
    steps, and exactly the planned space (the recipe's lr x dynamic sampling x 3 arms; p around p_train)."""
    ps, start = chosen
    cfg, args = _config(ps, "recipe", "paper_recipe.yaml", ["args.model.perturb.p=0.2"], 18)
    assert cfg.task == "p4_40" and cfg.init_from == str(start) and args[args.index("--n-trials") + 1] == "18"
    assert cfg.args["model.schedule"] == [{"kind": "grpo", "steps": 150, "name": "recipe"}]
    assert cfg.args["model.perturb.p"] == 0.2 == cfg.args["model.perturb.p_train"]
    assert cfg.space["model.optim.grpo_lr"]["choices"] == [5.0e-6, 1.0e-5, 2.0e-5]
    assert cfg.objective["mean_over"] == "model.perturb.arm"
    grids = ps.noise_sets()
    cfg, _ = _config(ps, "noise_dropout", "paper_noise.yaml", grids["noise_dropout"][0], 9)
    assert cfg.space["model.perturb.p"]["choices"] == [0.1, 0.2, 0.4]
    assert cfg.space["model.perturb.arm"]["choices"] == ["dropout_shared", "dropout_greedy", "dropout_per_step"]
    assert cfg.args["model.optim.grpo_lr"] == 2e-5 and cfg.args["model.grpo.dynamic_sampling"] is False
    cfg, _ = _config(ps, "noise_temperature", "paper_noise.yaml", grids["noise_temperature"][0], 3)
    assert cfg.space == {"model.grpo.answer_temperature": {"type": "categorical", "choices": [0.7, 1.0, 1.3]}}
    assert cfg.args["model.perturb.arm"] == "temperature"
    cfg, _ = _config(ps, "noise_gaussian", "paper_noise.yaml", grids["noise_gaussian"][0], 3)
    assert cfg.space == {"model.perturb.noise_scale": {"type": "categorical", "choices": [0.05, 0.1, 0.2]}}
    assert [g[1:] for g in grids.values()] == [(9, 2), (3, 1), (3, 1)]


def test_seed_0_of_the_study_is_the_chosen_rates_start(chosen):
    """The study adopts seed 0's start and the cells step 1 computed from it, not the dropout_greedy cell
    (which ran before the grids) and never another seed's."""
    ps, start = chosen
    ps.choose("settings", {"grpo": {"model.optim.grpo_lr": 2e-5}, "arms": {}})
    src = ps._ptrain_study(0.2).cells
    extension = ("converged_s0_x1", "extend_s0_x1")  # seed 0's start failed its first check once
    for cell in (*ADOPTED, *extension, "train_dropout_greedy_s0"):
        (src / f"{cell}.json").write_text(json.dumps({"ckpt": str(start), "cell": cell}))
    st = ps._main_study(5)
    assert st.budget.settings["grpo"] == {"model.optim.grpo_lr": 2e-5} and st.seeds == 5 and st.jobs == 2
    assert st.budget.common[-1] == "0.2"  # the p_train 0.2 budget
    assert sorted(f.stem for f in st.cells.glob("*.json")) == sorted((*ADOPTED, *extension))
    assert st.coconut(0) == str(start)
    with pytest.raises(SystemExit, match="for task"):
        PaperSetting("p5_20", ps.work, ps.out, ps.study_out).choose("x", 1)


def test_the_report_puts_the_primary_comparisons_first(tmp_path):
    """results.md names the two primary comparisons, computed like every paired difference (per problem, then
    across seeds), and plots the frac_zero_std curves."""
    from lightning_latent.experiments.study_report import StudyReport

    cells = tmp_path / "cells"
    cells.mkdir()
    right = {"none": [1, 0, 0, 0], "temperature": [1, 1, 0, 0], "dropout_shared": [1, 1, 1, 0],
             "dropout_greedy": [1, 1, 0, 0]}
    for s in (0, 1):
        for arm, c in (("coconut", [1, 0, 0, 0]), *right.items()):
            (cells / f"test_{arm}_s{s}.json").write_text(json.dumps(
                {"pass@1": sum(c) / 4, "sampled_pass@1": 0.0, "maj@8": 0.0, "pass@8": 0.0, "n_eval": 4, "correct": c}))
            if arm != "coconut":
                fz = 1.0 if arm == "none" else 0.5
                (cells / f"train_{arm}_s{s}.json").write_text(json.dumps(
                    {"frac_zero_std": fz, "start_val": 0.25, "curves": {"grpo/frac_zero_std": [[1, fz], [2, fz]]}}))
    rep = StudyReport(tmp_path, tmp_path / "tb", cells, 2, tuple(right), BUDGETS["converged_p4_20"], 0.0)
    rep.write()
    md = (tmp_path / "results.md").read_text()
    paired = md.split("## Paired differences")[1].split("##")[0]
    rows = [line for line in paired.splitlines() if " − " in line]
    assert rows[0].startswith("| dropout_shared − temperature (primary) |")
    assert rows[1].startswith("| dropout_greedy − none (primary) |")
    assert "+25.0 ± 0.0" in rows[0] and "+25.0 ± 0.0" in rows[1]  # one more problem of 4 on both seeds
    assert not any(r.startswith("| dropout_shared − temperature |") for r in rows)  # not twice
    assert (tmp_path / "training_curves.png").exists()
    per_seed = md.split("## Test pass@1 per seed")[1].split("##")[0]  # each seed's start: its own headroom
    assert "| coconut_start | 25.0 | 25.0 |" in per_seed and "| dropout_shared | 75.0 | 75.0 |" in per_seed
    changed = md.split("## Test answers changed against the start")[1].split("##")[0]  # fixed / broken, per seed
    assert "| dropout_shared | +2 / -0 | +2 / -0 | 50.0 ± 0.0 |" in changed and "| none | +0 / -0 | +0 / -0 | 0.0 ± 0.0 |" in changed


def test_the_report_splits_the_primary_comparisons_by_the_starts_headroom(tmp_path):
    """Seeds whose start's test pass@1 lies in the issue's 25-60% band, and the rest, each get the primary
    comparisons: the split reads the start only."""
    from lightning_latent.experiments.study_report import StudyReport

    cells = tmp_path / "cells"
    cells.mkdir()
    starts = {0: [1, 1, 0, 0], 1: [1, 1, 1, 1], 2: [1, 0, 0, 0]}  # 50% (in), 100% (out), 25% (in: the band's edge)
    gain = {0: [1, 1, 1, 0], 1: [1, 1, 1, 1], 2: [1, 1, 0, 0]}  # dropout_shared: +1, 0, +1 problem over temperature
    for s, c in starts.items():
        arms = {"coconut": c, "temperature": c, "dropout_shared": gain[s], "none": c, "dropout_greedy": c}
        for arm, cc in arms.items():
            (cells / f"test_{arm}_s{s}.json").write_text(json.dumps(
                {"pass@1": sum(cc) / 4, "sampled_pass@1": 0.0, "maj@8": 0.0, "pass@8": 0.0, "n_eval": 4, "correct": cc}))
            if arm != "coconut":
                (cells / f"train_{arm}_s{s}.json").write_text(json.dumps({"frac_zero_std": 0.5, "curves": {}}))
    StudyReport(tmp_path, tmp_path / "tb", cells, 3, ("none", "temperature", "dropout_shared", "dropout_greedy"),
                BUDGETS["converged_p4_20"], 0.0).write()
    table = (tmp_path / "results.md").read_text().split("## The primary comparisons by the start's headroom")[1]
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in table.splitlines() if " − " in line}
    assert "s0 (50%), s1 (100%), s2 (25%)" in rows[("dropout_shared − temperature", "all seeds")]
    assert rows[("dropout_shared − temperature", "all seeds")].endswith("| +16.7 ± 35.9 |")  # t(2) 4.303 * 0.144 / sqrt(3)
    assert "s0 (50%), s2 (25%)" in rows[("dropout_shared − temperature", "start in 25-60%")]
    assert rows[("dropout_shared − temperature", "start in 25-60%")].endswith("| +25.0 ± 0.0 |")
    assert rows[("dropout_shared − temperature", "start outside it")].endswith("| s1 (100%) | +0.0 |")
    assert rows[("dropout_greedy − none", "start outside it")].endswith("| s1 (100%) | +0.0 |")


def test_the_report_gives_the_primary_comparisons_from_converged_starts_only(tmp_path):
    """A seed whose start failed its converged check (its start record says so) is left out of a second line per
    primary comparison; with every start converged the section is not written at all."""
    from lightning_latent.experiments.study_report import StudyReport

    cells = tmp_path / "cells"
    cells.mkdir()
    start = [1, 1, 0, 0]
    gain = {0: [1, 1, 1, 0], 1: [1, 1, 1, 0], 2: [1, 1, 1, 1]}  # dropout_greedy: +1, +1, +2 problems over none
    for s in range(3):
        arms = {"coconut": start, "none": start, "temperature": start, "dropout_shared": start, "dropout_greedy": gain[s]}
        for arm, cc in arms.items():
            (cells / f"test_{arm}_s{s}.json").write_text(json.dumps(
                {"pass@1": sum(cc) / 4, "sampled_pass@1": 0.0, "maj@8": 0.0, "pass@8": 0.0, "n_eval": 4, "correct": cc}))
            if arm != "coconut":
                (cells / f"train_{arm}_s{s}.json").write_text(json.dumps({"frac_zero_std": 0.5, "curves": {}}))
    arms = ("none", "temperature", "dropout_shared", "dropout_greedy")
    title = "## The primary comparisons from converged starts only"
    for s in range(3):
        (cells / f"start_s{s}.json").write_text(json.dumps({"ckpt": "x", "converged": True}))
    StudyReport(tmp_path, tmp_path / "tb", cells, 3, arms, BUDGETS["converged_p4_20"], 0.0).write()
    assert title not in (tmp_path / "results.md").read_text()
    (cells / "start_s2.json").write_text(json.dumps({"ckpt": "x", "converged": False}))
    StudyReport(tmp_path, tmp_path / "tb", cells, 3, arms, BUDGETS["converged_p4_20"], 0.0).write()
    table = (tmp_path / "results.md").read_text().split(title)[1].split("##")[0]
    assert "(seed 2)" in table
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in table.splitlines() if " − " in line}
    assert rows[("dropout_greedy − none", "all seeds")].endswith("| s0, s1, s2 | +33.33 ± 35.86 |")  # t(2) 4.303 * 14.43 / sqrt(3)
    assert rows[("dropout_greedy − none", "converged starts")].endswith("| s0, s1 | +25.00 ± 0.00 |")
    assert rows[("dropout_shared − temperature", "converged starts")].endswith("| s0, s1 | +0.00 ± 0.00 |")


def test_the_p_train_cells_run_at_their_own_lr_and_rate(tmp_path):
    """The p_train step's dropout_greedy cells: rollout p = p_train (the rate's budget) and, with ptrain_lr,
    that GRPO lr (the recipe does not exist yet); the start trains at p_train."""
    ps = PaperSetting("p4_40", tmp_path / "w", tmp_path / "o", tmp_path / "s", ptrain_lr=1e-5)
    for p in (0.05, 0.1, 0.2):
        st = ps._ptrain_study(p)
        args = st._arm_args(0, "dropout_greedy", "S.ckpt", 300)
        assert args[args.index("--model.optim.grpo_lr") + 1] == "1e-05"
        assert args[len(args) - 1 - args[::-1].index("--model.perturb.p") + 1] == str(p)  # the last one wins
        assert st.budget.common[-2:] == ["--model.perturb.p_train", str(p)] and st.arms == ("dropout_greedy",)
    assert "--model.optim.grpo_lr" not in PaperSetting("p4_40", tmp_path / "w", tmp_path / "o", tmp_path / "s") \
        ._ptrain_study(0.1)._arm_args(0, "dropout_greedy", "S.ckpt", 300)


def test_the_pt0_side_job_builds_the_starts_step_pt0_reads(chosen):
    """scripts/pt0_starts.py builds the p_train = 0 starts early, beside the driver: its study must write the
    very cells (and run the very start command lines) that step_pt0's study reads, whatever the grids chose."""
    import importlib.util

    from lightning_latent.experiments.study import REPO_ROOT

    spec = importlib.util.spec_from_file_location("pt0_starts", REPO_ROOT / "scripts" / "pt0_starts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ps, _ = chosen
    ps.choose("settings", {"grpo": {"model.optim.grpo_lr": 2e-5}, "arms": {"dropout_greedy": {"model.perturb.p": 0.1}}})
    side = mod.side_study(ps, 3)
    main = ps.study("pt0", 0.0, 3, ("temperature", "dropout_shared", "dropout_greedy"), ps.study_out / "p_train_0",
                    2, ps.choices()["settings"])  # as step_pt0 builds it
    assert side.work == main.work == ps.work / "pt0" and side.cells == main.cells
    for field in ("coconut_args", "common", "start_config", "converged_lr", "converged_gain", "max_extensions",
                  "extension_steps", "final_stage", "masks_off_check", "grpo_steps", "val_limit"):
        assert getattr(side.budget, field) == getattr(main.budget, field), field
    assert side.budget.common[-2:] == ["--model.perturb.p_train", "0.0"]
    assert main.budget.arm_args != side.budget.arm_args  # the settings reach the arms only, not the starts


def test_a_recipe_lr_on_the_grids_edge_extends_the_grid_past_it():
    tried = [5e-6, 1e-5, 2e-5]
    assert edge_lr(1e-5, tried, 0) is None  # interior: the grid has found it
    assert edge_lr(5e-6, tried, 0) == 2.5e-6 and edge_lr(2e-5, tried, 0) == 4e-5
    assert edge_lr(2.5e-6, [*tried, 2.5e-6], 1) == 1.25e-6
    assert edge_lr(1.25e-6, [*tried, 2.5e-6, 1.25e-6], 2) is None  # at most two extensions
    assert edge_lr(5e-6, [5e-6], 0) is None


def _recipe_frame(values):
    """Trials of the recipe grid: values[(lr, ds)] = (temperature, dropout_shared, dropout_greedy)."""
    return _trials([{"value": v, "params_model.perturb.arm": arm, "params_model.optim.grpo_lr": lr,
                     "params_model.grpo.dynamic_sampling": ds}
                    for (lr, ds), vals in values.items()
                    for arm, v in zip(("temperature", "dropout_shared", "dropout_greedy"), vals)])


def test_the_recipe_step_extends_its_lr_grid_at_the_edge_and_chooses_over_every_trial(chosen, monkeypatch):
    """The recipe grid's own lrs are sweeps/paper_recipe.yaml's; its best at the lowest lr runs the same six
    points at half that lr (its --set reaches the sweep's space), and the choice is made over all 24 trials."""
    ps, _ = chosen
    cfg, _ = _config(ps, "recipe", "paper_recipe.yaml", [], 18)
    assert tuple(cfg.space["model.optim.grpo_lr"]["choices"]) == RECIPE_LRS
    c = ps.choices()
    del c["recipe"]
    ps.choices_file.write_text(json.dumps(c))
    calls = []
    frames = {"recipe": {(lr, ds): (0.40 - lr * 1e4,) * 3 for lr in RECIPE_LRS for ds in (False, True)},
              # half the lowest lr is worse than the lowest: the choice comes back inside the grid
              "recipe_lr2.5e-06": {(2.5e-6, ds): (0.30, 0.30, 0.30) for ds in (False, True)}}

    def sweep(name, config, sets, n_trials, workers):
        calls.append((name, sets, n_trials))
        return _recipe_frame(frames[name])

    monkeypatch.setattr(ps, "sweep", sweep)
    ps.step_recipe()
    assert [(n, k) for n, _, k in calls] == [("recipe", 18), ("recipe_lr2.5e-06", 6)]
    cfg, _ = _config(ps, "recipe_lr2.5e-06", "paper_recipe.yaml", calls[1][1], 6)
    assert cfg.space["model.optim.grpo_lr"]["choices"] == [2.5e-6] and cfg.args["model.perturb.p"] == 0.2
    assert ps.choices()["recipe"] == {"model.optim.grpo_lr": 5e-6, "model.grpo.dynamic_sampling": False}
    assert ps.choices()["recipe_grid"]["lrs"] == [2.5e-6, *RECIPE_LRS]
    ps.step_recipe()  # chosen: a rerun sweeps nothing
    assert len(calls) == 2


def test_missing_grid_points_by_hand():
    pts = {(lr, ds): (0.4, 0.4, 0.4) for lr in RECIPE_LRS for ds in (False, True)}
    df = _recipe_frame(pts)
    assert missing_grid_points(df, 18) == 0
    df.loc[[0, 4], "state"] = "WAITING"  # two points requeued, never run
    assert missing_grid_points(df, 18) == 2
    df.loc[[0], "state"] = "FAIL"
    df = pd.concat([df, df.iloc[[0]].assign(state="COMPLETE")], ignore_index=True)  # a retry completed it
    assert missing_grid_points(df, 18) == 1
    assert missing_grid_points(df.iloc[:0], 6) == 6


def test_a_grid_step_refuses_to_choose_while_a_point_has_no_completed_trial(chosen, monkeypatch, tmp_path):
    """The sweep drivers exit 0 with two of the six points only requeued (the 09:12 bug): the step stops, it
    does not choose over the other four."""
    import optuna

    from lightning_latent.experiments import paper_setting as mod

    ps, _ = chosen
    out = ps.work / "recipe_lr2.5e-06"
    out.mkdir(parents=True)
    study = optuna.create_study(study_name="recipe_lr2.5e-06", storage=f"sqlite:///{out / 'study.db'}",
                                direction="maximize")
    dist = {"model.perturb.arm": optuna.distributions.CategoricalDistribution(
        ["temperature", "dropout_shared", "dropout_greedy"]),
        "model.grpo.dynamic_sampling": optuna.distributions.CategoricalDistribution([False, True])}
    for i, (arm, ds) in enumerate((a, d) for a in dist["model.perturb.arm"].choices for d in (False, True)):
        params = {"model.perturb.arm": arm, "model.grpo.dynamic_sampling": ds}
        if i < 4:
            study.add_trial(optuna.trial.create_trial(params=params, distributions=dist, value=0.5))
        else:
            study.enqueue_trial(params)

    class Done:
        returncode = 0

        def __init__(self, *a, **k):
            pass

        def wait(self):
            return 0

    monkeypatch.setattr(mod.subprocess, "Popen", Done)
    monkeypatch.setattr(mod.time, "sleep", lambda s: None)
    with pytest.raises(SystemExit, match="2 of its 6 grid points have no completed trial"):
        ps.sweep("recipe_lr2.5e-06", "paper_recipe.yaml", [], 6, 2)
    # once every point has completed, the same call returns the trials
    for params in ({"model.perturb.arm": "dropout_greedy", "model.grpo.dynamic_sampling": d} for d in (False, True)):
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dist, value=0.45))
    assert len(ps.sweep("recipe_lr2.5e-06", "paper_recipe.yaml", [], 6, 2)) == 8


def test_study_so_far_reports_finished_seeds_only(chosen, monkeypatch):
    """scripts/study_so_far.py refuses, naming what is missing, before settings exist and while a seed it is
    asked for has unfinished cells (its report on finished seeds was run by hand on the real study)."""
    import importlib.util
    import shutil
    import sys

    from lightning_latent.experiments.study import REPO_ROOT

    spec = importlib.util.spec_from_file_location("study_so_far", REPO_ROOT / "scripts" / "study_so_far.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ps, _ = chosen
    (ps.work / "docs" / "paper_setting").mkdir(parents=True)
    shutil.copy(ps.choices_file, ps.work / "docs" / "paper_setting" / "choices.json")
    argv = ["study_so_far.py", "--work", str(ps.work), "--seeds", "1", "--out", str(ps.work / "so_far")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match="no settings chosen yet"):
        mod.main()
    ps.choose("settings", {"grpo": ps.choices()["recipe"], "arms": {}})
    shutil.copy(ps.choices_file, ps.work / "docs" / "paper_setting" / "choices.json")
    with pytest.raises(SystemExit, match=r"16 cell\(s\) not finished .*train_none_s0"):
        mod.main()
