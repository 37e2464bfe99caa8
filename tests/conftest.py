"""Shared fixtures: tiny GPT-2 models, the synthetic word tokenizer with the Coconut tokens, layouts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_latent.data.layout import CurriculumConfig, Layout, add_latent_tokens
from lightning_latent.data.synthetic import SyntheticConfig, synthetic_record, synthetic_vocabulary
from lightning_latent.data.tokenizer import build_word_tokenizer
from lightning_latent.model.latent_lm import LatentLM

# Outputs of the reference Coconut implementation (provenance in the folder's README.md); part of the repository.
FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures" / "coconut_reference"

torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared 2-core machine


def tiny_gpt2(vocab_size: int, seed: int = 0, dtype=torch.float32, n_layer: int = 2, n_embd: int = 32,
              n_head: int = 2, n_positions: int = 128, init_range: float = 0.2) -> GPT2LMHeadModel:
    """A random tiny GPT-2 (all dropout 0, eval mode). A large init range makes logits and hidden
    states far from uniform so that differences between implementations are visible."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                     n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     initializer_range=init_range, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    cfg._attn_implementation = "eager"
    lm = GPT2LMHeadModel(cfg).to(dtype)
    lm.eval()
    return lm


@pytest.fixture(scope="session")
def word_tokenizer():
    """The synthetic task's word-level tokenizer with the three Coconut tokens added."""
    tok = build_word_tokenizer(synthetic_vocabulary(SyntheticConfig()))
    lm = tiny_gpt2(len(tok))
    add_latent_tokens(tok, lm)
    return tok


@pytest.fixture()
def make_latent_lm(word_tokenizer):
    """Factory: a tiny GPT-2 LatentLM over the word tokenizer (vocabulary incl. Coconut tokens)."""

    def make(seed: int = 0, dtype=torch.float32, feedback: bool = True, **kw) -> LatentLM:
        tok = word_tokenizer
        lm = tiny_gpt2(len(tok), seed=seed, dtype=dtype, **kw)
        lay = Layout(tok, CurriculumConfig(c_thought=2, max_latent_stage=3))
        m = LatentLM(lm, lay.latent_id, lay.start_id, lay.end_id, feedback=feedback)
        m.eval()
        return m

    return make


@pytest.fixture()
def layout(word_tokenizer):
    return Layout(word_tokenizer, CurriculumConfig(c_thought=1, max_latent_stage=3), max_length=256)


@pytest.fixture(scope="session")
def synth_records():
    cfg = SyntheticConfig()
    return [synthetic_record(cfg, "train", i) for i in range(8)]


@pytest.fixture(scope="session")
def coconut_fixture():
    # The fixture is in the repository: a missing file is an error, never a reason to skip.
    path = FIXTURE_DIR / "expected.json"
    if not path.exists() or not (FIXTURE_DIR / "model.safetensors").exists():
        pytest.fail(f"reference fixture missing from the repository: {FIXTURE_DIR} (see tests/fixtures/"
                    "coconut_reference/README.md)", pytrace=False)
    return json.loads(path.read_text())


def tiny_trainer(root, **overrides):
    """A CPU Trainer for in-process tiny fits: the schedule decides the length (one epoch per segment),
    no logger, checkpoints or progress bar unless asked for."""
    import lightning as L

    kw = dict(accelerator="cpu", devices=1, max_epochs=-1, reload_dataloaders_every_n_epochs=1,
              check_val_every_n_epoch=None, val_check_interval=1000, num_sanity_val_steps=0, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=str(root))
    kw.update(overrides)
    return L.Trainer(**kw)
