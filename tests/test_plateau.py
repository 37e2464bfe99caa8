"""The plateau rule: a segment ends once validation pass@1 stops improving; later segments move up; the
data stream and a resumed run follow the shortened schedule."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_latent.data.datamodule import LatentDataModule
from lightning_latent.data.layout import CurriculumConfig
from lightning_latent.model.build import ModelConfig
from lightning_latent.module import LatentReasoner
from lightning_latent.schedule import Phase, PlateauRule, PlateauTracker, flatten

from conftest import tiny_trainer


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


class Trace(L.Callback):
    def __init__(self):
        self.steps: list[tuple[int, str, int, list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.pending = (pl_module.step_count, pl_module.segment.name, pl_module.segment.stage, [r.idx for r in batch])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.step_count == self.pending[0] + 1:  # trained (a batch past the end is drawn, not trained)
            self.steps.append(self.pending)


def _run(tmp_path, max_steps=None, ckpt=None):
    L.seed_everything(0, verbose=False)
    never_better = {"every": 2, "patience": 1, "min_gain": 1.0}  # ends each segment at its 2nd evaluation
    m = LatentReasoner(backbone=ModelConfig(n_layer=1, n_embd=32, n_head=2),
                       curriculum=CurriculumConfig(c_thought=1, max_latent_stage=2), batch_size=4,
                       schedule=[Phase("cot", steps=10, plateau=never_better),
                                 Phase("coconut", steps=6, stages=[1, 2], plateau=never_better)])
    trace = Trace()
    cbs = [trace]
    if max_steps is not None:
        cbs.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path), save_last=True, every_n_train_steps=1))
    t = tiny_trainer(tmp_path, enable_checkpointing=max_steps is not None, callbacks=cbs, max_steps=max_steps or -1)
    t.fit(m, datamodule=LatentDataModule(val_limit=4, test_limit=4, eval_batch_size=4), ckpt_path=ckpt)
    return m, trace


def test_segments_end_at_the_plateau_and_the_rest_moves_up(tmp_path):
    m, trace = _run(tmp_path)
    assert [(s.name, s.stage, s.start, s.steps) for s in m.segments] == [
        ("cot", 0, 0, 4), ("coconut", 1, 4, 4), ("coconut", 2, 8, 4)]
    assert m.step_count == m.total_steps == 12
    assert [(t[0], t[1], t[2]) for t in trace.steps] == [(i, "cot", 0) for i in range(4)] + \
        [(i, "coconut", 1) for i in range(4, 8)] + [(i, "coconut", 2) for i in range(8, 12)]
    ids = [i for t in trace.steps for i in t[3]]
    assert ids == list(range(len(ids)))  # the stream continues where the shortened segment stopped
    assert [h["steps_in_stage"] for h in m.plateau.history] == [2, 4, 2, 4, 2, 4]


def test_a_resumed_run_keeps_the_shortened_schedule(tmp_path):
    full, full_trace = _run(tmp_path / "full")
    _run(tmp_path / "a", max_steps=6)  # stopped inside coconut stage 1 (after cot ended early at 4)
    resumed, trace = _run(tmp_path / "b", ckpt=str(tmp_path / "a" / "last.ckpt"))
    assert [s.steps for s in resumed.segments] == [s.steps for s in full.segments]
    assert trace.steps == full_trace.steps[6:]
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


class Weights(L.Callback):
    """The model's weights after every training step, by step count."""

    def __init__(self):
        self.after: dict[int, dict] = {}
        self.before: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[pl_module.step_count] = {k: v.clone() for k, v in pl_module.model.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[pl_module.step_count] = {k: v.clone() for k, v in pl_module.model.state_dict().items()}


@pytest.mark.parametrize("restore", [False, True])
def test_restore_best_hands_the_next_stage_the_best_weights(tmp_path, restore):
    L.seed_everything(0, verbose=False)
    # ends the CoT segment at its 2nd evaluation (step 4); the 1st (step 2) is the best
    rule = {"every": 2, "patience": 1, "min_gain": 1.0, "restore_best": restore}
    m = LatentReasoner(backbone=ModelConfig(n_layer=1, n_embd=32, n_head=2),
                       curriculum=CurriculumConfig(c_thought=1, max_latent_stage=1), batch_size=4,
                       schedule=[Phase("cot", steps=10, plateau=rule), Phase("coconut", steps=2, stages=[1])])
    w = Weights()
    t = tiny_trainer(tmp_path, enable_checkpointing=False, callbacks=[w])
    t.fit(m, datamodule=LatentDataModule(val_limit=4, test_limit=4, eval_batch_size=4))
    assert [s.steps for s in m.segments] == [4, 2]
    start_of_stage1 = w.before[4]
    same_as_best = all(torch.equal(v, w.after[2][k]) for k, v in start_of_stage1.items())
    assert same_as_best is restore  # without it stage 1 starts from step 4's weights, not step 2's
    assert (m.plateau.history[1].get("restored_step") == 2) is restore


def test_a_coconut_phase_can_give_each_stage_its_own_steps():
    segs = flatten([Phase("cot", steps=5), Phase("coconut", steps=[2, 3, 7], stages=[1, 2, 3])], 3,
                   {"sft": 8, "grpo": 2}, {"sft": 1e-3, "grpo": 1e-4})
    assert [(s.stage, s.start, s.steps) for s in segs] == [(0, 0, 5), (1, 5, 2), (2, 7, 3), (3, 10, 7)]
    with pytest.raises(ValueError, match=r"schedule\[0\].steps=\[2, 3\] gives 2 step counts for 3 stages"):
        flatten([Phase("coconut", steps=[2, 3], stages=[1, 2, 3])], 3, {"sft": 8, "grpo": 2}, {"sft": 1e-3, "grpo": 1e-4})
    with pytest.raises(ValueError, match=r"steps=\[2, -1\] must be >= 0"):
        Phase("coconut", steps=[2, -1], stages=[1, 2])
