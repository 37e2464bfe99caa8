"""lightning_latent/supervised.py: one supervised step's loss, by hand (the module's use of it under
perturb.p_train: tests/test_module.py)."""
from __future__ import annotations

import random

import pytest
import torch

from lightning_latent.data.layout import IGNORE, CurriculumConfig, Layout, add_latent_tokens, sft_loss, train_batch
from lightning_latent.data.records import Record, SkipCounter
from lightning_latent.data.synthetic import SyntheticConfig, synthetic_vocabulary
from lightning_latent.data.tokenizer import build_word_tokenizer
from lightning_latent.model.latent_lm import LatentLM
from lightning_latent.model.perturb import PerturbConfig, Perturber
from lightning_latent.rl.rollout import TRAINING_MASK_K, rollout_seed
from lightning_latent.supervised import supervised_loss

from conftest import tiny_gpt2


def test_supervised_loss_is_the_layouts_loss_under_one_mask_per_sequence(synth_records):
    tok = build_word_tokenizer(synthetic_vocabulary(SyntheticConfig()))
    lm = tiny_gpt2(len(tok))
    add_latent_tokens(tok, lm)
    layout = Layout(tok, CurriculumConfig(c_thought=1, max_latent_stage=3), max_length=64)
    model = LatentLM(lm, layout.latent_id, layout.start_id, layout.end_id)
    too_long = Record(question="Tom has 3 apples . " * 20, steps=("<< 3 + 2 = 5 >>",), answer="5", idx=99)
    records, skips = [*synth_records[:4], too_long], SkipCounter()
    plain = supervised_loss(model, layout, records, 2, False, random.Random(1), "cpu", None, 0, 5, skips)
    assert model.training and skips.total == 1  # the long record left out and counted
    b = train_batch(layout, records[:4], 2, False, random.Random(1))
    assert float(plain) == float(sft_loss(model(b["input_ids"], b["attention_mask"], b["position_ids"]).logits,
                                          b["labels"]))
    masks = Perturber(lm, PerturbConfig(arm="dropout_shared", p=0.5))
    masked = supervised_loss(model, layout, records[:4], 2, False, random.Random(1), "cpu", masks, 0, 5)
    with masks.rows(torch.tensor([rollout_seed(0, 5, r.idx, TRAINING_MASK_K) for r in records[:4]])):
        out = model(b["input_ids"], b["attention_mask"], b["position_ids"], perturber=masks,
                    answer_from=(b["labels"] != IGNORE).int().argmax(1))
    assert float(masked) == pytest.approx(float(sft_loss(out.logits, b["labels"])), abs=0)
    assert abs(float(masked) - float(plain)) > 1e-4  # the masks change the loss (the check can fail)
