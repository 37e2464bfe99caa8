"""lightning_latent/data/tokenizer.py: the word-level tokenizer of a task's vocabulary (the synthetic one here):
special tokens, save / load, exact round trips of the text."""
from __future__ import annotations

import re

from lightning_latent.data.synthetic import TOKEN_PATTERN, SyntheticConfig, synthetic_record, synthetic_vocabulary
from lightning_latent.data.tokenizer import build_word_tokenizer


def test_synthetic_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    cfg = SyntheticConfig(min_steps=1, max_steps=5, max_number=99, max_value=999)
    vocab = synthetic_vocabulary(cfg)
    assert len(vocab) == len(set(vocab)) and "\n" in vocab and "###" in vocab and "999" in vocab
    assert "100" not in synthetic_vocabulary(SyntheticConfig())  # default max_value 99
    tok = build_word_tokenizer(vocab)
    assert (tok.pad_token, tok.eos_token, tok.unk_token) == ("<|pad|>", "<|eos|>", "<|unk|>")
    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    assert tok2.pad_token_id == tok.pad_token_id and tok2.eos_token_id == tok.eos_token_id
    for split in ("train", "test"):
        for i in range(200):
            r = synthetic_record(cfg, split, i)
            text = r.question + "\n" + "\n".join(r.steps) + "\n### " + r.answer + tok.eos_token
            ids = tok(text)["input_ids"]
            assert tok.unk_token_id not in ids
            assert tok2(text)["input_ids"] == ids
            toks = tok.convert_ids_to_tokens(ids)
            assert toks[:-1] == re.findall(TOKEN_PATTERN + r"|\n", text.removesuffix(tok.eos_token))
            assert toks[-1] == tok.eos_token
            assert tok.decode(ids).replace("\n", "").split() == [t for t in toks if t != "\n"]
            assert tok.decode(ids) == tok2.decode(ids)
    assert tok.convert_ids_to_tokens(tok("a\nb")["input_ids"])[1] == "\n"
    assert tok("### 28")["input_ids"] == [tok.convert_tokens_to_ids("###"), tok.convert_tokens_to_ids("28")]
