"""init_from: a Hugging Face model folder, a reference Coconut state dict (.pt), our .ckpt; bad files."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_latent.data.synthetic import SyntheticConfig, synthetic_vocabulary
from lightning_latent.data.tokenizer import build_word_tokenizer
from lightning_latent.model.build import ModelConfig
from lightning_latent.checkpoints import load_module
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


PRE_RENAME = Path(__file__).resolve().parent / "fixtures" / "pre_rename"


def test_checkpoint_written_before_the_backbone_rename_loads(tmp_path):
    """A checkpoint whose hyperparameters say ``model=`` (and name the configs ``lightning_latent.module.*``)
    still rebuilds, starts a new run (init_from) and resumes under the new names (--ckpt_path)."""
    ck = PRE_RENAME / "last.ckpt"
    assert "model" in torch.load(ck, map_location="cpu", weights_only=False)["hyper_parameters"]
    m = load_module(str(ck))
    assert m.backbone_cfg.n_layer == 1 and m.step_count == 3 and m.segment.kind == "grpo"
    fresh = LatentReasoner(backbone=ModelConfig(n_layer=1, n_embd=32, n_head=2, n_positions=128), max_length=128,
                           init_from=str(ck), schedule=[Phase("grpo", steps=1)])
    assert all(torch.equal(v, fresh.model.state_dict()[k]) for k, v in m.model.state_dict().items())
    # Lightning's own loading (weights_only=True) through the CLI: one more GRPO step on top of the old run.
    args = [sys.executable, str(PRE_RENAME.parents[2] / "experiments" / "run.py"), "fit",
            "--model.backbone.n_layer", "1", "--model.backbone.n_embd", "32", "--model.backbone.n_head", "2",
            "--model.backbone.n_positions", "128", "--model.max_length", "128",
            "--model.schedule", '[{"kind":"cot","steps":2},{"kind":"grpo","steps":2,"name":"dropout_grpo"}]',
            "--model.grpo.group_size", "2", "--model.grpo_prompts", "2", "--model.grpo.beta", "0.05",
            "--data.val_limit", "4", "--data.test_limit", "4", "--data.eval_batch_size", "4",
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
            "--ckpt_path", str(ck)]
    p = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    assert summary["steps"] == 4
