"""The GRPO update: a rollout batch in, ``mu`` optimiser steps, what to log out.

:func:`grpo_update` is what one GRPO training step does after its rollouts (docs/design.md#grpo-loss),
top to bottom: keep the groups that carry signal (dynamic sampling), compute advantages and the frozen
reference's log-probs, then ``mu`` times: zero the gradients, replay the rollouts' log-probs with their
own perturbations and take the clipped loss micro-batch by micro-batch (each over the whole batch's
denominators), backward, then the guarded optimiser step (:class:`~lightning_latent.optim.GuardedOptimizer`).
The LightningModule passes its optimiser and its ``manual_backward``; tests and benchmarks pass a plain
optimiser and ``Tensor.backward``. No Lightning here.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ..distributed import all_sum, world_size
from ..model.latent_lm import LatentLM
from ..model.perturb import Perturber
from ..optim import GuardedOptimizer
from .loss import group_advantages, grpo_loss, select_mixed_groups
from .reference import Reference
from .rewards import get_reward
from .rollout import RolloutBatch, replay_logprobs


@dataclass
class GRPOConfig:
    """Dropout-GRPO settings (docs/design.md#grpo-loss). ``answer_temperature=0`` means greedy answers.

    The defaults are the GRPO recipe found on the synthetic task (docs/results/recipe/: K=4, beta 0.01,
    mu 2, with ``optim.grpo_lr`` 5e-5 and 32 prompts per step); other tasks' configs set their own
    (``experiments/configs/gsm8k/dropout_grpo.yaml`` follows the published recipe)."""

    group_size: int = 4
    answer_temperature: float = 1.0
    max_new_tokens: int = 16
    advantage: Literal["mean", "std", "none"] = "mean"
    # with advantage=std: the group's population std (ours) or its sample std (TRL's scale_rewards="group")
    advantage_std: Literal["population", "sample"] = "population"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    aggregation: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    beta: float = 0.01
    kl_clamp: float = 10.0
    # TRL's use_bias_correction_kl: weight the k3 term by the (differentiable) importance ratio
    kl_importance_ratio: bool = False
    reference_perturbed: bool = True
    mu: int = 2
    dynamic_sampling: bool = False
    max_groups: int | None = None  # with dynamic sampling: keep at most this many mixed groups per rank
    # Which parameters GRPO trains: None = all; "value" = the attention value projections only (the
    # published recipe's W_V: v_proj, or the V third of GPT-2's fused c_attn); else a regex over names.
    trainable: str | None = None
    reward: str = "exact_match"
    # Rows (rollouts) per backward in the update: None = the whole batch at once. Smaller values bound
    # the replay's activation memory; the gradient is the whole batch's (the losses use its denominators).
    micro_batch_rows: int | None = None
    # Collapse guard (guards.py): stop after this many consecutive steps whose groups all carry no signal
    # (every reward 0, or every reward 1) once the run has had mixed groups. None: never stop.
    collapse_patience: int | None = 20
    # Warn when more than this share of a step's rollouts hit max_new_tokens (their reward is usually 0).
    truncation_warn: float = 0.5

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"grpo.group_size={self.group_size}: GRPO needs K >= 2 rollouts per prompt")
        if self.beta < 0:
            raise ValueError(f"grpo.beta={self.beta} must be >= 0")
        if self.mu < 1:
            raise ValueError(f"grpo.mu={self.mu} must be >= 1")
        if self.answer_temperature < 0:
            raise ValueError(f"grpo.answer_temperature={self.answer_temperature} must be >= 0 (0 = greedy)")
        if self.epsilon < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise ValueError(f"grpo.epsilon={self.epsilon} / epsilon_high={self.epsilon_high} must be >= 0")
        if self.max_new_tokens < 1:
            raise ValueError(f"grpo.max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.advantage not in ("mean", "std", "none"):
            raise ValueError(f"grpo.advantage={self.advantage!r} must be mean, std or none")
        if self.advantage_std not in ("population", "sample"):
            raise ValueError(f"grpo.advantage_std={self.advantage_std!r} must be population or sample")
        if self.collapse_patience is not None and self.collapse_patience < 1:
            raise ValueError(f"grpo.collapse_patience={self.collapse_patience} must be >= 1 (or null: off)")
        if self.aggregation not in ("grpo", "dr_grpo", "dapo"):
            raise ValueError(f"grpo.aggregation={self.aggregation!r} must be grpo, dr_grpo or dapo")
        if self.trainable not in (None, "value"):
            try:
                re.compile(self.trainable)
            except re.error as err:
                raise ValueError(f"grpo.trainable={self.trainable!r} is not a valid regex: {err}") from err
        if self.micro_batch_rows is not None and self.micro_batch_rows < 1:
            raise ValueError(f"grpo.micro_batch_rows={self.micro_batch_rows} must be >= 1 (or null: whole batch)")
        if self.max_groups is not None and self.max_groups < 1:
            raise ValueError(f"grpo.max_groups={self.max_groups} must be >= 1 (or null: no limit)")
        if self.kl_clamp <= 0:
            raise ValueError(f"grpo.kl_clamp={self.kl_clamp} must be > 0")
        if not 0.0 <= self.truncation_warn <= 1.0:
            raise ValueError(f"grpo.truncation_warn={self.truncation_warn} must be in [0, 1]")
        get_reward(self.reward)


@dataclass
class UpdateResult:
    """What one GRPO update did, for logging."""

    groups_kept: int  # over all ranks
    loss: Tensor | None = None  # the last optimiser step's loss (detached); None: no update (no group kept)
    stats: dict[str, Tensor] = field(default_factory=dict)  # first inner iteration: replay gap, entropy, kl, ...
    grad_norm: float | None = None  # the last finite optimiser step's gradient norm
    skipped: int = 0  # optimiser steps skipped because the loss or the gradient was not finite

    def log_values(self) -> dict[str, float | Tensor]:
        """What the module logs of the update (``train/loss`` aside, which goes to the progress bar)."""
        if self.loss is None:  # no rank kept a group: no update
            return {"grpo/groups_kept": float(self.groups_kept), "grpo/skipped_updates": 1.0}
        out = {"grpo/groups_kept": float(self.groups_kept), **{f"grpo/{k}": v for k, v in self.stats.items()}}
        if self.grad_norm is not None:
            out["grpo/grad_norm"] = self.grad_norm
        return out


def keep_groups(rewards: Tensor, cfg: GRPOConfig) -> Tensor:
    """BoolTensor [B]: the groups this rank trains on (all, or with dynamic sampling the mixed ones,
    at most ``max_groups``)."""
    if not cfg.dynamic_sampling:
        return torch.ones(rewards.shape[0], dtype=torch.bool)
    keep = select_mixed_groups(rewards)
    if cfg.max_groups is not None:
        keep &= keep.cumsum(0) <= cfg.max_groups
    return keep


def rank_weight(cfg: GRPOConfig, n_local: int, n_global: int, local_tokens: float, device) -> float:
    """The factor on this rank's loss that makes the rank-averaged gradient equal the global batch's.

    Ranks may keep different numbers of groups (dynamic sampling) and hold different numbers of answer
    tokens. ``grpo`` and ``dr_grpo`` divide by the rank's rows, so its share of the rows is the weight;
    ``dapo`` divides by the rank's answer tokens, so its share of the tokens is (one more all-reduce).
    Multiplied by the world size because gradients are averaged, not summed, over ranks."""
    if n_local == 0:
        return 0.0
    world = world_size()
    if cfg.aggregation == "dapo":
        total = float(all_sum(torch.tensor(local_tokens, device=device, dtype=torch.float64)).item())
        return (local_tokens / total) * world if total > 0 else 0.0
    return (n_local / n_global) * world


def backward_micro_batches(
    model: LatentLM, perturber: Perturber | None, batch: RolloutBatch, advantages: Tensor, ref_logp: Tensor | None,
    cfg: GRPOConfig, temperature: float, scale: float, backward: Callable[[Tensor], None], with_entropy: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One backward per micro-batch of ``cfg.micro_batch_rows`` rows (all rows when None), each loss
    over the whole batch's denominators, so that the accumulated gradient is the whole batch's.

    Returns (the summed loss times ``scale``, the replayed log-probs [N, L], their entropies or None),
    all detached."""
    mask = batch.mask.float()
    n_rows = mask.shape[0]
    mb = n_rows if cfg.micro_batch_rows is None else min(cfg.micro_batch_rows, n_rows)
    totals = (n_rows, float(mask.sum()))
    total = torch.zeros((), device=mask.device)
    logps, ents = [], []
    for a in range(0, n_rows, mb):
        b = min(a + mb, n_rows)
        lp, en = replay_logprobs(model, perturber, batch.rows(a, b), temperature, with_entropy=with_entropy)
        part, _ = grpo_loss(lp, batch.logprobs[a:b], advantages[a:b], mask[a:b],
                            None if ref_logp is None else ref_logp[a:b], cfg.beta, cfg.epsilon, cfg.epsilon_high,
                            cfg.aggregation, max_tokens=cfg.max_new_tokens, kl_clamp=cfg.kl_clamp, totals=totals,
                            kl_importance_ratio=cfg.kl_importance_ratio)
        backward(part * scale)
        total = total + part.detach() * scale
        logps.append(lp.detach())
        ents.append(None if en is None else en.detach())
    ent = torch.cat(ents) if with_entropy else None
    return total, torch.cat(logps), ent


def first_iteration_stats(logp: Tensor, ent: Tensor, batch: RolloutBatch, advantages: Tensor,
                          ref_logp: Tensor | None, cfg: GRPOConfig) -> dict[str, Tensor]:
    """Diagnostics of the first inner iteration: the replay gap (|logp_update - logp_rollout|, 0 up to
    float error when masks replay exactly), the entropy, and the loss's own statistics."""
    mask = batch.mask.float()
    _, st = grpo_loss(logp, batch.logprobs, advantages, mask, ref_logp, cfg.beta, cfg.epsilon, cfg.epsilon_high,
                      cfg.aggregation, max_tokens=cfg.max_new_tokens, kl_clamp=cfg.kl_clamp,
                      kl_importance_ratio=cfg.kl_importance_ratio)
    gap = ((logp - batch.logprobs).abs() * mask).max() if mask.sum() > 0 else torch.zeros(())
    out = {"replay_gap": gap, "entropy": (ent * mask).sum() / mask.sum().clamp(min=1)}
    for name in ("kl", "clip_frac", "ratio_mean", "ratio_min", "ratio_max", "pg_loss", "kl_clamped"):
        out[name] = st[name]
    return out


def grpo_update(
    model: LatentLM,
    perturber: Perturber | None,
    batch: RolloutBatch,
    cfg: GRPOConfig,
    temperature: float,
    reference: Reference | None,
    optimizer: GuardedOptimizer,
    backward: Callable[[Tensor], None] = Tensor.backward,
) -> UpdateResult:
    """The update of one GRPO step on ``batch`` (this rank's rollouts): ``cfg.mu`` optimiser steps.

    ``reference``: the frozen reference (its log-probs are taken once, when ``beta > 0``); ``optimizer``
    zeroes, then after the backward passes clips and steps (skipping non-finite updates); ``backward(loss)``
    runs one backward (the module's ``manual_backward``). The decision to skip the update when no rank
    kept a group is taken on all ranks together (an all-reduce), so ranks never disagree on whether to step.
    """
    device = batch.mask.device
    keep = keep_groups(batch.rewards, cfg)
    n_local = int(keep.sum())
    n_global = int(all_sum(torch.tensor(float(n_local), device=device)).item())
    result = UpdateResult(groups_kept=n_global)
    if n_global == 0:
        return result
    # A rank that kept nothing still runs the backward (on one group, weight 0): the collectives match.
    sub = batch.select_groups(keep) if n_local > 0 else batch.select_groups(torch.arange(len(keep)) == 0)
    adv = group_advantages(sub.rewards, cfg.advantage, std_kind=cfg.advantage_std).flatten().to(device)
    scale = rank_weight(cfg, n_local, n_global, float(sub.mask.float().sum()), device)
    ref_logp = None
    if cfg.beta > 0 and reference is not None:
        ref_logp = reference.logprobs(sub, temperature, cfg.reference_perturbed)
    model.train()
    skipped_before = optimizer.skipped
    for it in range(cfg.mu):
        optimizer.zero_grad()
        loss, logp, ent = backward_micro_batches(model, perturber, sub, adv, ref_logp, cfg, temperature, scale,
                                                 backward, with_entropy=it == 0)
        if it == 0:
            result.stats = first_iteration_stats(logp, ent, sub, adv, ref_logp, cfg)
        stepped, grad_norm = optimizer.step(loss)
        if stepped:
            result.grad_norm = grad_norm
        result.loss = loss
    result.skipped = optimizer.skipped - skipped_before
    return result
