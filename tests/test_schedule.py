"""lightning_latent/schedule.py: phases flattened into segments, where a run is (locate, the data plan, the
step counter and its checkpoint state), segment lengths, and the plateau rule's tracker and watch (the rule
in whole fits: tests/integration/test_plateau_runs.py)."""
from __future__ import annotations

import pytest
import torch

from lightning_latent.schedule import (
    DataPlan,
    Phase,
    PlateauRule,
    PlateauTracker,
    PlateauWatch,
    Schedule,
    data_plan,
    default_schedule,
    flatten,
    locate,
    place_mismatch,
    set_lengths,
)

BATCH, LR = {"sft": 8, "grpo": 2}, {"sft": 1e-3, "grpo": 1e-4}


def _segments(plateau: PlateauRule | None = None):
    """cot 0-5 (8 records a step, ``plateau`` its rule), coconut stages 1 and 2 at 5-8 and 8-11, grpo 11-15
    (2 prompts a step)."""
    return flatten([Phase("cot", steps=5, plateau=plateau), Phase("coconut", steps=3, stages=[1, 2]),
                    Phase("grpo", steps=4, name="rl")], 2, BATCH, LR)


def test_tracker_needs_a_gain_within_patience():
    t = PlateauTracker(PlateauRule(every=10, patience=2, min_gain=0.05))
    assert not t.update(0.10, 10)      # best 0.10
    assert not t.update(0.14, 20)      # +0.04 < 0.05: one without a gain
    assert not t.update(0.20, 30)      # +0.10: new best
    assert not t.update(0.21, 40)
    assert t.update(0.22, 50)          # two in a row without a gain of 0.05 over 0.20
    late = PlateauTracker(PlateauRule(every=10, patience=1, min_gain=0.5, min_steps=100))
    assert not late.update(0.1, 10) and not late.update(0.1, 20) and late.update(0.1, 100)


def _replay(rows: list[dict], rules: dict[str, PlateauRule]) -> list[tuple[str, int, int]]:
    """Feed a recorded plateau curve to the tracker: (phase, stage, steps_in_stage) where each segment ends."""
    ends, trackers, first = [], {}, {}
    for r in rows:
        seg = (r["phase"], int(r["stage"]))
        if seg not in trackers:
            trackers[seg], first[seg] = PlateauTracker(rules[r["phase"]]), int(r["step"])
        done = int(r["step"]) - first[seg] + rules[r["phase"]].every
        if trackers[seg].update(float(r["val_pass@1"]), done):
            ends.append((*seg, done))
    return ends


def test_plateau_yaml_floor_keeps_seed0_and_saves_seed1():
    """plateau.yaml's rule (min_steps 2,000) on the recorded curves: seed 0's segments end where they did
    (the study's seed-0 start is still the run the config rebuilds); seed 1's fully latent stage, which the
    rule without a floor ended at 1,250 steps and 22.6%, is not ended there."""
    import csv
    import json
    from pathlib import Path

    import yaml
    repo = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((repo / "experiments/configs/synthetic/plateau.yaml").read_text())
    rules = {ph["kind"]: PlateauRule(**ph["plateau"]) for ph in cfg["model"]["schedule"]}
    assert {r.min_steps for r in rules.values()} == {2000}
    seed0 = json.loads((repo / "docs/results/plateau/summary.json").read_text())
    want = [(s["phase"], s["stage"], s["steps"]) for s in seed0["segment_steps"]]
    assert want == [("cot", 0, 2750), ("coconut", 1, 2000), ("coconut", 2, 2000), ("coconut", 3, 3750)]
    assert _replay(seed0["plateau"], rules) == want
    seed1 = list(csv.DictReader(open(repo / "docs/results/plateau/curves_seed1_min_steps0.csv")))
    no_floor = {k: PlateauRule(every=r.every, patience=r.patience, min_gain=r.min_gain) for k, r in rules.items()}
    assert _replay(seed1, no_floor) == [("cot", 0, 2500), ("coconut", 1, 1250), ("coconut", 2, 3000),
                                        ("coconut", 3, 1250)]  # what happened
    assert _replay(seed1, rules) == [("cot", 0, 2500), ("coconut", 2, 3000)]  # stages 1 and 3 go on


