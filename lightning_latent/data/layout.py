"""A record at curriculum stage k -> token ids and labels, and the collators that batch them.

The layout follows the reference Coconut code exactly (docs/design.md#layout):

    question \\n <|start-latent|> <|latent|>*(n) <|end-latent|> step_{k+1} \\n ... ### answer <eos>

with labels -100 on the question, the markers and the latent slots. Stage k replaces the first k steps
with k*c latent slots; past ``max_latent_stage`` every step is removed and the number of slots stays at
``max_latent_stage * c`` (``pad_latent_to_max``) or ``min(n_steps, max_latent_stage) * c``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .records import BadRow, Record, SkipCounter

START, END, LATENT = "<|start-latent|>", "<|end-latent|>", "<|latent|>"
IGNORE = -100


@dataclass
class CurriculumConfig:
    """The Coconut curriculum. ``mode``: ``coconut`` (continuous thoughts), ``pause_as_thought`` (same
    layout, the slots are ordinary pause tokens) or ``no_cot`` (question -> answer, no steps)."""

    c_thought: int = 1  # the embedded synthetic default; the Coconut paper's GSM8K recipe uses 2
    max_latent_stage: int = 3
    pad_latent_to_max: bool = False
    uniform_prob: float = 0.0
    mode: Literal["coconut", "pause_as_thought", "no_cot"] = "coconut"

    def __post_init__(self) -> None:
        if self.c_thought < 1:
            raise ValueError(f"curriculum.c_thought={self.c_thought} must be >= 1")
        if self.max_latent_stage < 0:
            raise ValueError(f"curriculum.max_latent_stage={self.max_latent_stage} must be >= 0")
        if not 0.0 <= self.uniform_prob <= 1.0:
            raise ValueError(f"curriculum.uniform_prob={self.uniform_prob} must be in [0, 1]")
        if self.mode not in ("coconut", "pause_as_thought", "no_cot"):
            raise ValueError(f"curriculum.mode={self.mode!r} must be coconut, pause_as_thought or no_cot")


def add_latent_tokens(tokenizer, model) -> dict[str, int]:
    """Add the three Coconut tokens and initialise their embeddings from an existing token's.

    Like the reference code, the new rows copy the embedding of ``<<`` when the tokenizer has it (a
    token that starts a calculation), else the EOS token's. Returns the ids.
    """
    new = [t for t in (START, END, LATENT) if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (START, END, LATENT)}
    emb = model.get_input_embeddings()
    if len(tokenizer) > emb.weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        emb = model.get_input_embeddings()
        vocab = tokenizer.get_vocab()
        src = vocab.get("<<", tokenizer.eos_token_id)
        with torch.no_grad():
            for t in new:
                emb.weight[ids[t]] = emb.weight[src]
            out = model.get_output_embeddings()
            if out is not None and out.weight.data_ptr() != emb.weight.data_ptr():
                for t in new:
                    out.weight[ids[t]] = out.weight[src]
    return ids


class Layout:
    """Turns records into ids for one tokenizer; ``cot=True`` is the plain CoT layout (no markers)."""

    def __init__(self, tokenizer, cfg: CurriculumConfig, max_length: int = 512):
        self.tok, self.cfg, self.max_length = tokenizer, cfg, max_length
        self.start_id = tokenizer.convert_tokens_to_ids(START)
        self.end_id = tokenizer.convert_tokens_to_ids(END)
        self.latent_id = tokenizer.convert_tokens_to_ids(LATENT)
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token")
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self._encoded: dict[tuple[str, bool], tuple[int, ...]] = {}  # (see _enc)

    #: Encoded texts kept per layout (a plain dict, emptied when full: picklable, bounded). A study's
    #: evaluations encode the same 2,000-5,000 problems again at every validation and for each of the k
    #: samples; the tokenizer call (~70 us) was about a tenth of a sampled evaluation (docs/performance.md).
    ENCODE_CACHE_SIZE = 1 << 16

    def _enc(self, text: str, special: bool = False) -> list[int]:
        cache = self._encoded
        ids = cache.get((text, special))
        if ids is None:
            if len(cache) >= self.ENCODE_CACHE_SIZE:
                cache.clear()
            ids = cache[text, special] = tuple(self.tok.encode(text, add_special_tokens=special))
        return list(ids)

    def pieces(self, rec: Record) -> tuple[list[int], list[list[int]], list[int]]:
        q = self._enc(rec.question + "\n", special=True)
        steps = [self._enc(s + "\n") for s in rec.steps]
        ans = self._enc("### " + rec.answer) + [self.eos_id]
        return q, steps, ans

    def n_latent(self, n_steps: int, stage: int, for_eval: bool) -> tuple[int, int]:
        """(steps skipped, latent slots) at ``stage``, following the reference's train / eval rules."""
        cfg = self.cfg
        if cfg.mode == "no_cot":
            return 10**9, 0
        if stage > cfg.max_latent_stage:
            k = cfg.max_latent_stage if cfg.pad_latent_to_max else min(n_steps, cfg.max_latent_stage)
            return 10**9, k * cfg.c_thought
        if for_eval:
            k = stage if cfg.pad_latent_to_max else min(n_steps, stage)
            return stage, k * cfg.c_thought
        return stage, stage * cfg.c_thought

    def markers(self, cot: bool) -> bool:
        return not cot and self.cfg.mode != "no_cot"

    def train_example(self, rec: Record, stage: int, cot: bool = False, rng: random.Random | None = None) -> dict:
        """ids and labels of one training example; raises BadRow('too_long') past ``max_length``."""
        q, steps, ans = self.pieces(rec)
        if cot:
            skip, n_lat = 0, 0
        else:
            if rng is not None and self.cfg.uniform_prob > 0 and rng.random() < self.cfg.uniform_prob:
                stage = rng.randrange(len(steps) + 1)
            skip, n_lat = self.n_latent(len(steps), stage, for_eval=False)
        mk = self.markers(cot)
        head = q + ([self.start_id] if mk else []) + [self.latent_id] * n_lat + ([self.end_id] if mk else [])
        tail = [t for s in steps[skip:] for t in s] + ans
        ids = head + tail
        if len(ids) > self.max_length:
            raise BadRow("too_long")
        return {"input_ids": ids, "labels": [IGNORE] * len(head) + tail, "idx": rec.idx}

    def prompt(self, rec: Record, stage: int, cot: bool = False) -> list[int]:
        """The generation prompt at ``stage``: question + markers + latent slots (eval rule)."""
        q = self._enc(rec.question + "\n", special=True)  # (the steps count, their text is not needed)
        if not self.markers(cot):
            return q
        _, n_lat = self.n_latent(len(rec.steps), stage, for_eval=True)
        return q + [self.start_id] + [self.latent_id] * n_lat + [self.end_id]


