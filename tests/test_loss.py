"""lightning_latent/rl/loss.py: hand-computed checks of the GRPO loss pieces (advantages, group statistics,
log-probs and entropy, the k3 KL, the clipped loss and its aggregations) and of its TRL-compatibility
options (``group_advantages(..., std_kind="sample")``, ``grpo_loss(..., kl_importance_ratio=True)``; their
agreement with TRL itself is in ``tests/integration/test_trl_conformance.py``, which needs trl)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_latent.rl.loss import (
    grpo_loss,
    group_advantages,
    group_stats,
    k3_kl,
    select_mixed_groups,
    sequence_logprobs,
    token_entropy,
)

# --------------------------------------------------------------------------------------------------
# advantages and group statistics
# --------------------------------------------------------------------------------------------------

R = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])


def test_advantages_mean() -> None:
    # row 0: mean 1/3 -> [2/3, -1/3, -1/3]; row 1: mean 2/3 -> [1/3, 1/3, -2/3]
    expected = torch.tensor([[2 / 3, -1 / 3, -1 / 3], [1 / 3, 1 / 3, -2 / 3]])
    torch.testing.assert_close(group_advantages(R, "mean"), expected)


def test_advantages_std() -> None:
    # Population std of both rows: sqrt(((2/3)^2 + 2 (1/3)^2) / 3) = sqrt(2/9) = sqrt(2)/3.
    std = math.sqrt(2) / 3
    centred = torch.tensor([[2 / 3, -1 / 3, -1 / 3], [1 / 3, 1 / 3, -2 / 3]])
    expected = centred / (std + 1e-4)
    torch.testing.assert_close(group_advantages(R, "std", eps=1e-4), expected)
    # row 0 first entry ~ (2/3) / 0.47150 = 1.41391
    assert group_advantages(R, "std")[0, 0].item() == pytest.approx(1.41391, abs=1e-4)


def test_advantages_none() -> None:
    torch.testing.assert_close(group_advantages(R, "none"), R)
    # A constant group gets 0 even in mode "none" (no relative signal).
    r = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    assert group_advantages(r, "none").tolist() == [[0.0, 0.0, 0.0], [1.0, 0.0, 1.0]]


@pytest.mark.parametrize("mode", ["mean", "std", "none"])
def test_zero_variance_groups_exactly_zero(mode: str) -> None:
    # 0.1 - mean([0.1, 0.1, 0.1]) is not exactly 0 in float32; the spec says it must be.
    r = torch.tensor([[0.1, 0.1, 0.1], [0.3, 0.3, 0.3], [0.0, 0.0, 0.0], [1.0, 0.0, 0.5]])
    a = group_advantages(r, mode)  # type: ignore[arg-type]
    assert (a[:3] == 0).all()
    assert not torch.isnan(a).any()
    assert (a[3] != 0).any()


def test_advantages_bad_mode() -> None:
    with pytest.raises(ValueError, match="bogus"):
        group_advantages(R, "bogus")  # type: ignore[arg-type]


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.lists(st.sampled_from([0.0, 0.1, 0.3, 1.0, 2.5]), min_size=4, max_size=4),
        min_size=1,
        max_size=5,
    )
)
def test_advantages_properties(rows: list[list[float]]) -> None:
    r = torch.tensor(rows)
    for mode in ("mean", "std", "none"):
        a = group_advantages(r, mode)  # type: ignore[arg-type]
        assert torch.isfinite(a).all()
        flat = (r == r[:, :1]).all(dim=1)
        assert (a[flat] == 0).all()
    # mean-centred advantages sum to ~0 within each group
    assert group_advantages(r, "mean").sum(dim=1).abs().max() < 1e-5


def test_group_stats_and_selection() -> None:
    r = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.5, 0.5]])
    s = group_stats(r)
    assert s["frac_zero_std"].item() == pytest.approx(0.75)
    assert s["frac_all_correct"].item() == pytest.approx(0.25)
    assert s["frac_all_wrong"].item() == pytest.approx(0.25)
    assert s["frac_mixed"].item() == pytest.approx(0.25)
    assert s["reward_mean"].item() == pytest.approx(0.5)
    # population std of [1,1,0,0,1,0,.5,.5]: deviations +-0.5 six times, 0 twice -> sqrt(1.5/8)
    assert s["reward_std"].item() == pytest.approx(math.sqrt(1.5 / 8))
    assert select_mixed_groups(r).tolist() == [False, False, True, False]


# --------------------------------------------------------------------------------------------------
# log-probs and entropy
# --------------------------------------------------------------------------------------------------


def test_sequence_logprobs_and_entropy() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 7)
    tokens = torch.randint(0, 7, (3, 4))
    for temp in (1.0, 0.7):
        ref = torch.log_softmax(logits / temp, -1).gather(-1, tokens[..., None]).squeeze(-1)
        torch.testing.assert_close(sequence_logprobs(logits, tokens, temp), ref)
    # uniform logits: entropy = ln V at every position
    ent = token_entropy(torch.zeros(2, 3, 5))
    torch.testing.assert_close(ent, torch.full((2, 3), math.log(5)))
    assert (token_entropy(logits, 0.5) < token_entropy(logits, 2.0)).all()
    with pytest.raises(ValueError):
        sequence_logprobs(logits, tokens, 0.0)


# --------------------------------------------------------------------------------------------------
# k3 KL
# --------------------------------------------------------------------------------------------------


def test_k3_kl_zero_and_positive() -> None:
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    kl, n = k3_kl(logp, logp.clone())
    assert (kl == 0).all() and n.item() == 0
    # d = ref - logp = ln 2 -> exp(d) - d - 1 = 2 - ln2 - 1 = 0.306853
    # d = -ln 2            -> 0.5 + ln2 - 1 = 0.193147
    ref = logp + torch.tensor([[math.log(2), -math.log(2), 0.0]])
    kl, n = k3_kl(logp, ref)
    torch.testing.assert_close(kl, torch.tensor([[1 - math.log(2), math.log(2) - 0.5, 0.0]]))
    assert (kl[0, :2] > 0).all() and n.item() == 0


def test_k3_kl_clamp_counting() -> None:
    logp = torch.zeros(1, 4)
    ref = torch.tensor([[20.0, -20.0, 9.0, 0.0]])
    kl, n = k3_kl(logp, ref, clamp=10.0)
    assert n.item() == 2
    assert torch.isfinite(kl).all()
    assert kl[0, 0].item() == pytest.approx(math.exp(10) - 11, rel=1e-6)
    assert kl[0, 1].item() == pytest.approx(math.exp(-10) + 9, rel=1e-6)
    # with a mask, only the masked positions are counted
    _, n_masked = k3_kl(logp, ref, clamp=10.0, mask=torch.tensor([[0, 1, 1, 1]]))
    assert n_masked.item() == 1


# --------------------------------------------------------------------------------------------------
# the loss, by hand
# --------------------------------------------------------------------------------------------------
#
# Two sequences, T = 3, epsilon = 0.2 (clip range [0.8, 1.2]).
#   row 0: A = +1,   mask [1, 1, 0], ratios [1.1, 1.5, pad]
#   row 1: A = -0.5, mask [1, 1, 1], ratios [0.5, 1.0, 1.25]
# Per token pg = -min(r A, clip(r) A); gradient w.r.t. logp is -r A where the unclipped branch is
# active (d ratio / d logp = ratio) and 0 where the clipped (constant) branch is active:
#   r0t0: r=1.1 inside the range        -> pg = -1.1,                      grad -1.1
#   r0t1: r=1.5 > 1.2 and A>0 -> clipped -> pg = -1.2,                      grad 0
#   r1t0: r=0.5 < 0.8 and A<0 -> clipped -> min(-0.25, -0.4) = -0.4, pg 0.4, grad 0
#   r1t1: r=1.0                          -> pg = 0.5,                       grad -(1.0)(-0.5) = 0.5
#   r1t2: r=1.25 > 1.2 but A<0: unclipped -0.625 < clipped -0.6, so NOT clipped
#                                        -> pg = 0.625,                     grad 0.625
# Sum over answer tokens: -1.1 - 1.2 + 0.4 + 0.5 + 0.625 = -0.775; 5 answer tokens.
RATIOS = torch.tensor([[1.1, 1.5, 1.0], [0.5, 1.0, 1.25]], dtype=torch.float64)
OLD = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])
ADV = torch.tensor([1.0, -0.5], dtype=torch.float64)
PG_GRAD = torch.tensor([[-1.1, 0.0, 0.0], [0.0, 0.5, 0.625]], dtype=torch.float64)


def _logp() -> torch.Tensor:
    logp = (OLD + RATIOS.log()).clone()
    logp[0, 2] = float("-inf")  # padding may hold -inf: must not leak into loss or gradient
    return logp.requires_grad_(True)


@pytest.mark.parametrize(
    "aggregation, max_tokens, expected_loss, grad_scale",
    [
        # grpo: row means (-1.1-1.2)/2 = -1.15 and (0.4+0.5+0.625)/3 = 0.508333, then mean of rows
        #       = -0.3208333; token grads scale by 1/(len_row * N): row 0 by 1/4, row 1 by 1/6.
        ("grpo", None, (-1.15 + 1.525 / 3) / 2, torch.tensor([[1 / 4], [1 / 6]])),
        # dapo: -0.775 / 5 answer tokens = -0.155; every grad scaled by 1/5.
        ("dapo", None, -0.775 / 5, torch.tensor([[1 / 5], [1 / 5]])),
        # dr_grpo: -0.775 / (N * T) = -0.775 / 6 = -0.1291667; grads by 1/6.
        ("dr_grpo", None, -0.775 / 6, torch.tensor([[1 / 6], [1 / 6]])),
        # dr_grpo with max_tokens = 5: -0.775 / (2 * 5) = -0.0775; grads by 1/10.
        ("dr_grpo", 5, -0.0775, torch.tensor([[1 / 10], [1 / 10]])),
    ],
)
def test_grpo_loss_by_hand(aggregation, max_tokens, expected_loss, grad_scale) -> None:
    logp = _logp()
    loss, stats = grpo_loss(
        logp, OLD, ADV, MASK, ref_logp=None, beta=0.0, epsilon=0.2,
        aggregation=aggregation, max_tokens=max_tokens,
    )
    assert loss.item() == pytest.approx(expected_loss, abs=1e-9)
    loss.backward()
    torch.testing.assert_close(logp.grad, PG_GRAD * grad_scale.double())
    assert stats["pg_loss"].item() == pytest.approx(expected_loss, abs=1e-9)
    # clipped: r0t1 (high) and r1t0 (low) of 5 answer tokens
    assert stats["clip_frac"].item() == pytest.approx(0.4)
    assert stats["clip_frac_high"].item() == pytest.approx(0.2)
    assert stats["clip_frac_low"].item() == pytest.approx(0.2)
    # ratio mean over answer tokens (1.1 + 1.5 + 0.5 + 1.0 + 1.25) / 5 = 1.07
    assert stats["ratio_mean"].item() == pytest.approx(1.07)
    assert stats["ratio_min"].item() == pytest.approx(0.5)
    assert stats["ratio_max"].item() == pytest.approx(1.5)
    assert stats["kl"].item() == 0.0 and stats["n_tokens"].item() == 5


def test_grpo_loss_epsilon_high() -> None:
    # epsilon_high = 0.6 lets r0t1 (ratio 1.5, A>0) through unclipped: pg -1.5, grad -1.5.
    logp = _logp()
    loss, stats = grpo_loss(logp, OLD, ADV, MASK, epsilon=0.2, epsilon_high=0.6, aggregation="dapo")
    # sum: -1.1 - 1.5 + 0.4 + 0.5 + 0.625 = -1.075 over 5 tokens
    assert loss.item() == pytest.approx(-1.075 / 5)
    loss.backward()
    assert logp.grad[0, 1].item() == pytest.approx(-1.5 / 5)
    assert stats["clip_frac"].item() == pytest.approx(0.2)  # only r1t0 (low side) clips now


def test_grpo_loss_on_policy_no_clipping() -> None:
    # First inner iteration: logp == old_logp, ratio 1 everywhere, nothing clipped, and the
    # gradient is the plain policy gradient -A / len (grpo aggregation).
    old = OLD.clone()
    logp = old.clone().requires_grad_(True)
    loss, stats = grpo_loss(logp, old, ADV, torch.ones_like(MASK))
    # rows: -1 and +0.5 per token, means -1 and 0.5, loss = (-1 + 0.5)/2 = -0.25
    assert loss.item() == pytest.approx(-0.25)
    assert stats["clip_frac"].item() == 0.0
    loss.backward()
    torch.testing.assert_close(
        logp.grad, torch.tensor([[-1 / 6] * 3, [0.5 / 6] * 3], dtype=torch.float64)
    )


def test_grpo_loss_with_kl() -> None:
    # A = 0, so only the KL term remains. One row, 2 answer tokens + 1 masked token.
    # d = ref - logp = [ln 2, 0, huge]: k3 = [1 - ln 2, 0, masked] -> mean over 2 tokens
    # loss = beta * (1 - ln2) / 2 with beta = 0.1 -> 0.0153426
    # d k3 / d logp = -(exp(d) - 1) = [-1, 0]; times beta / 2 -> [-0.05, 0, 0]
    logp = torch.tensor([[-1.0, -2.0, -3.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.0 + math.log(2), -2.0, 50.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = grpo_loss(
        logp, logp.detach(), torch.zeros(1, dtype=torch.float64), mask, ref_logp=ref, beta=0.1
    )
    assert loss.item() == pytest.approx(0.1 * (1 - math.log(2)) / 2)
    assert stats["kl"].item() == pytest.approx((1 - math.log(2)) / 2)
    assert stats["kl_clamped"].item() == 0  # the clamped-size ratio sits off the mask
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.05, 0.0, 0.0]], dtype=torch.float64))
    # beta = 0 ignores the reference entirely
    loss0, stats0 = grpo_loss(logp, logp.detach(), torch.zeros(1, dtype=torch.float64), mask,
                              ref_logp=ref, beta=0.0)
    assert loss0.item() == 0.0 and stats0["kl"].item() == 0.0


def test_grpo_loss_kl_clamp_counted() -> None:
    logp = torch.zeros(1, 3)
    ref = torch.tensor([[15.0, -15.0, 0.0]])
    _, stats = grpo_loss(logp, logp, torch.zeros(1), torch.ones(1, 3), ref_logp=ref, beta=0.02)
    assert stats["kl_clamped"].item() == 2


@pytest.mark.parametrize("aggregation", ["grpo", "dapo", "dr_grpo"])
def test_grpo_loss_all_masked_is_finite(aggregation: str) -> None:
    logp = torch.full((2, 3), float("-inf"), requires_grad=True)
    loss, stats = grpo_loss(
        logp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), torch.zeros(2, 3),
        ref_logp=torch.zeros(2, 3), beta=0.1, aggregation=aggregation,  # type: ignore[arg-type]
    )
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(v).all() for v in stats.values())


def test_grpo_loss_shape_errors() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        grpo_loss(x, x, torch.zeros(3), x)
    with pytest.raises(ValueError):
        grpo_loss(x, torch.zeros(2, 4), torch.zeros(2), x)
    with pytest.raises(ValueError, match="bogus"):
        grpo_loss(x, x, torch.zeros(2), x, aggregation="bogus")  # type: ignore[arg-type]


@pytest.mark.parametrize("aggregation", ["grpo", "dapo", "dr_grpo"])
def test_micro_batch_losses_sum_to_the_whole_batch(aggregation):
    """Micro-batches that use the whole batch's denominators (``totals``) give the whole-batch loss and
    gradient, for every aggregation (rows of different answer lengths, one row fully masked)."""
    g = torch.Generator().manual_seed(0)
    n, t = 8, 5
    logp = (-torch.rand(n, t, generator=g) * 3).requires_grad_(True)
    old = logp.detach() + 0.1 * torch.randn(n, t, generator=g)
    ref = logp.detach() + 0.1 * torch.randn(n, t, generator=g)
    adv = torch.randn(n, generator=g)
    lengths = torch.tensor([5, 3, 1, 0, 4, 2, 5, 1])
    mask = (torch.arange(t)[None] < lengths[:, None]).float()
    kw = dict(beta=0.05, epsilon=0.2, aggregation=aggregation, max_tokens=t)
    whole, _ = grpo_loss(logp, old, adv, mask, ref, **kw)
    (gw,) = torch.autograd.grad(whole, logp)
    totals = (n, float(mask.sum()))
    parts = [grpo_loss(logp[a:b], old[a:b], adv[a:b], mask[a:b], ref[a:b], totals=totals, **kw)[0]
             for a, b in ((0, 3), (3, 6), (6, 8))]
    (gm,) = torch.autograd.grad(sum(parts), logp)
    assert torch.allclose(sum(parts), whole, atol=1e-7)
    assert torch.allclose(gm, gw, atol=1e-7)
    assert gw.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# TRL-compatibility options (sample std of a group, the KL's importance ratio, an unclamped KL)
# --------------------------------------------------------------------------------------------------

# Three groups (two mixed, one zero-variance); ``R3``, not ``R``: the name R above is the two-group case.
R3 = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.3, 0.3, 0.3]])


def test_std_kind_sample_by_hand() -> None:
    # Rows 0-1: centred [2/3, -1/3, -1/3] / [1/3, 1/3, -2/3]; sum of squares 2/3, sample var (2/3)/2 = 1/3.
    std = math.sqrt(1 / 3)
    centred = torch.tensor([[2 / 3, -1 / 3, -1 / 3], [1 / 3, 1 / 3, -2 / 3]])
    a = group_advantages(R3, "std", eps=1e-4, std_kind="sample")
    torch.testing.assert_close(a[:2], centred / (std + 1e-4))
    assert (a[2] == 0).all()
    # Population std is sqrt((K-1)/K) times the sample std.
    pop = group_advantages(R3, "std", eps=1e-12)
    torch.testing.assert_close(pop[:2] / a[:2].mul((std + 1e-4) / std), torch.full((2, 3), math.sqrt(3 / 2)))


def test_std_kind_default_and_other_modes_unchanged() -> None:
    for mode in ("mean", "std", "none"):
        base = group_advantages(R3, mode)  # type: ignore[arg-type]
        assert torch.equal(base, group_advantages(R3, mode, std_kind="population"))  # type: ignore[arg-type]
    for mode in ("mean", "none"):
        sample = group_advantages(R3, mode, std_kind="sample")  # type: ignore[arg-type]
        assert torch.equal(group_advantages(R3, mode), sample)  # type: ignore[arg-type]


def test_std_kind_single_rollout_and_bad_value() -> None:
    a = group_advantages(torch.tensor([[1.0], [0.0]]), "std", std_kind="sample")
    assert a.tolist() == [[0.0], [0.0]]
    with pytest.raises(ValueError, match="bogus"):
        group_advantages(R3, "std", std_kind="bogus")  # type: ignore[arg-type]


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