def test_bad_rule_is_named():
    """A bad rule is refused when its phase is made (a YAML's dict included), naming the value."""
    with pytest.raises(ValueError, match=r"plateau=PlateauRule\(every=0.*every and patience must be >= 1"):
        Phase("cot", steps=10, plateau={"every": 0})


def test_a_coconut_phase_can_give_each_stage_its_own_steps():
    segs = flatten([Phase("cot", steps=5), Phase("coconut", steps=[2, 3, 7], stages=[1, 2, 3])], 3,
                   {"sft": 8, "grpo": 2}, {"sft": 1e-3, "grpo": 1e-4})
    assert [(s.stage, s.start, s.steps) for s in segs] == [(0, 0, 5), (1, 5, 2), (2, 7, 3), (3, 10, 7)]
    with pytest.raises(ValueError, match=r"schedule\[0\].steps=\[2, 3\] gives 2 step counts for 3 stages"):
        flatten([Phase("coconut", steps=[2, 3], stages=[1, 2, 3])], 3, {"sft": 8, "grpo": 2}, {"sft": 1e-3, "grpo": 1e-4})
    with pytest.raises(ValueError, match=r"steps=\[2, -1\] must be >= 0"):
        Phase("coconut", steps=[2, -1], stages=[1, 2])


def test_flatten_gives_each_segment_its_place_batch_and_lr():
    segs = _segments()
    assert [(s.name, s.kind, s.stage, s.start, s.steps) for s in segs] == [
        ("cot", "cot", 0, 0, 5), ("coconut", "coconut", 1, 5, 3), ("coconut", "coconut", 2, 8, 3), ("rl", "grpo", 3, 11, 4)]
    assert [s.batch_size for s in segs] == [8, 8, 8, 2] and [s.lr for s in segs] == [1e-3, 1e-3, 1e-3, 1e-4]
    assert [(s.first_of_phase, s.last_of_phase) for s in segs] == [(True, True), (True, False), (False, True),
                                                                  (True, True)]
    assert [s.cot_layout for s in segs] == [True, False, False, False]
    own = flatten([Phase("grpo", steps=1, batch_size=5, lr=3e-5, stages=[0])], 2, BATCH, LR)[0]
    assert (own.batch_size, own.lr, own.stage, own.cot_layout) == (5, 3e-5, 0, True)
    with pytest.raises(ValueError, match="schedule is empty"):
        flatten([], 2, BATCH, LR)
    with pytest.raises(ValueError, match=r"schedule\[0\] \(grpo\) trains one stage"):
        flatten([Phase("grpo", stages=[1, 2])], 2, BATCH, LR)
    assert [s.kind for s in flatten(default_schedule(), 2, BATCH, LR)] == ["cot", "coconut", "coconut", "coconut", "grpo"]


def test_locate_and_data_plan():
    segs = _segments()
    assert locate(segs, 0) is segs[0] and locate(segs, 4) is segs[0] and locate(segs, 5) is segs[1]
    assert locate(segs, 14) is segs[3] and locate(segs, 15) is segs[3] and locate(segs, 99) is segs[3]  # done: the last
    assert data_plan(segs, 0) == DataPlan(batch_size=8, steps_left=5, consumed=0)
    assert data_plan(segs, 6) == DataPlan(8, 2, 6 * 8)  # coconut stage 1, one step done
    # in grpo after two of its steps: 11 supervised steps of 8 records, then 2 of 2 prompts
    assert data_plan(segs, 13) == DataPlan(2, 2, 11 * 8 + 2 * 2)
    # once the schedule is done nothing is left to serve, and every record consumed is counted once
    assert data_plan(segs, 15) == DataPlan(2, 0, 11 * 8 + 4 * 2)


def test_set_lengths_moves_every_later_segment():
    segs = _segments()
    assert set_lengths(segs, [2, 3, 0, 4]) == 9
    assert [(s.start, s.steps) for s in segs] == [(0, 2), (2, 3), (5, 0), (5, 4)]
    assert locate(segs, 5) is segs[3]  # an empty segment holds no step
    with pytest.raises(ValueError, match="3 segment lengths for a schedule of 4 segments"):
        set_lengths(segs, [1, 2, 3])