def collate_train(features: list[dict], pad_id: int, latent_id: int) -> dict[str, Tensor]:
    """Reference Coconut collation: left-pad so every row's first latent slot sits at one index, then
    right-pad; position ids restart at 0 after the left padding. Aligned slots keep the number of
    latent passes at the maximum number of thoughts instead of spreading them over the window."""
    firsts = [f["input_ids"].index(latent_id) for f in features if latent_id in f["input_ids"]]
    lead = max(firsts) if firsts else 0
    rows = []
    for f in features:
        ids = f["input_ids"]
        npad = lead - ids.index(latent_id) if latent_id in ids else 0
        rows.append(([pad_id] * npad + ids, [IGNORE] * npad + f["labels"], [0] * npad + [1] * len(ids),
                     [0] * npad + list(range(len(ids)))))
    t = max(len(r[0]) for r in rows)
    out = {
        "input_ids": torch.tensor([r[0] + [pad_id] * (t - len(r[0])) for r in rows]),
        "labels": torch.tensor([r[1] + [IGNORE] * (t - len(r[1])) for r in rows]),
        "attention_mask": torch.tensor([r[2] + [0] * (t - len(r[2])) for r in rows]),
        "position_ids": torch.tensor([r[3] + [0] * (t - len(r[3])) for r in rows]),
    }
    out["idx"] = torch.tensor([f.get("idx", -1) for f in features])
    return out


def collate_prompts(prompts: list[list[int]], pad_id: int) -> dict[str, Tensor]:
    """Left-pad prompts so every row ends at the last column (decoding then appends one column)."""
    t = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (t - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in prompts])
    return {"input_ids": ids, "attention_mask": mask}


def train_batch(layout: Layout, records: list[Record], stage: int, cot: bool, rng: random.Random,
                skips: SkipCounter | None = None, where: str = "batch") -> dict[str, Tensor]:
    """Records -> one collated training batch at ``stage``; a record too long for ``max_length`` is
    left out and counted in ``skips`` (source ``layout``); raises, naming ``where``, when none is left."""
    feats = []
    for r in records:
        try:
            feats.append(layout.train_example(r, stage, cot=cot, rng=rng))
        except BadRow as err:
            if skips is not None:
                skips.add("layout", err.reason, f"record {r.idx}")
    if not feats:
        raise ValueError(f"{where}: every record of the batch was longer than max_length={layout.max_length}: "
                         "raise max_length or shorten the data")
    return collate_train(feats, layout.pad_id, layout.latent_id)


def sft_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """The supervised loss of a collated training batch: next-token cross-entropy over the labelled
    positions (the steps and the answer; -100 elsewhere, see :meth:`Layout.train_example`), in float32."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)
