"""The p_train = 0 comparison (issue 22, point 5): gains over each arm's own start, and their difference between
starts trained with and without masks, paired per problem, on hand-built cells."""
from __future__ import annotations

import json

import pytest

from lightning_latent.experiments.study_report import paired_diffs
from lightning_latent.experiments.training_with_dropout import (
    comparison_lines,
    double_diffs,
    load_cells,
)
from lightning_latent.metrics import t975

WITH = {  # per seed: the start, then the arms (4 test problems)
    0: {"coconut": [1, 0, 0, 0], "temperature": [1, 1, 0, 0], "dropout_shared": [1, 1, 1, 0],
        "dropout_greedy": [1, 1, 0, 0], "none": [1, 0, 0, 0]},
    1: {"coconut": [1, 1, 0, 0], "temperature": [1, 1, 0, 0], "dropout_shared": [1, 1, 1, 1],
        "dropout_greedy": [1, 1, 1, 0], "none": [1, 1, 0, 0]},
}
WITHOUT = {
    0: {"coconut": [1, 1, 0, 0], "temperature": [1, 1, 0, 0], "dropout_shared": [1, 1, 0, 0],
        "dropout_greedy": [1, 1, 0, 0]},
    1: {"coconut": [1, 0, 0, 0], "temperature": [1, 1, 0, 0], "dropout_shared": [1, 0, 0, 0],
        "dropout_greedy": [1, 1, 0, 0]},
}


def _cells(root, studies, zero_std):
    root.mkdir()
    for s, arms in studies.items():
        for arm, c in arms.items():
            (root / f"test_{arm}_s{s}.json").write_text(json.dumps({"pass@1": sum(c) / len(c), "correct": c}))
            if arm != "coconut":
                (root / f"train_{arm}_s{s}.json").write_text(json.dumps({"frac_zero_std": zero_std}))
    return root


def _row(md: str, section: str, first: str) -> list[str]:
    body = md.split(section)[1].split("##")[0]
    line = next(x for x in body.splitlines() if x.startswith(f"| {first} |"))
    return [c.strip() for c in line.split("|")[1:-1]]


def test_the_comparison_pairs_each_arm_with_its_own_start(tmp_path):
    w = _cells(tmp_path / "with", WITH, 0.5)
    o = _cells(tmp_path / "without", WITHOUT, 0.75)
    md = "\n".join(comparison_lines(w, o, 0.05, 2))
    assert "n = 4 problems" in md
    assert _row(md, "## The starts", "0") == ["0", "25.0", "50.0"]
    # dropout_shared: +50 over its start on both seeds with masks in training, +0 without: +50 both seeds
    ds = _row(md, "## Each arm's gain", "dropout_shared")
    sd = (4 / 3 * 0.25) ** 0.5  # per-problem double differences of seed 0: [0, 1, 1, 0]
    assert ds[1] == "s0, s1" and ds[2] == "+50.0 ± 0.0" and ds[3] == "+0.0 ± 0.0" and ds[5] == "+50.0 ± 0.0"
    assert ds[4] == f"s0: +50.0 ± {100 * t975(3) * sd / 2:.1f}; s1: +50.0 ± {100 * t975(3) * sd / 2:.1f}"
    assert ds[6:] == ["0.50", "0.75"]
    # temperature: gains +25 / 0 with, 0 / +25 without: the difference +25 and -25
    t = _row(md, "## Each arm's gain", "temperature")
    assert t[2] == f"+12.5 ± {100 * t975(1) * 0.125:.1f}" and t[3] == t[2]
    assert t[5] == f"+0.0 ± {100 * t975(1) * 0.25:.1f}"
    # the primary comparison: dropout_shared - temperature +25 / +50 with, 0 / -25 without
    p = md.split("## The primary comparison")[1]
    assert "| p_train = 0.05 | s0: +25.0" in p and "s1: +50.0" in p  # seed 0: [0, 0, 1, 0] per problem, sd 0.5
    assert f"| difference (with − without) | s0: +25.0 ± {100 * t975(3) * 0.25:.1f}; s1: +75.0" in p
    assert "on 2 of 2 seeds" in md and "is `dropout_greedy`'s gain above" in md


def test_a_seed_missing_from_either_study_is_left_out_of_every_figure(tmp_path):
    """Seed 1 finished with masks in training only: every column (gains, their difference, the primary
    comparison, frac_zero_std) reads seed 0 alone, so the difference is the two gains' difference."""
    w = _cells(tmp_path / "with", WITH, 0.5)
    o = _cells(tmp_path / "without", {0: WITHOUT[0]}, 0.75)
    md = "\n".join(comparison_lines(w, o, 0.05, 2))
    t = _row(md, "## Each arm's gain", "temperature")
    assert t[1:6] == ["s0", "+25.0", "+0.0", f"s0: +25.0 ± {100 * t975(3) * 0.25:.1f}", "+25.0"]
    p = md.split("## The primary comparison")[1]
    assert "| p_train = 0.05 | s0: +25.0" in p and "s1:" not in p
    assert "No seed has both starts" in "\n".join(comparison_lines(w, _cells(tmp_path / "empty", {}, 0.0), 0.05, 2))


def test_studies_on_different_problems_are_refused(tmp_path):
    w = _cells(tmp_path / "with", WITH, 0.5)
    o = _cells(tmp_path / "without", {s: {a: c + [0] for a, c in arms.items()} for s, arms in WITHOUT.items()}, 0.75)
    wc, _ = load_cells(w, ("dropout_shared",), 2)
    oc, _ = load_cells(o, ("dropout_shared",), 2)
    with pytest.raises(ValueError, match="different numbers of problems"):
        double_diffs(wc, oc, "dropout_shared", 2)
    with pytest.raises(ValueError, match="not the same problems"):  # within one study too: zip would truncate
        paired_diffs({**wc, ("dropout_shared", 0): [1, 0, 0, 0, 1]}, "dropout_shared", "coconut_start")
