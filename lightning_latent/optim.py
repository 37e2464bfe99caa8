"""Optimiser settings and the guarded optimiser step. One AdamW over the latent LM; each schedule segment sets its learning rate,
weight decay and trainable parameters, and the optimiser state is reset when a segment starts."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .distributed import sync_grads
from .guards import NonFiniteGuard
from .model.trainable import apply_grad_masks


@dataclass
class OptimConfig:
    """Optimiser settings (AdamW; the optimiser state is reset at the start of every segment)."""

    lr: float = 1e-3  # supervised phases
    grpo_lr: float = 1e-4
    # Linear warm-up of the learning rate over the first steps of each GRPO phase (0: none). The optimiser
    # is reset at every phase, so Adam's first step moves every weight by about lr: a warm-up softens it.
    grpo_warmup_steps: int = 0
    weight_decay: float = 0.01
    grpo_weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    max_bad_steps: int = 5  # consecutive non-finite losses / gradients before the run stops


def guarded_step(opt, params: list, backward: Callable[[], Tensor], grad_masks: list, grad_clip: float,
                 guard: NonFiniteGuard) -> tuple[bool, float, Tensor]:
    """One optimiser step: zero, ``backward()`` (runs the backward passes, returns the loss), zero the
    frozen parts of partly trained weights, all-reduce over ranks, clip, then step only if the loss
    and the gradient norm are finite. Returns (stepped, grad norm, detached loss)."""
    opt.zero_grad(set_to_none=True)
    loss = backward().detach()
    apply_grad_masks(grad_masks)
    sync_grads(params)
    with_grad = [p for p in params if p.grad is not None]
    gn = torch.nn.utils.clip_grad_norm_(with_grad, grad_clip) if with_grad else torch.zeros(())
    if guard.check(loss, gn):
        opt.step()
        return True, float(gn), loss
    opt.zero_grad(set_to_none=True)
    return False, float("nan"), loss
