"""lightning_latent/experiments/grad_signal.py: the signal share of a batch gradient, by hand, and the
gradients it is taken of on a tiny trained start."""
from __future__ import annotations

import math

import pytest
import torch

from lightning_latent.experiments.diversity import DiversitySetting
from lightning_latent.experiments.grad_signal import (
    grpo_gradient,
    sft_gradient,
    signal_share,
)


def test_signal_share_by_hand():
    mu, e1, e2 = torch.eye(3)  # a unit mean gradient and two unit noise draws, all orthogonal
    # g.g' = |mu|^2 = 1, |g|^2 = 2: half of a batch's squared gradient is signal; one more batch evens it
    s = signal_share(torch.stack([mu + e1, mu + e2]))
    assert s["signal_share"] == pytest.approx(0.5) and s["mean_pairwise_cos"] == pytest.approx(0.5)
    assert s["batches_for_even"] == pytest.approx(1.0) and s["grad_norm"] == pytest.approx(math.sqrt(2))
    same = signal_share(torch.stack([mu, mu, mu]))
    assert same["signal_share"] == pytest.approx(1.0) and same["signal_share_se"] == pytest.approx(0.0)
    # three batches, one of them off the others: each delete-one share by hand (1 with it out, 1/2 with it in)
    loo = signal_share(torch.stack([mu + e1, mu + e1, mu + e2]))  # cross terms 2, 1, 1 over |g|^2 = 2
    assert loo["signal_share"] == pytest.approx((2 + 1 + 1) / 3 / 2)
    assert loo["signal_share_se"] == pytest.approx(math.sqrt(2 / 3 * ((1 - 2 / 3) ** 2 + 2 * (0.5 - 2 / 3) ** 2)))
    pure_noise = signal_share(torch.stack([e1, e2]))
    assert pure_noise["signal_share"] == 0.0 and pure_noise["batches_for_even"] == math.inf
    with pytest.raises(ValueError, match="B >= 2"):
        signal_share(mu[None])


def test_greedy_groups_without_noise_give_no_gradient_and_noise_gives_one(cot_ckpt):
    """The premise in gradient form: greedy answers and no noise make every group agree, so GRPO's gradient is
    exactly zero; sampled answers give one. The supervised gradient is never zero."""
    from lightning_latent.checkpoints import load_module
    from lightning_latent.data.synthetic import synthetic_record

    module = load_module(cot_ckpt)
    recs = [synthetic_record(module.hparams["synthetic"], "train", i) for i in range(32)]
    n = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    cot = {"stage": 0, "cot_layout": True}  # a CoT model: its own stage and layout
    g_none, _ = grpo_gradient(module, DiversitySetting("none", 0.0, temperature=0.0), recs, 4, 0, 0, **cot)
    assert g_none.shape == (n,) and torch.count_nonzero(g_none) == 0
    g_t, r_t = grpo_gradient(module, DiversitySetting("temperature", 0.0, temperature=1.0), recs, 4, 0, 0, **cot)
    assert g_t.norm() > 0 and 0.0 < r_t < 1.0  # (some sampled answers are wrong: the groups differ)
    again, _ = grpo_gradient(module, DiversitySetting("temperature", 0.0, temperature=1.0), recs, 4, 0, 0, **cot)
    assert torch.equal(g_t, again)  # seeded rollouts: the same batch, the same gradient
    assert sft_gradient(module, recs, 0, 0, **cot).norm() > 0
    assert not module.model.training and all(p.grad is None for p in module.model.parameters())
