"""The optimiser: its settings, what each schedule segment sets on it, and the guarded step.

One AdamW over the latent LM. Each segment sets its learning rate (with a linear warm-up at the start of
a GRPO phase) and weight decay, and the optimiser state is reset when a segment starts
(:func:`enter_segment`). :class:`GuardedOptimizer` is the step manual optimisation takes after its
backward passes: zero the frozen parts of partly trained weights, all-reduce over ranks, clip, and step
only when the loss and the gradient norm are finite (docs/design.md#grpo-loss).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from .distributed import sync_grads
from .guards import NonFiniteGuard
from .model.trainable import apply_grad_masks, trainable_masks
from .schedule import Segment

log = logging.getLogger("lightning_latent")


@dataclass
class OptimConfig:
    """Optimiser settings (AdamW; the optimiser state is reset at the start of every segment).

    ``grpo_lr`` defaults to the synthetic GRPO recipe's 5e-5 (docs/results/recipe/); supervised phases
    use ``lr``. A phase's own ``lr`` overrides both."""

    lr: float = 1e-3  # supervised phases
    grpo_lr: float = 5e-5
    # Linear warm-up of the learning rate over the first steps of each GRPO phase (0: none). The optimiser
    # is reset at every phase, so Adam's first step moves every weight by about lr: a warm-up softens it.
    grpo_warmup_steps: int = 0
    weight_decay: float = 0.01
    grpo_weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    max_bad_steps: int = 5  # consecutive non-finite losses / gradients before the run stops

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        for name in ("lr", "grpo_lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"optim.{name}={getattr(self, name)} must be > 0")
        for name in ("grpo_warmup_steps", "weight_decay", "grpo_weight_decay", "max_bad_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"optim.{name}={getattr(self, name)} must be >= 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas={self.betas} must be two numbers in [0, 1)")


def enter_segment(opt, cfg: OptimConfig, seg: Segment, step: int, model: torch.nn.Module, trainable: str | None,
                  guard: NonFiniteGuard, batch_ids: list | None = None) -> "GuardedOptimizer":
    """The optimiser as segment ``seg`` needs it at global step ``step``: its learning rate (with the GRPO
    warm-up, or a supervised segment's decay) and weight decay; at the segment's first step a cleared state (each segment starts Adam
    afresh); ``model``'s parameters trained as ``trainable`` says (:func:`~.model.trainable.trainable_masks`)."""
    is_grpo = seg.kind == "grpo"
    warmup = cfg.grpo_warmup_steps if is_grpo else 0
    lr = seg.lr * min(1.0, (step - seg.start + 1) / warmup) if warmup > 0 else seg.lr_at(step)
    for group in opt.param_groups:
        group["lr"] = lr
        group["weight_decay"] = cfg.grpo_weight_decay if is_grpo else cfg.weight_decay
    masks = trainable_masks(model, trainable)
    if step == seg.start:
        getattr(opt, "optimizer", opt).state.clear()  # a LightningOptimizer wraps the torch one
    return GuardedOptimizer(opt, list(model.parameters()), masks, cfg.grad_clip, guard, step, batch_ids)


class NonFiniteStop(RuntimeError):
    """Raised by :meth:`GuardedOptimizer.step` when too many updates in a row were non-finite."""


class GuardedOptimizer:
    """``zero_grad`` and ``step`` of manual optimisation around an optimiser ``opt``.

    ``step(loss)`` runs after the caller's backward passes: it zeroes the frozen parts of partly trained
    weights (``grad_masks``), averages the gradients over ranks, clips them to ``grad_clip``, then steps
    only if ``loss`` and the gradient norm are finite. A skipped update is counted by ``guard``; once
    ``guard`` is exhausted the step raises :class:`NonFiniteStop` (the caller saves a checkpoint).
    ``step`` and ``batch_ids`` (the schedule step and its records) name a skipped update in the warning."""

    def __init__(self, opt, params: list[torch.nn.Parameter], grad_masks: list, grad_clip: float,
                 guard: NonFiniteGuard, step: int | None = None, batch_ids: list | None = None):
        self.opt, self.params, self.grad_masks = opt, params, grad_masks
        self.grad_clip, self.guard = grad_clip, guard
        self.schedule_step, self.batch_ids = step, batch_ids
        self.skipped = 0  # updates skipped since this object was made
        self.last_skip_count = 0  # the guard's count of non-finite updates in a row at the last skip

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def step(self, loss: Tensor) -> tuple[bool, float]:
        """(stepped, gradient norm); the norm is NaN for a skipped update."""
        apply_grad_masks(self.grad_masks)
        sync_grads(self.params)
        with_grad = [p for p in self.params if p.grad is not None]
        gn = torch.nn.utils.clip_grad_norm_(with_grad, self.grad_clip) if with_grad else torch.zeros(())
        if self.guard.check(loss, gn):
            self.opt.step()
            return True, float(gn)
        self.opt.zero_grad(set_to_none=True)
        self.skipped += 1
        self.last_skip_count = self.guard.bad_steps
        log.warning("non-finite loss or gradient at step %s (batch %s): update skipped (%d in a row)",
                    self.schedule_step, self.batch_ids, self.guard.bad_steps)
        if self.guard.exhausted:
            raise NonFiniteStop(f"{self.guard.bad_steps} non-finite updates in a row")
        return False, float("nan")
