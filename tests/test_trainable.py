"""lightning_latent/model/trainable.py: which parameters a phase trains (all, GPT-2's value projections only
through a gradient mask on the fused c_attn, or a regex) and the masks applied to gradients."""
from __future__ import annotations

import pytest
import torch

from lightning_latent.model.trainable import apply_grad_masks, trainable_masks

from conftest import tiny_gpt2


def test_all_value_only_and_regex():
    lm = tiny_gpt2(20, n_layer=2, n_embd=8, n_head=2)
    assert trainable_masks(lm, None) == [] and all(p.requires_grad for p in lm.parameters())
    masks = trainable_masks(lm, "value")
    on = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert on == [f"transformer.h.{i}.attn.c_attn.{w}" for i in range(2) for w in ("weight", "bias")]
    assert len(masks) == 4
    w_mask = masks[0][1]
    assert w_mask.shape == (8, 24) and w_mask[:, :16].sum() == 0 and bool((w_mask[:, 16:] == 1).all())
    trainable_masks(lm, r"\.mlp\.")
    assert {n.split(".")[3] for n, p in lm.named_parameters() if p.requires_grad} == {"mlp"}
    with pytest.raises(ValueError, match=r"grpo.trainable='nothing_here' matches no parameter"):
        trainable_masks(lm, "nothing_here")


def test_apply_grad_masks_zeroes_the_frozen_part():
    p = torch.nn.Parameter(torch.zeros(2, 3))
    p.grad = torch.ones(2, 3)
    q = torch.nn.Parameter(torch.zeros(1))  # no gradient: left alone
    apply_grad_masks([(p, torch.tensor([[0.0, 1.0, 1.0]] * 2)), (q, torch.zeros(1))])
    assert p.grad.tolist() == [[0.0, 1.0, 1.0]] * 2 and q.grad is None
