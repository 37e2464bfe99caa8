"""One supervised step's loss: the layout's batch, the forward under the training masks, the token loss.

The module steps the optimiser on it, as :func:`~.rl.update.grpo_update` is the GRPO step's work.
``perturb.p_train`` (docs/design.md#train-masks): one feature mask per sequence at the arm's sites, its
seed :func:`~.rl.rollout.rollout_seed` of (run seed, step, record, ``TRAINING_MASK_K``), applied to the
sequence's head (scope ``latent``: up to its first labelled column), so that a rollout's mask is one the
model could have drawn in training. A share ``perturb.unmasked_share`` of the sequences (a hash of each one's
mask seed: :func:`training_rows_masked`) trains with no mask, so the deterministic model is trained too.
"""
from __future__ import annotations

import random

import torch

from .data.layout import IGNORE, Layout, sft_loss, train_batch
from .data.records import Record, SkipCounter
from .model.hashing import hash_uniform
from .model.latent_lm import LatentLM
from .model.perturb import Perturber
from .rl.rollout import TRAINING_MASK_K, rollout_seed

#: The hash key of a training sequence's masked-or-not draw (``unmasked_share``), apart from every site's.
UNMASKED_KEY = 0x554E4D


def training_rows_masked(seeds: torch.Tensor, unmasked_share: float) -> torch.Tensor | None:
    """[N] bool: which training sequences carry their mask, a pure function of each one's mask seed (None:
    all of them, ``unmasked_share`` 0)."""
    if unmasked_share <= 0:
        return None
    return hash_uniform(seeds, (UNMASKED_KEY,), 1)[:, 0] >= unmasked_share


def supervised_loss(model: LatentLM, layout: Layout, records: list[Record], stage: int, cot: bool,
                    rng: random.Random, device, masks: Perturber | None, seed: int, step: int,
                    skips: SkipCounter | None = None) -> torch.Tensor:
    """The mean token loss of ``records`` at ``stage`` (a record too long is left out and counted in
    ``skips``), in training mode, under ``masks`` (None: no masks)."""
    b = train_batch(layout, records, stage, cot, rng, skips, f"step {step}")
    b = {k: v.to(device) for k, v in b.items()}
    model.train()
    if masks is None:
        out = model(b["input_ids"], b["attention_mask"], b["position_ids"])
    else:
        seeds = torch.tensor([rollout_seed(seed, step, int(i), TRAINING_MASK_K) for i in b["idx"]])
        answer_from = (b["labels"] != IGNORE).int().argmax(1)
        with masks.rows(seeds, training_rows_masked(seeds, masks.cfg.unmasked_share)):
            out = model(b["input_ids"], b["attention_mask"], b["position_ids"], perturber=masks,
                        answer_from=answer_from)
    return sft_loss(out.logits, b["labels"])
