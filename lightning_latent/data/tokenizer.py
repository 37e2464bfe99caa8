"""A word-level tokenizer for the synthetic task (small vocabulary, fast tiny models).

Tokenisation: drop spaces and tabs (every whitespace except ``"\\n"``), then split with
:data:`~lightning_latent.data.synthetic.TOKEN_PATTERN` plus ``"\\n"`` as its own token (the Coconut
layout separates steps with ``"\\n"``). Decoding joins tokens with single spaces
(``"### 28"``, ``"apples ."``).
"""
from __future__ import annotations

from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .synthetic import TOKEN_PATTERN

__all__ = ["build_word_tokenizer", "PAD_TOKEN", "EOS_TOKEN", "UNK_TOKEN"]

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|eos|>"
UNK_TOKEN = "<|unk|>"


def build_word_tokenizer(vocab: list[str]) -> PreTrainedTokenizerFast:
    """WordLevel tokenizer over ``vocab`` (ids in the given order, after the three special tokens).

    ``"\\n"`` is always in the vocabulary. Special tokens: ``<|pad|>`` (id 0), ``<|eos|>`` (id 1),
    ``<|unk|>`` (id 2). No BOS/EOS is added on encode (the layout appends EOS itself).
    """
    specials = [PAD_TOKEN, EOS_TOKEN, UNK_TOKEN]
    ordered: dict[str, int] = {}
    for tok in [*specials, "\n", *vocab]:
        if tok not in ordered:
            ordered[tok] = len(ordered)
    tok = Tokenizer(models.WordLevel(vocab=ordered, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(TOKEN_PATTERN + r"|\n"), behavior="isolated"),
        ]
    )
    # No decoder: tokenizers then joins tokens with single spaces.
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        clean_up_tokenization_spaces=False,
    )
