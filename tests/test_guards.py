"""lightning_latent/guards.py: the collapse guard (its rules, and GRPO runs it stops or lets finish) and the
non-finite guard's count.

The GRPO runs start from the trained tiny CoT model of ``cot_start.py`` (the session fixture ``cot_ckpt``):
a model that scores > 0, so its groups are mixed before anything goes wrong.
"""
from __future__ import annotations

import pytest
import torch

from lightning_latent.guards import CollapseError, CollapseGuard, NonFiniteGuard
from lightning_latent.rl.rewards import REWARDS

from cot_start import fit, grpo_from

REWARDS["always_zero"] = lambda texts, golds: torch.zeros(len(texts))
REWARDS["gold_parity"] = lambda texts, golds: torch.tensor([float(int(g) % 2) for g in golds])


def test_collapse_guard_rules():
    g = CollapseGuard(patience=2)
    assert g.update(0, any_mixed=True, all_zero=False, all_one=False, reward_mean=0.5) is None
    assert g.update(1, any_mixed=False, all_zero=True, all_one=False, reward_mean=0.0) is None
    msg = g.update(2, any_mixed=False, all_zero=True, all_one=False, reward_mean=0.0)
    assert msg.startswith("GRPO collapsed at step 2") and "last mixed group was at step 0" in msg
    g = CollapseGuard(patience=2)
    g.update(0, False, True, False, 0.0)
    assert "no learning signal since its start" in g.update(1, False, True, False, 0.0)
    g = CollapseGuard(patience=1)  # zero-variance groups whose rewards differ between groups: not flat
    assert all(g.update(i, False, False, False, 0.5) is None for i in range(5))
    assert CollapseGuard(patience=None).update(0, False, True, False, 0.0) is None


def test_collapse_guard_state_round_trip():
    g = CollapseGuard(patience=3)
    g.update(0, True, False, False, 0.5)
    g.update(1, False, True, False, 0.0)
    h = CollapseGuard(patience=3)
    h.load_state_dict(g.state_dict())
    assert (h.flat_steps, h.last_mixed, h.rewards) == (1, 0, [(0, 0.5), (1, 0.0)])
    assert h.update(2, False, True, False, 0.0) is None and "collapsed at step 3" in h.update(3, False, True, False, 0.0)


def test_nonfinite_guard_counts_bad_steps_in_a_row():
    g = NonFiniteGuard(max_bad_steps=1)
    assert g.check(torch.tensor(1.0), 2.0) and g.bad_steps == 0
    assert not g.check(torch.tensor(float("nan")), 2.0) and g.bad_steps == 1 and not g.exhausted
    assert g.check(0.5, torch.tensor(0.1)) and g.bad_steps == 0  # a good step resets the count
    assert not g.check(1.0, float("inf")) and not g.check(float("-inf"), 1.0)
    assert g.bad_steps == 2 and g.exhausted
    assert "2 non-finite steps in a row (limit optim.max_bad_steps=1) at step 7" in g.message(7, [1, 2], "x.ckpt")


def test_high_lr_collapse_stops_the_run_with_a_checkpoint(cot_ckpt, tmp_path):
    m = grpo_from(cot_ckpt, lr=1e-2, steps=12)
    with pytest.raises(CollapseError, match=r"GRPO collapsed at step \d+: for 3 steps in a row every rollout got "
                                            r"reward 0 .*last mixed group was at step 0.*optim.grpo_lr") as err:
        fit(m, tmp_path)
    assert err.value.value == 0.0
    assert m.step_count < 12
    assert list(tmp_path.rglob("collapse-stop.ckpt")), "no checkpoint written before the stop"


def test_a_run_that_never_had_signal_says_so(cot_ckpt, tmp_path):
    with pytest.raises(CollapseError, match="no learning signal since its start"):
        fit(grpo_from(cot_ckpt, reward="always_zero"), tmp_path)


def test_none_arm_runs_to_the_end(cot_ckpt, tmp_path):
    m = grpo_from(cot_ckpt, reward="gold_parity", arm="none", patience=2)
    t = fit(m, tmp_path)
    assert m.step_count == 6
    assert float(t.callback_metrics["grpo/frac_zero_std"]) == 1.0  # every group zero-variance, by design


def test_dropout_greedy_runs_while_its_masks_make_groups_differ(cot_ckpt, tmp_path):
    """dropout_greedy answers greedily, so only its frozen masks can make a group's rewards differ. With
    masks its groups are mixed and the guard (patience 1) lets it run to the end; the same arm with p=0 is
    the deterministic collapse: a step whose rollouts are all right stops it. (p=0.7: masks on the question
    alone rarely change this start's one-step additions; at 0.3 and 0.5 its first step is all right.)"""
    m = grpo_from(cot_ckpt, arm="dropout_greedy", p=0.7, patience=1)
    t = fit(m, tmp_path / "masks")
    assert m.step_count == 6 and m.rollout_temperature == 0.0
    assert float(t.callback_metrics["grpo/frac_zero_std"]) < 1.0 and float(t.callback_metrics["grpo/frac_mixed"]) > 0
    with pytest.raises(CollapseError, match="every rollout got reward 1|every group of the last 1 steps"):
        fit(grpo_from(cot_ckpt, arm="dropout_greedy", p=0.0, patience=1), tmp_path / "no_masks")