def test_schedule_state_end_segment_and_round_trip():
    rule = PlateauRule(every=1)
    s = Schedule(_segments(rule))
    assert s.total == 15 and not s.finished and s.segment.name == "cot" and s.data_plan() == data_plan(s.segments, 0)
    s.step = 3
    s.end_segment(0, 3)  # the plateau rule ends cot after 3 steps: later segments move up
    assert s.epoch_over and s.total == 13 and [x.start for x in s.segments] == [0, 3, 6, 9]
    s.step = 7
    state = s.state_dict()
    assert state == {"step_count": 7, "phase": "coconut", "kind": "coconut", "stage": 2, "step_in_stage": 1,
                     "segment_steps": [3, 3, 3, 4]}
    fresh = Schedule(_segments(rule))
    fresh.load_state_dict(state)
    assert fresh.step == 7 and fresh.total == 13 and fresh.segment is fresh.segments[2] and not fresh.epoch_over
    assert fresh.data_plan() == s.data_plan()
    # only a length a plateau rule shortened comes from the checkpoint: the command line decides the others
    # (a resumed run given a longer GRPO phase trains it)
    longer = Schedule(flatten([Phase("cot", steps=5, plateau=rule), Phase("coconut", steps=3, stages=[1, 2]),
                               Phase("grpo", steps=9, name="rl")], 2, BATCH, LR))
    longer.load_state_dict({**state, "segment_steps": [3, 3, 3, 4]})
    assert [x.steps for x in longer.segments] == [3, 3, 3, 9] and longer.total == 18
    other = Schedule(_segments()[:2])  # another schedule's lengths are not applied, the step counter is
    other.load_state_dict(state)
    assert other.step == 7 and [x.steps for x in other.segments] == [5, 3]
    fresh.step = 13
    assert fresh.finished
    one = Schedule(flatten([Phase("cot", steps=5), Phase("coconut", steps=0, stages=[1])], 1, BATCH, LR))
    one.shrink_to_one_step()  # fast_dev_run: one step of every segment that has any
    assert [x.steps for x in one.segments] == [1, 0] and one.total == 1


def test_phase_refuses_bad_values_naming_them():
    with pytest.raises(ValueError, match=r"schedule kind='latent' is unknown; choose cot, coconut, grpo or sft"):
        Phase("latent")
    with pytest.raises(ValueError, match=r"schedule \(cot\) steps=-1 must be >= 0"):
        Phase("cot", steps=-1)
    with pytest.raises(ValueError, match=r"schedule \(warm\) batch_size=0 must be >= 1"):
        Phase("grpo", name="warm", batch_size=0)
    with pytest.raises(ValueError, match=r"lr=0.0 must be > 0"):
        Phase("sft", lr=0.0)
    assert Phase("coconut", plateau={"every": 5}).plateau == PlateauRule(every=5)  # a YAML dict becomes a rule


def test_plateau_watch_ends_a_segment_and_restores_its_best_weights():
    segs = flatten([Phase("cot", steps=10, plateau={"every": 2, "patience": 2, "min_gain": 0.1, "restore_best": True}),
                    Phase("grpo", steps=3)], 1, BATCH, LR)
    s, watch, model = Schedule(segs), PlateauWatch(), torch.nn.Linear(2, 2)
    assert not PlateauWatch.due(segs[0], 1) and PlateauWatch.due(segs[0], 2) and not PlateauWatch.due(segs[1], 12)
    best = None
    for step, value in ((2, 0.2), (4, 0.5), (6, 0.55), (8, 0.58)):
        s.step = step
        with torch.no_grad():
            model.weight.fill_(step)
        if step == 4:
            best = {k: v.clone() for k, v in model.state_dict().items()}
        ended = watch.record(s, segs[0], value, 10, model)
        assert ended is (step == 8), step  # 0.55 and 0.58 do not beat 0.5 by 0.1: two in a row
    assert [x.steps for x in s.segments] == [8, 3] and s.epoch_over
    assert torch.equal(model.weight, best["weight"])  # the weights of step 4, the last new best
    assert watch.history[-1]["restored_step"] == 4 and [h["step"] for h in watch.history] == [2, 4, 6, 8]
    again = PlateauWatch()
    again.load_state_dict(watch.state_dict(), segs)
    assert again.history == watch.history and again.tracker.best == 0.5 and again.tracker.since_best == 2


