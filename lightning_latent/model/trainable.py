"""Which parameters a phase trains: ``requires_grad`` plus gradient masks for fused weights."""
from __future__ import annotations

import re

import torch
from torch import Tensor


def trainable_masks(model: torch.nn.Module, spec: str | None) -> list[tuple[torch.nn.Parameter, Tensor]]:
    """Set ``requires_grad`` from ``spec`` (None: all, "value": value projections only, else a regex)
    and return (parameter, gradient mask) pairs for parameters trained only in part (GPT-2's fused
    c_attn holds Q, K and V: only its V third keeps a gradient)."""
    masks: list[tuple[torch.nn.Parameter, Tensor]] = []
    pattern = re.compile(spec) if spec not in (None, "value") else None
    n_on = 0
    for name, p in model.named_parameters():
        if spec is None:
            on = True
        elif spec == "value":
            on = bool(re.search(r"(v_proj|value)\.(weight|bias)$", name) or re.search(r"attn\.c_attn\.(weight|bias)$", name))
            if on and "c_attn" in name:
                m = torch.zeros_like(p)
                d = p.shape[-1] // 3
                m[..., 2 * d:] = 1.0  # Conv1D weight [in, 3d] / bias [3d]: columns q | k | v
                masks.append((p, m))
        else:
            on = bool(pattern.search(name))
        p.requires_grad_(on)
        n_on += on
    if n_on == 0:
        raise ValueError(f"grpo.trainable={spec!r} matches no parameter of the model")
    return masks


def apply_grad_masks(masks: list[tuple[torch.nn.Parameter, Tensor]]) -> None:
    """Zero the gradient of the frozen parts of partly trained parameters (see :func:`trainable_masks`)."""
    for p, m in masks:
        if p.grad is not None:
            p.grad.mul_(m)
