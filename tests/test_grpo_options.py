"""Hand-computed checks of the TRL-compatibility options of lightning_latent.rl.loss.

``group_advantages(..., std_kind="sample")`` and ``grpo_loss(..., kl_importance_ratio=True)``; their
agreement with TRL itself is in ``tests/test_trl_conformance.py`` (needs trl).
"""
from __future__ import annotations

import math

import pytest
import torch

from lightning_latent.rl.loss import grpo_loss, group_advantages

R = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.3, 0.3, 0.3]])


def test_std_kind_sample_by_hand() -> None:
    # Rows 0-1: centred [2/3, -1/3, -1/3] / [1/3, 1/3, -2/3]; sum of squares 2/3, sample var (2/3)/2 = 1/3.
    std = math.sqrt(1 / 3)
    centred = torch.tensor([[2 / 3, -1 / 3, -1 / 3], [1 / 3, 1 / 3, -2 / 3]])
    a = group_advantages(R, "std", eps=1e-4, std_kind="sample")
    torch.testing.assert_close(a[:2], centred / (std + 1e-4))
    assert (a[2] == 0).all()
    # Population std is sqrt((K-1)/K) times the sample std.
    pop = group_advantages(R, "std", eps=1e-12)
    torch.testing.assert_close(pop[:2] / a[:2].mul((std + 1e-4) / std), torch.full((2, 3), math.sqrt(3 / 2)))


def test_std_kind_default_and_other_modes_unchanged() -> None:
    for mode in ("mean", "std", "none"):
        base = group_advantages(R, mode)  # type: ignore[arg-type]
        assert torch.equal(base, group_advantages(R, mode, std_kind="population"))  # type: ignore[arg-type]
    for mode in ("mean", "none"):
        sample = group_advantages(R, mode, std_kind="sample")  # type: ignore[arg-type]
        assert torch.equal(group_advantages(R, mode), sample)  # type: ignore[arg-type]


def test_std_kind_single_rollout_and_bad_value() -> None:
    a = group_advantages(torch.tensor([[1.0], [0.0]]), "std", std_kind="sample")
    assert a.tolist() == [[0.0], [0.0]]
    with pytest.raises(ValueError, match="bogus"):
        group_advantages(R, "std", std_kind="bogus")  # type: ignore[arg-type]


def _kl_case():
    torch.manual_seed(0)
    logp = (torch.randn(3, 4, dtype=torch.float64) - 2.0).requires_grad_(True)
    ref = logp.detach() + 0.3 * torch.randn(3, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    return logp, ref, mask


def test_kl_importance_ratio_on_policy_gradient_by_hand() -> None:
    """On-policy (ratio == 1 in value) the loss is unchanged but the KL gradient per token becomes
    beta * (logp - ref) (d/dl [e^(l-o) k3]) instead of beta * (1 - exp(ref - logp)) (d/dl k3)."""
    logp, ref, mask = _kl_case()
    beta = 0.5
    adv = torch.zeros(3, dtype=torch.float64)  # only the KL term
    n_tok = mask.sum(dim=1, keepdim=True).double()
    weight = mask.double() / n_tok / 3  # grpo aggregation: per-sequence mean, then mean over 3 rows
    losses = {}
    for corr in (False, True):
        loss, _ = grpo_loss(logp, logp.detach(), adv, mask, ref_logp=ref, beta=beta, kl_importance_ratio=corr)
        (g,) = torch.autograd.grad(loss, logp)
        d = (ref - logp).detach()
        expected = beta * (-d if corr else 1 - torch.exp(d)) * weight
        torch.testing.assert_close(g, expected)
        losses[corr] = loss.detach()
    torch.testing.assert_close(losses[True], losses[False])


def test_kl_importance_ratio_off_policy_value_and_defaults() -> None:
    logp, ref, mask = _kl_case()
    old = logp.detach() + 0.1
    adv = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    plain, _ = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=0.1, aggregation="dapo")
    corr, stats = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=0.1, aggregation="dapo",
                            kl_importance_ratio=True)
    d = ref - logp.detach()
    k3 = torch.exp(d) - d - 1
    ratio = torch.exp(logp.detach() - old)
    extra = 0.1 * ((ratio - 1) * k3 * mask).sum() / mask.sum()
    torch.testing.assert_close(corr.detach() - plain.detach(), extra)
    # The kl stat stays the unweighted mean k3; beta = 0 ignores the flag.
    torch.testing.assert_close(stats["kl"], (k3 * mask).sum() / mask.sum())
    a, _ = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=0.0, kl_importance_ratio=True)
    b, _ = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=0.0)
    assert torch.equal(a, b)


def test_kl_clamp_infinite_is_unclamped() -> None:
    logp, _, mask = _kl_case()
    ref = logp.detach() + torch.tensor([20.0, -15.0, 0.1, 0.0]).double()  # far outside +-10 on two columns
    adv = torch.zeros(3, dtype=torch.float64)
    clamped, s1 = grpo_loss(logp, logp.detach(), adv, mask, ref_logp=ref, beta=1.0)
    free, s2 = grpo_loss(logp, logp.detach(), adv, mask, ref_logp=ref, beta=1.0, kl_clamp=math.inf)
    assert s1["kl_clamped"] > 0 and s2["kl_clamped"] == 0
    d = ref - logp.detach()
    expected = (((torch.exp(d) - d - 1) * mask).sum(1) / mask.sum(1)).mean()
    torch.testing.assert_close(free.detach(), expected)
    assert free > clamped