def test_a_decay_follows_the_constant_part_along_torchs_linear_lr():
    """A phase's decay: ``steps`` more steps after its constant part, the learning rate along torch's
    LinearLR (end_factor floor/lr) stepped before each step, the last step at the floor."""
    from lightning_latent.schedule import Decay

    seg = flatten([Phase("coconut", steps=4, stages=[1], lr=1e-3, decay={"steps": 5, "floor": 1e-4})], 1, BATCH, LR)[0]
    assert seg.steps == 9 and seg.decay == Decay(steps=5, floor=1e-4) and seg.decay_after == 4
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.1, total_iters=5)
    torch_lrs = []
    for _ in range(5):
        sched.step()
        torch_lrs.append(opt.param_groups[0]["lr"])
    assert [seg.lr_at(k) for k in range(4)] == [1e-3] * 4
    assert [seg.lr_at(k) for k in range(4, 9)] == pytest.approx(torch_lrs) and seg.lr_at(8) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="a decay is for supervised phases"):
        Phase("grpo", decay={"steps": 2})
    with pytest.raises(ValueError, match="steps must be >= 1 and floor > 0"):
        Decay(steps=0)


def test_a_plateau_starts_the_decay_early_and_a_resume_keeps_it():
    """The plateau rule firing at step 6 of a 20-step cap starts the 4-step decay there: the segment ends at
    10, its last evaluations are not repeated during the decay, and a checkpoint carries where it began."""
    rule = PlateauRule(every=2, patience=2, min_gain=0.5)
    segs = flatten([Phase("cot", steps=20, lr=1e-3, plateau=rule, decay={"steps": 4, "floor": 1e-5}),
                    Phase("grpo", steps=3)], 1, BATCH, LR)
    s, watch, model = Schedule(segs), PlateauWatch(), torch.nn.Linear(2, 2)
    ended = []
    for step in range(1, 11):
        s.step = step
        if PlateauWatch.due(segs[0], step):
            ended.append((step, watch.record(s, segs[0], 0.3, 10, model)))
    assert ended == [(2, False), (4, False), (6, True)]  # no evaluation at 8: the decay has begun
    assert segs[0].steps == 10 and segs[0].decay_after == 6 and segs[1].start == 10 and s.epoch_end == 10
    assert segs[0].lr_at(5) == 1e-3 and segs[0].lr_at(9) == pytest.approx(1e-5)
    state = s.state_dict()
    fresh = Schedule(flatten([Phase("cot", steps=20, lr=1e-3, plateau=rule, decay={"steps": 4, "floor": 1e-5}),
                              Phase("grpo", steps=3)], 1, BATCH, LR))
    fresh.load_state_dict(state)
    assert fresh.segments[0].steps == 10 and fresh.segments[0].decay_after == 6 and fresh.total == 13


def test_place_mismatch_names_a_checkpoint_given_another_schedule():
    """A start trained longer by its own one-phase schedule (1,000 steps at stage 4, finished) and then given
    the full curriculum's schedule would be evaluated at the curriculum's step 1,000: its CoT phase."""
    floor = Schedule(flatten([Phase("coconut", steps=4, stages=[2], name="coconut_floor")], 2, BATCH, LR))
    floor.step = 4  # finished: its place is its last segment's
    state = floor.state_dict()
    assert place_mismatch(state, floor.segment) is None
    curriculum = Schedule(_segments())
    curriculum.load_state_dict(state)  # the step counter only: another schedule's lengths are not applied
    why = place_mismatch(state, curriculum.segment)
    assert why is not None and "'coconut_floor' (stage 2, the latent layout)" in why
    assert "'cot' (stage 0, the CoT layout)" in why and "config.yaml" in why
    # the same stage and layout under another phase name (a test config's GRPO phase) is the same place
    assert place_mismatch({"stage": 2, "kind": "grpo", "phase": "dropout_greedy"}, floor.segment) is None
    assert place_mismatch({"step_count": 3}, curriculum.segment) is None  # a record too old to tell
