"""GRPO objective as pure tensor functions (docs/design.md#grpo-loss).

Shapes and layout conventions used throughout:

* ``rewards``: ``[B, K]``, B prompts x K rollouts per prompt (one "group" per row).
* token tensors: ``[N, T]`` with ``N = B * K`` rows ordered prompt-major, i.e. row ``b * K + k`` is
  rollout k of prompt b, so ``rewards.reshape(-1)`` / ``advantages.reshape(-1)`` line up with rows.
* ``mask``: ``[N, T]``, 1 (or True) on the answer tokens the loss is taken over, 0 elsewhere
  (prompt, latent slots, padding). Masked-out positions never contribute a value or a gradient,
  even when they hold ``-inf`` log-probs.

Everything here is deterministic and side-effect free, so it can be unit-tested by hand and reused
by the Lightning module, benchmarks and notebooks alike.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "AdvantageMode",
    "Aggregation",
    "StdKind",
    "grpo_loss",
    "group_advantages",
    "group_stats",
    "k3_kl",
    "select_mixed_groups",
    "sequence_logprobs",
    "token_entropy",
    "zero_std_groups",
]

AdvantageMode = Literal["mean", "std", "none"]
Aggregation = Literal["grpo", "dr_grpo", "dapo"]
StdKind = Literal["population", "sample"]


# --------------------------------------------------------------------------------------------------
# Groups and advantages
# --------------------------------------------------------------------------------------------------


def _check_rewards(rewards: Tensor) -> None:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape [B, K], got {tuple(rewards.shape)}")


def zero_std_groups(rewards: Tensor) -> Tensor:
    """BoolTensor ``[B]``: True where every reward in the group is EXACTLY equal.

    Exact equality (not ``std < tol``) because this is the definition of "the group carries no
    learning signal": with the deterministic latent phase every rollout is identical and so is every
    reward, bit for bit.
    """
    _check_rewards(rewards)
    return (rewards == rewards[:, :1]).all(dim=1)


def group_advantages(
    rewards: Tensor,
    mode: AdvantageMode = "mean",
    eps: float = 1e-4,
    std_kind: StdKind = "population",
) -> Tensor:
    """Group-relative advantages ``[B, K]`` from rewards ``[B, K]``.

    * ``mean``: ``A = r - mean(r)`` (Dr. GRPO's unbiased choice; the default in the recipe).
    * ``std``: ``A = (r - mean(r)) / (std(r) + eps)``, by default with the POPULATION std
      (``std_kind="population"``, ``unbiased=False``): it is the group's own spread, defined for any
      K >= 1, and for binary rewards it keeps ``|A| <= 1/std`` symmetric (e.g. K=2, rewards [0, 1] ->
      A = [-1, 1] up to eps).
    * ``none``: ``A = r`` (raw rewards, REINFORCE-style, no baseline).

    ``std_kind="sample"`` divides by the SAMPLE std (Bessel's correction, ``unbiased=True``), which is
    what TRL's ``GRPOTrainer`` does (``scale_rewards="group"``, its default, via
    ``trl.trainer.utils.nanstd``).
    The sample std is ``sqrt(K / (K - 1))`` times the population std, so TRL's std-scaled advantages
    are that factor smaller (up to eps): 0.866x for K=4, 0.935x for K=8. With
    ``mode="std", std_kind="sample", eps=1e-4`` this function reproduces TRL 1.16's advantages
    (``tests/integration/test_trl_conformance.py``); ``mode="mean"`` is TRL's ``scale_rewards="none"``. TRL's
    ``scale_rewards="batch"`` (one std over the whole batch) has no counterpart here. ``std_kind`` has
    no effect in the modes ``mean`` and ``none``.

    In every mode, groups whose rewards are all exactly equal get ``A = 0.0`` exactly: ``r - mean``
    is not exactly 0 in floating point for non-binary rewards (e.g. three times 0.1), and for
    ``none`` a constant group would otherwise push all rollouts the same way with no relative
    signal. The result is never NaN (``eps > 0`` guards the division; zero-std groups are set, not
    divided). TRL does not special-case them: it computes ``(r - mean) / (0 + 1e-4)``, which is exactly
    0 only where ``r - mean`` is (e.g. binary or dyadic rewards), and 1e4 times a rounding residue
    otherwise.
    """
    _check_rewards(rewards)
    if eps <= 0 and mode == "std":
        raise ValueError(f"eps must be > 0 for mode='std', got {eps}")
    if std_kind not in ("population", "sample"):
        raise ValueError(f"unknown std_kind {std_kind!r}; choices: ['population', 'sample']")
    r = rewards.float() if not rewards.is_floating_point() else rewards
    mean = r.mean(dim=1, keepdim=True)
    if mode == "mean":
        adv = r - mean
    elif mode == "std":
        # K == 1: every group is zero-variance (set to 0 below); the sample std would be NaN there.
        unbiased = std_kind == "sample" and r.shape[1] > 1
        std = r.std(dim=1, keepdim=True, unbiased=unbiased)
        adv = (r - mean) / (std + eps)
    elif mode == "none":
        adv = r.clone()
    else:
        raise ValueError(f"unknown advantage mode {mode!r}; choices: ['mean', 'std', 'none']")
    flat = zero_std_groups(r)
    return torch.where(flat[:, None], torch.zeros_like(adv), adv)


def select_mixed_groups(rewards: Tensor) -> Tensor:
    """BoolTensor ``[B]`` for dynamic sampling: True where the group is NOT zero-variance.

    Zero-variance groups have advantage 0 and contribute only KL to the loss, so DAPO-style dynamic
    sampling drops them. Under DDP the caller must make the keep/drop decision consistent across
    ranks (docs/design.md#ddp).
    """
    return ~zero_std_groups(rewards)


def group_stats(rewards: Tensor) -> dict[str, Tensor]:
    """Per-step diagnostics of a reward matrix ``[B, K]``, as 0-dim float tensors (for logging).

    * ``frac_zero_std``: groups whose rewards are all equal (no GRPO signal: the collapse metric).
    * ``frac_all_correct``: groups where every reward is 1 (the maximum exact-match reward).
    * ``frac_all_wrong``: groups where every reward is 0.
    * ``frac_mixed``: ``1 - frac_zero_std`` (groups kept by dynamic sampling).
    * ``reward_mean`` / ``reward_std``: over all B*K rewards (population std).
    * ``group_std_mean``: mean over groups of the within-group population std.
    """
    _check_rewards(rewards)
    r = rewards.detach().float()
    flat = zero_std_groups(r).float()
    return {
        "frac_zero_std": flat.mean(),
        "frac_all_correct": (r == 1.0).all(dim=1).float().mean(),
        "frac_all_wrong": (r == 0.0).all(dim=1).float().mean(),
        "frac_mixed": 1.0 - flat.mean(),
        "reward_mean": r.mean(),
        "reward_std": r.std(unbiased=False),
        "group_std_mean": r.std(dim=1, unbiased=False).mean(),
    }


# --------------------------------------------------------------------------------------------------
# Per-token quantities
# --------------------------------------------------------------------------------------------------


def sequence_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability ``[N, T]`` of ``tokens[n, t]`` under ``softmax(logits[n, t] / temperature)``.

    ``logits[:, t]`` must already be the prediction FOR position t (the caller does the usual
    shift by one). The temperature must match the one answers were sampled at, otherwise the
    importance ratio compares different policies. Computed as ``gathered - logsumexp`` so no
    ``[N, T, V]`` log-softmax is materialised; the result is float32 or wider for precision.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} do not line up"
        )
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if temperature != 1.0:
        x = x / temperature
    picked = x.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(x, dim=-1)


def token_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy ``[N, T]`` (nats) of ``softmax(logits / temperature)`` at each position.

    Logged every step: a collapsing answer distribution shows up here before it shows in reward.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if temperature != 1.0:
        x = x / temperature
    logp = torch.log_softmax(x, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def k3_kl(
    logp: Tensor,
    ref_logp: Tensor,
    clamp: float = 10.0,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """k3 estimator of KL(pi || pi_ref) per token, with the log-ratio clamped.

    ``d = clamp(ref_logp - logp, -clamp, clamp)``; ``kl = exp(d) - d - 1``. The k3 estimator
    (Schulman 2020) is unbiased for samples from pi and always >= 0, and 0 exactly when the two
    log-probs agree. The clamp (+-10 in the recipe) keeps ``exp`` finite when a token is near
    impossible under one policy; a clamped entry has zero gradient through d, so the count is
    returned (as a 0-dim int64 tensor) to be logged: many clamps mean the reference is far away
    (e.g. masks not replayed).

    ``mask`` (optional, ``[N, T]``) restricts the clamp count to those positions; the returned kl is
    per token everywhere (masked-out entries are computed from a zero log-ratio, i.e. 0).
    """
    if clamp <= 0:
        raise ValueError(f"clamp must be > 0, got {clamp}")
    raw = ref_logp - logp
    if mask is not None:
        m = mask.bool()
        # Zero the log-ratio off-mask so -inf/NaN there cannot leak into values or gradients.
        raw = torch.where(m, raw, torch.zeros_like(raw))
    clamped = raw.detach().abs() > clamp
    n_clamped = clamped.sum()
    d = raw.clamp(-clamp, clamp)
    return torch.exp(d) - d - 1.0, n_clamped


# --------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------


def _aggregate(
    per_token: Tensor, maskf: Tensor, aggregation: Aggregation, max_tokens: int | None,
    totals: tuple[int, float] | None = None,
) -> Tensor:
    """Reduce a masked per-token loss ``[N, T]`` to a scalar (see :func:`grpo_loss`).

    ``totals = (rows, answer_tokens)`` of the WHOLE batch when ``per_token`` is one micro-batch of it:
    the denominators are then the whole batch's, so the micro-batch losses sum to the whole-batch loss
    (and their gradients to its gradient)."""
    n, t = per_token.shape
    n_all = n if totals is None else totals[0]
    masked = per_token * maskf
    if aggregation == "grpo":
        lengths = maskf.sum(dim=1).clamp(min=1.0)
        return (masked.sum(dim=1) / lengths).sum() / float(max(n_all, 1))
    if aggregation == "dapo":
        tok = maskf.sum() if totals is None else torch.as_tensor(float(totals[1]), dtype=maskf.dtype)
        return masked.sum() / tok.clamp(min=1.0)
    if aggregation == "dr_grpo":
        denom = t if max_tokens is None else max_tokens
        if denom <= 0:
            raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
        return masked.sum() / float(n_all * denom)
    raise ValueError(f"unknown aggregation {aggregation!r}; choices: ['grpo', 'dr_grpo', 'dapo']")


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    aggregation: Aggregation = "grpo",
    max_tokens: int | None = None,
    kl_clamp: float = 10.0,
    totals: tuple[int, float] | None = None,
    kl_importance_ratio: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped-ratio GRPO loss over answer tokens, and detached diagnostics.

    Per answer token, with ``ratio = exp(logp - old_logp)`` and the sequence's advantage A::

        pg = -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A)
        per_token = pg + beta * k3(logp, ref_logp)          # KL term only if beta > 0 and ref given

    ``old_logp`` and ``ref_logp`` are treated as constants (detached here). ``epsilon_high``
    defaults to ``epsilon`` (symmetric clip); DAPO's "clip-higher" sets it larger.

    ``kl_importance_ratio=True`` weights the KL term by the (unclipped, differentiable) ratio,
    ``beta * ratio * k3``: the tokens were sampled from pi_old, so this makes the k3 gradient the
    unbiased reverse-KL gradient (DeepSeek-V3.2). It changes the gradient even on-policy (ratio == 1
    in value, not in derivative). This is TRL's ``use_bias_correction_kl`` (default True in TRL 1.16;
    here the default is False, the plain k3 term of the recipe). The ``kl`` stat stays the unweighted
    mean k3.

    ``kl_clamp`` clamps the log-ratio inside k3 (see :func:`k3_kl`); TRL does not clamp, and
    ``kl_clamp=float("inf")`` reproduces that. The two agree whenever ``kl_clamped`` is 0.

    Aggregation (the denominators differ, which is the whole point of the three variants):

    * ``grpo``: mean over answer tokens within each sequence, then mean over the N sequences
      (sequence length clamped to >= 1, so an all-masked row contributes 0, not NaN).
    * ``dapo``: sum over all answer tokens / total number of answer tokens in the batch.
    * ``dr_grpo``: sum over all answer tokens / (N * max_tokens), ``max_tokens`` defaulting to T: a
      constant normaliser, so the gradient is not biased towards short answers.

    Against TRL 1.16's ``GRPOTrainer`` (``loss_type``; one process, no gradient accumulation, checked to
    float32 round-off by ``tests/integration/test_trl_conformance.py``): ``grpo`` is TRL ``"grpo"``; ``dr_grpo`` is
    TRL ``"dr_grpo"`` with ``max_tokens = max_completion_length`` (TRL always divides by that, not by
    the padded length T); ``dapo`` is both TRL ``"bnpo"`` (tokens of the local batch) and TRL ``"dapo"``
    (tokens of the whole generation batch, ``num_items_in_batch``: that is ``totals`` here). TRL's
    other loss types (``cispo``, ``sapo``, ``luspo``, ``vespo``) have no counterpart.

    ``totals = (rows, answer_tokens)`` of the whole batch makes this the loss of one micro-batch of it:
    summed over the micro-batches it equals the whole-batch loss, for every aggregation.

    Returns ``(loss, stats)``; stats are 0-dim detached float tensors:
    ``pg_loss`` (the policy-gradient part, same aggregation), ``kl`` (mean k3 over answer tokens,
    0 when not computed), ``kl_clamped`` (clamped answer tokens), ``clip_frac`` (share of answer
    tokens where the clipped branch is the active one: ``A > 0`` and ``ratio > 1 + epsilon_high``,
    or ``A < 0`` and ``ratio < 1 - epsilon``; split into ``clip_frac_low`` / ``clip_frac_high``),
    ``ratio_mean`` / ``ratio_min`` / ``ratio_max`` over answer tokens (1.0 when there are none),
    and ``n_tokens``.
    """
    if logp.dim() != 2:
        raise ValueError(f"logp must have shape [N, T], got {tuple(logp.shape)}")
    for name, x in (("old_logp", old_logp), ("mask", mask)):
        if x.shape != logp.shape:
            raise ValueError(f"{name} shape {tuple(x.shape)} != logp shape {tuple(logp.shape)}")
    if ref_logp is not None and ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp shape {tuple(ref_logp.shape)} != logp shape {tuple(logp.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(
            f"advantages must have shape [N]={tuple(logp.shape[:1])}, got {tuple(advantages.shape)}"
        )
    if epsilon < 0 or (epsilon_high is not None and epsilon_high < 0):
        raise ValueError("epsilon and epsilon_high must be >= 0")
    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high

    m = mask.bool()
    maskf = m.to(logp.dtype)
    zeros = torch.zeros_like(logp)

    # Off-mask log-ratios are forced to 0 so padding with -inf log-probs gives neither inf nor NaN.
    log_ratio = torch.where(m, logp - old_logp.detach(), zeros)
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(logp.dtype)[:, None]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    pg = -torch.minimum(unclipped, clipped)

    use_kl = beta > 0 and ref_logp is not None
    if use_kl:
        kl, n_clamped = k3_kl(logp, ref_logp.detach(), clamp=kl_clamp, mask=m)
        per_token = pg + beta * (kl * ratio if kl_importance_ratio else kl)
    else:
        kl, n_clamped = zeros, torch.zeros((), dtype=torch.long, device=logp.device)
        per_token = pg

    loss = _aggregate(per_token, maskf, aggregation, max_tokens, totals)

    with torch.no_grad():
        n_tok = maskf.sum()
        denom = n_tok.clamp(min=1.0)
        r = ratio.detach()
        low = (r < 1.0 - eps_low) & (adv < 0) & m
        high = (r > 1.0 + eps_high) & (adv > 0) & m
        if n_tok > 0:
            r_min = torch.where(m, r, torch.full_like(r, float("inf"))).min()
            r_max = torch.where(m, r, torch.full_like(r, float("-inf"))).max()
        else:
            r_min = r_max = torch.ones((), dtype=r.dtype, device=r.device)
        stats = {
            "pg_loss": _aggregate(pg.detach(), maskf, aggregation, max_tokens),
            "kl": (kl.detach() * maskf).sum() / denom,
            "kl_clamped": n_clamped.detach().to(logp.dtype),
            "clip_frac": (low | high).to(logp.dtype).sum() / denom,
            "clip_frac_low": low.to(logp.dtype).sum() / denom,
            "clip_frac_high": high.to(logp.dtype).sum() / denom,
            "ratio_mean": (r * maskf).sum() / denom if n_tok > 0 else torch.ones_like(n_tok),
            "ratio_min": r_min,
            "ratio_max": r_max,
            "n_tokens": n_tok,
        }
    return loss, stats
