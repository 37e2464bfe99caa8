"""lightning_latent/rl/update.py: the GRPO update (``grpo_update``), called directly with a plain optimiser
and through the LightningModule (micro-batching and checkpointed latent passes leave the same weights)."""
from __future__ import annotations

import pytest
import torch

from lightning_latent.data.layout import CurriculumConfig, Layout
from lightning_latent.guards import NonFiniteGuard
from lightning_latent.model.latent_lm import LatentLM
from lightning_latent.model.perturb import PerturbConfig, Perturber
from lightning_latent.optim import GuardedOptimizer
from lightning_latent.rl.rollout import rollout, rollout_seed
from lightning_latent.rl.update import GRPOConfig, UpdateResult, grpo_update, keep_groups

from conftest import tiny_gpt2, tiny_trainer

B, K, NEW, STAGE = 3, 4, 6, 4


def text_reward(texts, golds):
    """A deterministic, multi-level reward of the decoded text (ignores the gold): mixed groups."""
    return torch.tensor([float(sum(map(ord, t)) % 5) / 4.0 for t in texts])


def test_grpo_update_with_a_plain_optimizer_takes_mu_steps_and_replays_exactly(word_tokenizer, synth_records):
    """No Lightning: a rollout batch of a tiny model under per-row dropout masks, a plain AdamW in a
    GuardedOptimizer, ``Tensor.backward``. ``mu=2`` gives exactly two optimiser steps, and the first inner
    iteration replays the rollouts' log-probs exactly (the masks are rebuilt from the rows' seeds)."""
    lay = Layout(word_tokenizer, CurriculumConfig(c_thought=1, max_latent_stage=3), max_length=256)
    model = LatentLM(tiny_gpt2(len(word_tokenizer), seed=0), lay.latent_id, lay.start_id, lay.end_id).eval()
    pert = Perturber(model.lm, PerturbConfig(arm="dropout_shared", p=0.2))
    recs = synth_records[:B]
    seeds = torch.tensor([rollout_seed(0, 0, r.idx, j) for r in recs for j in range(K)])
    rb = rollout(model, pert, lay, recs, STAGE, seeds, K, 1.0, NEW, text_reward, word_tokenizer)
    assert (rb.rewards.std(1) > 0).any()  # a non-zero advantage somewhere: the update moves the weights
    params = list(model.parameters())
    adamw = torch.optim.AdamW(params, lr=1e-3)
    opt = GuardedOptimizer(adamw, params, [], grad_clip=1.0, guard=NonFiniteGuard(3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = GRPOConfig(group_size=K, mu=2, beta=0.0, max_new_tokens=NEW, reward="exact_match")
    result = grpo_update(model, pert, rb, cfg, 1.0, None, opt, torch.Tensor.backward)
    assert isinstance(result, UpdateResult)
    assert result.groups_kept == B and result.skipped == 0 and opt.skipped == 0
    stepped = [p for p in params if p in adamw.state]
    assert len(stepped) == len(params)  # every parameter had a gradient
    assert all(int(adamw.state[p]["step"]) == 2 for p in stepped)  # mu = 2 optimiser steps, no more
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    logged = result.log_values()
    assert float(logged["grpo/replay_gap"]) <= 1e-5
    assert logged["grpo/groups_kept"] == float(B) and logged["grpo/grad_norm"] > 0
    # on the first inner iteration every ratio is 1: nothing clipped
    assert float(logged["grpo/clip_frac"]) == 0.0 and float(logged["grpo/ratio_max"]) == pytest.approx(1.0, abs=1e-4)
    assert result.loss is not None and torch.isfinite(result.loss)


def test_no_kept_group_means_no_update():
    cfg = GRPOConfig(group_size=2, dynamic_sampling=True, max_groups=1)
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    assert keep_groups(rewards, cfg).tolist() == [False, True, False]  # mixed ones, at most max_groups
    assert keep_groups(rewards, GRPOConfig(group_size=2)).tolist() == [True, True, True]
    assert UpdateResult(groups_kept=0).log_values() == {"grpo/groups_kept": 0.0, "grpo/skipped_updates": 1.0}


@pytest.mark.parametrize("aggregation", ["grpo", "dapo"])
def test_micro_batched_grpo_update_equals_whole_batch(tmp_path, aggregation):
    """The LightningModule's GRPO step with ``grpo.micro_batch_rows=3`` (8 rollouts: 3 + 3 + 2 rows, one
    backward each) leaves the same parameters as one backward over the whole batch (mu=2, beta>0), and
    so does the whole batch with checkpointed latent passes (``model.checkpoint_latents``)."""
    import lightning as L

    import faults  # noqa: F401  (registers the text_hash reward: mixed groups, a non-zero gradient)
    from lightning_latent.data.datamodule import LatentDataModule
    from lightning_latent.data.layout import CurriculumConfig
    from lightning_latent.model.build import ModelConfig
    from lightning_latent.module import LatentReasoner
    from lightning_latent.rl.update import GRPOConfig
    from lightning_latent.schedule import Phase

    def run(micro, ckpt=False):
        L.seed_everything(0, verbose=False)
        m = LatentReasoner(backbone=ModelConfig(n_layer=1, n_embd=32, n_head=2, checkpoint_latents=ckpt),
                           curriculum=CurriculumConfig(c_thought=1, max_latent_stage=2),
                           schedule=[Phase("grpo", steps=2)], grpo_prompts=2,
                           grpo=GRPOConfig(group_size=4, max_new_tokens=4, reward="text_hash", mu=2, beta=0.05,
                                           aggregation=aggregation, micro_batch_rows=micro))
        start = {k: v.clone() for k, v in m.model.state_dict().items()}
        t = tiny_trainer(tmp_path)
        t.fit(m, datamodule=LatentDataModule(val_limit=4, test_limit=4, eval_batch_size=4))
        return start, m.model.state_dict()

    s0, whole = run(None)
    s1, micro = run(3)
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    assert any(not torch.equal(s0[k], whole[k]) for k in s0)  # the update did something
    s2, ckpt = run(None, ckpt=True)
    for k in whole:
        assert torch.allclose(whole[k], micro[k], atol=1e-6), k
        assert torch.allclose(whole[k], ckpt[k], atol=1e-6), k
