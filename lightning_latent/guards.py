"""Guards that stop a run which has gone wrong instead of training through it.

:class:`NonFiniteGuard`: a non-finite loss or gradient skips that update; too many in a row stop the
run. :class:`CollapseGuard`: GRPO steps whose rewards carry no signal, many in a row, stop it too. The
module saves a checkpoint before either stop.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from .distributed import all_sum
from .rl.loss import zero_std_groups

log = logging.getLogger("lightning_latent")


class NonFiniteGuard:
    """Counts consecutive updates whose loss or gradient norm is not finite."""

    def __init__(self, max_bad_steps: int):
        self.max_bad_steps = max_bad_steps
        self.bad_steps = 0

    def check(self, loss: Tensor | float, grad_norm: Tensor | float) -> bool:
        """True (and the count reset) when both are finite; else False and one more bad step."""
        finite = bool(torch.isfinite(torch.as_tensor(loss))) and bool(torch.isfinite(torch.as_tensor(grad_norm)))
        self.bad_steps = 0 if finite else self.bad_steps + 1
        return finite

    @property
    def exhausted(self) -> bool:
        return self.bad_steps > self.max_bad_steps

    def message(self, step: int, ids, path: str) -> str:
        return (f"{self.bad_steps} non-finite steps in a row (limit optim.max_bad_steps={self.max_bad_steps}) "
                f"at step {step}, last batch {ids}; the weights are those before them, saved to {path}")


class CollapseError(RuntimeError):
    """A GRPO run stopped by :class:`CollapseGuard` (a sweep records it as a bad trial, not a crash)."""

    def __init__(self, message: str, value: float):
        super().__init__(message)
        self.value = value  # the training reward the run collapsed to (0.0 or 1.0)


class CollapseGuard:
    """Stops a GRPO phase whose rollouts no longer carry any learning signal.

    A step is *flat* when every group is zero-variance AND every reward of the step (over all ranks) is
    the same, all 0 or all 1: the advantage is 0 everywhere and nothing will ever change. After
    ``patience`` flat steps in a row the guard fires, with one of two messages: the run had mixed
    groups earlier (it collapsed: typically a learning rate that destroyed the policy in a few updates,
    or a temperature that makes every answer wrong) or never had one (no signal from the start: the
    starting model always fails or always succeeds, or the arm does not make rollouts differ). The
    ``none`` arm's groups are zero-variance by design but its rewards differ between groups, so its
    steps are not flat and it runs to the end.
    """

    def __init__(self, patience: int | None, history: int = 10):
        self.patience = patience
        self.history_len = history
        self.flat_steps = 0
        self.last_mixed: int | None = None  # the last step that had a mixed group
        self.rewards: list[tuple[int, float]] = []  # (step, mean reward) of the latest steps

    def update(self, step: int, any_mixed: bool, all_zero: bool, all_one: bool, reward_mean: float) -> str | None:
        """Record one GRPO step (statistics already reduced over ranks); a message when the run must stop."""
        self.rewards = (self.rewards + [(step, round(reward_mean, 4))])[-self.history_len:]
        if any_mixed:
            self.last_mixed = step
        flat = not any_mixed and (all_zero or all_one)
        self.flat_steps = self.flat_steps + 1 if flat else 0
        if self.patience is None or self.flat_steps < self.patience:
            return None
        value = "1 (every answer right)" if all_one else "0 (every answer wrong)"
        if self.last_mixed is not None:
            return (f"GRPO collapsed at step {step}: for {self.flat_steps} steps in a row every rollout got reward "
                    f"{value}, so every advantage is 0 and nothing can change; the last mixed group was at step "
                    f"{self.last_mixed}. Recent (step, mean reward): {self.rewards}. Likely cause: a learning rate "
                    f"too large for this model (optim.grpo_lr; try a warm-up, optim.grpo_warmup_steps) or an answer "
                    f"temperature that makes every answer wrong (grpo.answer_temperature)")
        return (f"GRPO has had no learning signal since its start (step {step}): every group of the last "
                f"{self.flat_steps} steps was zero-variance with reward {value} and no step ever had a mixed group. "
                f"Recent (step, mean reward): {self.rewards}. The starting model always fails or always succeeds "
                f"on these prompts, or the arm does not make the rollouts differ: train the start further, change "
                f"the task's difficulty, or check perturb.* and grpo.answer_temperature")

    def state_dict(self) -> dict:
        return {"flat_steps": self.flat_steps, "last_mixed": self.last_mixed, "rewards": list(self.rewards)}

    def load_state_dict(self, state: dict) -> None:
        self.flat_steps = int(state.get("flat_steps", 0))
        self.last_mixed = state.get("last_mixed")
        self.rewards = [tuple(r) for r in state.get("rewards", [])]


def check_rollouts(rewards: Tensor, stats: dict[str, float], cfg, guard: CollapseGuard, step: int,
                   device) -> str | None:
    """After a GRPO step's rollouts: warn when more than ``cfg.truncation_warn`` of the answers were cut
    off at ``cfg.max_new_tokens``, and feed ``guard`` the step's signal, counted over all ranks (one
    all-reduce, so every rank takes the same decision). Returns the guard's stop message, if any."""
    if stats.get("grpo/truncated_frac", 0.0) > cfg.truncation_warn:
        log.warning("step %d: %.0f%% of the rollouts hit grpo.max_new_tokens=%d before their end (reward "
                    "usually 0): raise grpo.max_new_tokens", step, 100 * stats["grpo/truncated_frac"],
                    cfg.max_new_tokens)
    counts = all_sum(torch.tensor([float((~zero_std_groups(rewards)).sum()), float((rewards != 0).sum()),
                                   float((rewards != 1).sum())], device=device))
    return guard.update(step, bool(counts[0] > 0), bool(counts[1] == 0), bool(counts[2] == 0),
                        stats["grpo/reward_mean"])


def stop_checkpoint(trainer, name: str) -> str:
    """Save the run's state (weights untouched by skipped updates) next to its other checkpoints before
    a guard stops it; returns the path, for the stop message."""
    cb = trainer.checkpoint_callback
    d = Path(cb.dirpath) if cb is not None and getattr(cb, "dirpath", None) else \
        Path(trainer.default_root_dir) / "checkpoints"
    path = d / name
    trainer.save_checkpoint(path, weights_only=False)  # the full state, to resume from
    return str(path)


def stop_on_collapse(trainer, rewards: Tensor, stats: dict[str, float], cfg, guard: CollapseGuard, step: int,
                     device) -> None:
    """:func:`check_rollouts`; when the collapse guard fires, stop the run with a checkpoint and raise
    :class:`CollapseError` (a sweep records it as a bad trial)."""
    msg = check_rollouts(rewards, stats, cfg, guard, step, device)
    if msg is not None:
        trainer.should_stop = True
        path = stop_checkpoint(trainer, "collapse-stop.ckpt")
        raise CollapseError(f"{msg}; checkpoint: {path}", value=float(rewards.mean() > 0.5))


def stop_on_nonfinite(trainer, guard: NonFiniteGuard, step: int, ids) -> None:
    """Too many non-finite updates in a row: stop the run with a checkpoint of the last good weights."""
    trainer.should_stop = True
    path = stop_checkpoint(trainer, "nonfinite-stop.ckpt")
    raise RuntimeError(guard.message(step, ids, path)) from None
