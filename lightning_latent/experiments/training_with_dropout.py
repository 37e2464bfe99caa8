"""Training with dropout, separated from the study's other changes (issue 22, point 5).

The study's arms start from latent models trained under the arms' own feature masks (``p_train``), so that a
rollout's mask is one the model could have drawn in training. To tell what that training does from what the
converged starts, the headroom and the recipe do, ``temperature``, ``dropout_shared`` and ``dropout_greedy`` also
run from converged starts trained without masks (``p_train = 0``), on the same seeds, settings and test problems
(the synthetic task's problems do not depend on the seed). This module compares the two: it runs nothing and reads
only the two studies' finished cells (``test_<arm>_s<seed>.json``, ``train_<arm>_s<seed>.json``).

Each start is its own model, so an arm is compared by its **gain over its own start** (both tested on the same
problems), and the two trainings by the difference of those gains, paired per problem:
``(arm_with - start_with) - (arm_without - start_without)``; then mean ± 95% t-interval over seeds, like every
across-seed figure of the study (:func:`~.study_report.mean_pm`).
"""
from __future__ import annotations

import json
from pathlib import Path

from .reporting import markdown_table
from .study_report import across_seeds_pm, paired_diffs, per_seed_pm

#: The arms run from both kinds of start (``PaperSetting.step_pt0``).
ARMS = ("temperature", "dropout_shared", "dropout_greedy")
START = "coconut_start"


def load_cells(cells: Path, arms: tuple[str, ...], seeds: int) -> tuple[dict, dict]:
    """Per ``(arm, seed)``: the test cell's per-problem correctness (the start as ``coconut_start``), and the train
    cell's ``frac_zero_std``; the seeds and arms not finished are absent."""
    correct: dict[tuple[str, int], list] = {}
    zero_std: dict[tuple[str, int], float] = {}
    for s in range(seeds):
        for arm, name in ((START, "coconut"), *((a, a) for a in arms)):
            f = cells / f"test_{name}_s{s}.json"
            if f.exists():
                correct[(arm, s)] = json.loads(f.read_text())["correct"]
            t = cells / f"train_{name}_s{s}.json"
            if arm != START and t.exists():
                zero_std[(arm, s)] = json.loads(t.read_text())["frac_zero_std"]
    return correct, zero_std


def double_diffs(with_: dict, without: dict, arm: str, seeds: int, base: str = START) -> tuple[dict, dict, dict]:
    """Per seed below ``seeds`` where all four cells exist: per problem ``(arm - base)`` with masks in training,
    the same without, and their difference (with minus without). ``base`` is the start (the arm's gain) or another
    arm (a comparison's change). Each study's ``arm - base`` is :func:`~.study_report.paired_diffs`."""
    gw, go = paired_diffs(with_, arm, base), paired_diffs(without, arm, base)
    both = [s for s in gw if s in go and s < seeds]
    for s in both:
        if len(gw[s]) != len(go[s]):
            raise ValueError(f"{arm} − {base}, seed {s}: the two studies tested different numbers of problems "
                             f"({len(gw[s])} and {len(go[s])}); they must share the test problems")
    gw, go = {s: gw[s] for s in both}, {s: go[s] for s in both}
    return gw, go, {s: [x - y for x, y in zip(gw[s], go[s])] for s in both}


def comparison_lines(with_cells: Path, without_cells: Path, p_train: float, seeds: int,
                     arms: tuple[str, ...] = ARMS) -> list[str]:
    """The markdown of the comparison (module doc): the starts, each arm's gain over its start with and without
    masks in training, and the primary comparison ``dropout_shared - temperature`` both ways."""
    w, wz = load_cells(with_cells, arms, seeds)
    o, oz = load_cells(without_cells, arms, seeds)
    both = [s for s in range(seeds) if (START, s) in w and (START, s) in o]
    tag = f"p_train = {p_train:g}"
    lines = [f"# Training with dropout ({tag}) against without (p_train = 0)", "",
             (f"The same arms, settings, seeds and test problems from two kinds of converged start: trained with the "
             f"arms' feature masks at {tag} (the study's starts) and without (`p_train = 0`). Test greedy pass@1 "
             f"(masks off){f', n = {len(w[(START, both[0])])} problems per evaluation' if both else ''}; per seed the mean "
             "of per-problem differences; across seeds mean ± 95% t-interval over seeds. A gain is an arm's test "
             "pass@1 minus its own start's (each start is its own model)."), ""]
    if not both:
        return lines + ["No seed has both starts tested yet."]
    lines += ["## The starts (test greedy pass@1, %)", "",
              markdown_table(["seed", tag, "p_train = 0"],
                             [[s, f"{100 * _mean(w[(START, s)]):.1f}", f"{100 * _mean(o[(START, s)]):.1f}"]
                              for s in both]), ""]
    rows = []
    for arm in arms:  # every figure of a row over the same seeds: those with the arm and its start in both studies
        gw, go, dd = double_diffs(w, o, arm, seeds)
        rows.append([arm, ", ".join(f"s{s}" for s in dd) or "-", across_seeds_pm(gw), across_seeds_pm(go), per_seed_pm(dd),
                     across_seeds_pm(dd), _zero_std(wz, arm, dd), _zero_std(oz, arm, dd)])
    lines += ["## Each arm's gain over its start (points)", "",
              ("Every figure of a row over the same seeds: those where the arm and its start are tested in both "
               "studies. Per seed: mean of per-problem differences ± 95% t-interval over problems."), "",
              markdown_table(["arm", "seeds", f"gain, {tag}", "gain, p_train = 0",
                              "difference per seed (with − without)", "difference across seeds",
                              f"frac_zero_std, {tag}", "frac_zero_std, p_train = 0"], rows), ""]
    a, b = "dropout_shared", "temperature"
    if a in arms and b in arms:
        cw, co, dd = double_diffs(w, o, a, seeds, base=b)
        lines += ["## The primary comparison `dropout_shared − temperature` both ways (points)", "",
                  markdown_table(["starts", "per seed", "across seeds"],
                                 [[tag, per_seed_pm(cw), across_seeds_pm(cw)], ["p_train = 0", per_seed_pm(co), across_seeds_pm(co)],
                                  ["difference (with − without)", per_seed_pm(dd), across_seeds_pm(dd)]]),
                  ""]
    none, _ = load_cells(with_cells, ("none",), seeds)
    tested = [s for s in range(seeds) if ("none", s) in none and (START, s) in none]
    same = [s for s in tested if none[("none", s)] == none[(START, s)]]
    if tested:
        lines += [f"`dropout_greedy − none`: in the study, `none` answers every test problem as its start does on "
                  f"{len(same)} of {len(tested)} seeds (its K greedy rollouts agree: no advantage, no gradient)"
                  + (", so there `dropout_greedy − none` is `dropout_greedy`'s gain above (`none` did not run from the "
                     "p_train = 0 starts: the same argument holds there)." if len(same) == len(tested) else
                     "; where it moved, `dropout_greedy`'s gain above is not `dropout_greedy − none`.")]
    return lines


def write_comparison(with_cells: Path, without_cells: Path, p_train: float, seeds: int, out: Path) -> Path:
    """``OUT/training_with_dropout.md`` (:func:`comparison_lines`)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "training_with_dropout.md"
    path.write_text("\n".join(comparison_lines(with_cells, without_cells, p_train, seeds)) + "\n")
    return path


def _mean(v: list) -> float:
    return sum(v) / len(v)


def _zero_std(z: dict, arm: str, seeds) -> str:
    v = [z[(arm, s)] for s in seeds if (arm, s) in z]
    return f"{_mean(v):.2f}" if v else "-"
