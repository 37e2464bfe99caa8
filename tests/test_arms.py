"""lightning_latent/model/arms.py, the arm registry: every arm's behaviour comes from its entry, and a new arm
is one entry (``tests/toy_arm.py``)."""
from __future__ import annotations

import lightning as L
import pytest
import torch

import faults  # noqa: F401  (registers the text_hash reward: mixed groups, a non-zero gradient)
import toy_arm
from lightning_latent.data.datamodule import LatentDataModule
from lightning_latent.data.layout import CurriculumConfig
from lightning_latent.model.arms import ARMS, get_arm, study_arms
from lightning_latent.model.build import ModelConfig
from lightning_latent.model.perturb import PerturbConfig, Perturber
from lightning_latent.module import LatentReasoner
from lightning_latent.rl.rollout import replay_logprobs, rollout, rollout_seed
from lightning_latent.rl.update import GRPOConfig
from lightning_latent.schedule import Phase

from conftest import tiny_trainer


def test_builtin_arms_and_what_derives_from_them():
    assert study_arms() == ("none", "temperature", "dropout_per_step", "gaussian", "dropout_shared", "dropout_greedy",
                            "sft_continue", "cot_grpo")
    assert [a for a in ARMS if ARMS[a].start == "cot"] == ["cot_grpo"]
    assert [a for a in ARMS if ARMS[a].greedy_answers] == ["none", "dropout_greedy"]  # greedy answers
    assert PerturbConfig(arm="dropout_greedy", p=0.1).is_dropout  # masks: the only noise of dropout_greedy
    assert [a for a in ARMS if ARMS[a].phase == "sft"] == ["sft_continue"]
    assert PerturbConfig(arm="dropout_per_step").arm_entry.per_step and PerturbConfig(arm="dropout_shared").is_dropout
    assert not PerturbConfig(arm="gaussian").arm_entry.uses_sites and PerturbConfig(arm="gaussian").active
    assert not PerturbConfig(arm="temperature").active
    with pytest.raises(ValueError, match=r"perturb.arm='nope' is unknown; choose one of \("):
        PerturbConfig(arm="nope")
    assert "uniform_thought" not in study_arms()  # a registered arm outside the study's default list


@pytest.mark.parametrize("arm", ["none", "dropout_greedy"])
def test_greedy_arms_decode_greedily_whatever_the_temperature(arm):
    m = LatentReasoner(backbone=ModelConfig(n_layer=1, n_embd=32, n_head=2), perturb=PerturbConfig(arm=arm),
                       grpo=GRPOConfig(answer_temperature=1.0), schedule=[Phase("grpo", steps=1)])
    assert m.rollout_temperature == 0.0
    m = LatentReasoner(backbone=ModelConfig(n_layer=1, n_embd=32, n_head=2), perturb=PerturbConfig(arm="temperature"),
                       grpo=GRPOConfig(answer_temperature=0.7), schedule=[Phase("grpo", steps=1)])
    assert m.rollout_temperature == 0.7


def test_toy_arm_defined_in_one_file_trains_and_replays(tmp_path, make_latent_lm, layout, synth_records,
                                                       word_tokenizer):
    assert get_arm("uniform_thought") is toy_arm.TOY_ARM
    # Its thought function perturbs every rollout differently and replays exactly.
    model = make_latent_lm()
    pert = Perturber(model.lm, PerturbConfig(arm="uniform_thought", noise_scale=0.5))
    recs = synth_records[:2]
    seeds = torch.tensor([rollout_seed(0, 0, r.idx, j) for r in recs for j in range(4)])
    rb = rollout(model, pert, layout, recs, 4, seeds, 4, 1.0, 6, faults.REWARDS["text_hash"], word_tokenizer)
    th = rb.final_thought.view(2, 4, -1)
    assert torch.cdist(th[0], th[0]).fill_diagonal_(1.0).min() > 1e-4
    logp, _ = replay_logprobs(model, pert, rb, 1.0)
    assert ((logp - rb.logprobs).abs() * rb.mask).max() <= 1e-5
    # ... and runs through a tiny fit (a GRPO step that updates the weights), with no package file edited.
    L.seed_everything(0, verbose=False)
    m = LatentReasoner(backbone=ModelConfig(n_layer=1, n_embd=32, n_head=2),
                       curriculum=CurriculumConfig(c_thought=1, max_latent_stage=2),
                       perturb=PerturbConfig(arm="uniform_thought", noise_scale=0.5),
                       schedule=[Phase("grpo", steps=2)], grpo_prompts=2,
                       grpo=GRPOConfig(group_size=4, max_new_tokens=4, reward="text_hash"))
    start = {k: v.clone() for k, v in m.model.state_dict().items()}
    t = tiny_trainer(tmp_path)
    t.fit(m, datamodule=LatentDataModule(val_limit=4, test_limit=4, eval_batch_size=4))
    assert m.step_count == 2
    assert t.callback_metrics["grpo/thought_diversity"] > 0
    assert any(not torch.equal(start[k], v) for k, v in m.model.state_dict().items())
