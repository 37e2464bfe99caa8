"""Optimiser settings. One AdamW over the latent LM; each schedule segment sets its learning rate,
weight decay and trainable parameters, and the optimiser state is reset when a segment starts."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class OptimConfig:
    """Optimiser settings (AdamW; the optimiser state is reset at the start of every segment)."""

    lr: float = 1e-3  # supervised phases
    grpo_lr: float = 1e-4
    weight_decay: float = 0.01
    grpo_weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    max_bad_steps: int = 5  # consecutive non-finite losses / gradients before the run stops
