"""Guards and diagnostics of GRPO runs: the collapse guard, truncated rollouts, GRPO on a CoT model.

A tiny GPT-2 trained for 150 steps on one-step additions (94% greedy pass@1 with the CoT layout, about
10 s) is the start: a model that scores > 0, so its groups are mixed before anything goes wrong.
"""
from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_latent.data.datamodule import LatentDataModule
from lightning_latent.data.layout import CurriculumConfig
from lightning_latent.data.synthetic import SyntheticConfig
from lightning_latent.evaluation import EvalConfig
from lightning_latent.guards import CollapseError, CollapseGuard
from lightning_latent.model.build import ModelConfig
from lightning_latent.model.perturb import PerturbConfig
from lightning_latent.module import LatentReasoner
from lightning_latent.optim import OptimConfig
from lightning_latent.rl.rewards import REWARDS
from lightning_latent.rl.rollout import rollout, rollout_seed, rollout_stats
from lightning_latent.rl.update import GRPOConfig
from lightning_latent.schedule import Phase

from conftest import tiny_trainer

SYN = SyntheticConfig(min_steps=1, max_steps=1, max_number=5, max_value=20, operators="+")
REWARDS["always_zero"] = lambda texts, golds: torch.zeros(len(texts))
REWARDS["gold_parity"] = lambda texts, golds: torch.tensor([float(int(g) % 2) for g in golds])


def tiny(schedule, **kw) -> LatentReasoner:
    kw.setdefault("evaluation", EvalConfig(max_new_tokens=16))
    return LatentReasoner(backbone=ModelConfig(n_layer=2, n_embd=64, n_head=2, n_positions=64), max_length=64,
                          synthetic=SYN, curriculum=CurriculumConfig(c_thought=1, max_latent_stage=1),
                          schedule=schedule, **kw)


def fit(module, root, steps_log: list | None = None) -> L.Trainer:
    t = tiny_trainer(root)
    t.fit(module, datamodule=LatentDataModule(synthetic=SYN, val_limit=32, test_limit=32, eval_batch_size=32))
    return t


@pytest.fixture(scope="module")
def cot_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("cot")
    L.seed_everything(0, verbose=False)
    m = tiny([Phase("cot", steps=150)], batch_size=32)
    t = fit(m, root)
    path = root / "cot.ckpt"
    t.save_checkpoint(str(path))
    return str(path)


def grpo_from(ckpt, lr=1e-4, reward="exact_match", arm="temperature", steps=6, patience=3) -> LatentReasoner:
    L.seed_everything(0, verbose=False)
    return tiny([Phase("grpo", steps=steps, stages=[0])], init_from=ckpt, grpo_prompts=8,
                optim=OptimConfig(grpo_lr=lr), perturb=PerturbConfig(arm=arm),
                grpo=GRPOConfig(group_size=4, max_new_tokens=16, collapse_patience=patience, reward=reward))


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


def test_grpo_at_stage_0_uses_the_cot_prompt(cot_ckpt):
    m = tiny([Phase("cot", steps=1), Phase("grpo", steps=1, stages=[0])])
    cot_seg, grpo_seg = m.segments
    assert cot_seg.cot_layout and grpo_seg.cot_layout
    recs = LatentDataModule(synthetic=SYN, val_limit=4).eval_records("validation")
    m.step_count = 1  # in the GRPO segment
    assert m.eval_stage() == (0, True)
    rb = rollout(m.model, m.perturber, m.layout, recs, 0, torch.arange(8), 2, 1.0, 4, REWARDS["exact_match"],
                 m.tokenizer, cot=grpo_seg.cot_layout)
    for i, r in enumerate(recs):
        cot_prompt = m.layout.prompt(r, cot_seg.stage, cot=True)  # what the CoT phase trained and evaluated with
        row = rb.prompt_ids[2 * i][rb.prompt_mask[2 * i].bool()].tolist()
        assert row == cot_prompt
        assert m.layout.start_id not in row and m.layout.end_id not in row


def test_truncated_rollouts_are_counted(cot_ckpt):
    m = grpo_from(cot_ckpt)
    recs = LatentDataModule(synthetic=SYN, val_limit=8).eval_records("validation")
    seeds = torch.tensor([rollout_seed(0, 0, r.idx, j) for r in recs for j in range(2)])
    for max_new in (3, 16):
        rb = rollout(m.model, m.perturber, m.layout, recs, 0, seeds, 2, 1.0, max_new, REWARDS["exact_match"],
                     m.tokenizer, cot=True)
        lengths = rb.mask.sum(1)
        ended = [m.layout.eos_id in rb.tokens[i, : int(lengths[i])].tolist() for i in range(len(seeds))]
        assert rb.truncated.tolist() == [not e for e in ended]
        frac = rollout_stats(rb, 1.0)["grpo/truncated_frac"]
        assert frac == pytest.approx(sum(not e for e in ended) / len(ended))
        if max_new == 3:  # an answer here is about 12 tokens: every rollout is cut off
            assert frac == 1.0 and float(rb.rewards.sum()) == 0.0
        else:
            assert frac < 0.5
