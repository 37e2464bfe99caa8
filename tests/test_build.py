"""lightning_latent/model/build.py: building the latent model: a model from scratch (config checks, the
Coconut tokens), ``init_from`` a Hugging Face model folder, a reference Coconut state dict (.pt) or our
.ckpt; bad files named."""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_latent.data.synthetic import SyntheticConfig, synthetic_vocabulary
from lightning_latent.data.tokenizer import build_word_tokenizer
from lightning_latent.model.build import ModelConfig
from lightning_latent.module import LatentReasoner
from lightning_latent.schedule import Phase


@pytest.fixture()
def hf_folder(tmp_path):
    """A tiny GPT-2 and its tokenizer saved like a hub model (no Coconut tokens yet)."""
    tok = build_word_tokenizer(synthetic_vocabulary(SyntheticConfig(max_value=60)))
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=1, n_embd=32, n_head=2, n_positions=128,
                                    eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id))
    folder = tmp_path / "tiny-gpt2"
    lm.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make(folder, **kw) -> LatentReasoner:
    kw.setdefault("max_length", 128)  # the tiny model has 128 learned positions
    return LatentReasoner(backbone=ModelConfig(name_or_path=str(folder), attn_implementation="eager"),
                          schedule=[Phase("grpo", steps=1)], **kw)


def test_hub_style_folder_adds_coconut_tokens(hf_folder):
    m = make(hf_folder)
    tok = m.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in ("<|start-latent|>", "<|end-latent|>", "<|latent|>")]
    emb = m.model.lm.get_input_embeddings().weight
    assert emb.shape[0] == len(tok) and len(set(ids)) == 3
    src = tok.get_vocab()["<<"]
    for i in ids:  # new rows copy an existing token's embedding
        assert torch.equal(emb[i], emb[src])


def test_reference_pt_and_our_ckpt_round_trip(hf_folder, tmp_path):
    a = make(hf_folder)
    with torch.no_grad():
        for p in a.model.lm.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    # The reference Coconut code saves its model's state dict: keys base_causallm.* (plus its embedding alias).
    ref = {f"base_causallm.{k}": v.clone() for k, v in a.model.lm.state_dict().items()}
    ref["embedding.weight"] = a.model.lm.get_input_embeddings().weight.clone()
    torch.save(ref, tmp_path / "coconut_ref.pt")
    b = make(hf_folder, init_from=str(tmp_path / "coconut_ref.pt"))
    for (k, v), (k2, v2) in zip(a.model.lm.state_dict().items(), b.model.lm.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    # Our own checkpoint format (what Lightning writes, plus the tokenizer) also loads.
    ck = {"state_dict": {f"model.lm.{k}": v for k, v in a.model.lm.state_dict().items()},
          "schedule_state": {"step_count": 0}}
    torch.save(ck, tmp_path / "ours.ckpt")
    c = make(hf_folder, init_from=str(tmp_path / "ours.ckpt"))
    assert all(torch.equal(v, c.model.lm.state_dict()[k]) for k, v in a.model.lm.state_dict().items())


def test_wrong_shape_and_foreign_files_name_the_problem(hf_folder, tmp_path):
    other = {f"base_causallm.{k}": v for k, v in
             GPT2LMHeadModel(GPT2Config(vocab_size=50, n_layer=1, n_embd=16, n_head=2)).state_dict().items()}
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"has shape .* the model expects"):
        make(hf_folder, init_from=str(tmp_path / "other.pt"))
    torch.save({"foo": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match=r"neither a lightning-latent checkpoint nor a reference Coconut"):
        make(hf_folder, init_from=str(tmp_path / "foreign.pt"))
    with pytest.raises(ValueError, match=r"cannot load (model|tokenizer) .*no-such-model"):
        LatentReasoner(backbone=ModelConfig(name_or_path=str(tmp_path / "no-such-model")))


def test_from_scratch_model_and_config_checks():
    from lightning_latent.data.layout import CurriculumConfig
    from lightning_latent.model.build import build_latent_model, tokenizer_from_bytes, tokenizer_to_bytes

    tok, layout, model = build_latent_model(ModelConfig(n_layer=1, n_embd=16, n_head=2, n_positions=64),
                                            CurriculumConfig(c_thought=1, max_latent_stage=1), 64,
                                            SyntheticConfig(), None, None)
    assert model.lm.config.n_layer == 1 and model.lm.config.n_embd == 16 and model.lm.config.n_positions == 64
    assert model.lm.get_input_embeddings().weight.shape[0] == len(tok)  # the Coconut tokens included
    assert (model.latent_id, model.start_id, model.end_id) == (layout.latent_id, layout.start_id, layout.end_id)
    assert tok.convert_ids_to_tokens(layout.latent_id) == "<|latent|>"
    back = tokenizer_from_bytes(tokenizer_to_bytes(tok))  # what a checkpoint carries
    assert back.get_vocab() == tok.get_vocab()
    with pytest.raises(ValueError, match="backbone.n_embd=30 must be divisible by backbone.n_head=4"):
        ModelConfig(n_layer=1, n_embd=30, n_head=4)
