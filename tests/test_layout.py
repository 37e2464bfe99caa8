"""lightning_latent/data/layout.py: the curriculum layout (the exact token lists of the reference Coconut code
at every stage, the baselines' layouts, the uniform stage mixture, too-long examples), the Coconut tokens,
collation, a training batch and the supervised loss."""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from lightning_latent.data.layout import (
    END,
    IGNORE,
    LATENT,
    START,
    CurriculumConfig,
    Layout,
    add_latent_tokens,
    collate_prompts,
    collate_train,
    sft_loss,
    train_batch,
)
from lightning_latent.data.records import BadRow, Record, SkipCounter
from lightning_latent.data.synthetic import SyntheticConfig, synthetic_vocabulary
from lightning_latent.data.tokenizer import build_word_tokenizer
from lightning_latent.model.latent_lm import LatentLM

from conftest import tiny_gpt2


REC = Record(question="Tom has 3 apples.", steps=("<<3+2=5>>", "<<5*2=10>>", "<<10-1=9>>"), answer="9", idx=7)


def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_layout_stage_k(word_tokenizer, stage):
    tok = word_tokenizer
    lay = Layout(tok, CurriculumConfig(c_thought=2, max_latent_stage=3))
    q = _ids(tok, "Tom has 3 apples .\n")
    assert tok.convert_ids_to_tokens(q) == ["Tom", "has", "3", "apples", ".", "\n"]
    steps = [_ids(tok, "<< 3 + 2 = 5 >>\n"), _ids(tok, "<< 5 * 2 = 10 >>\n"), _ids(tok, "<< 10 - 1 = 9 >>\n")]
    assert all(len(s) == 8 for s in steps)
    ans = _ids(tok, "### 9") + [tok.eos_token_id]
    assert len(ans) == 3
    s, e, lt = (tok.convert_tokens_to_ids(x) for x in (START, END, LATENT))
    head = q + [s] + [lt] * (2 * stage) + [e]
    tail = [t for st in steps[stage:] for t in st] + ans
    ex = lay.train_example(REC, stage)
    assert ex["input_ids"] == head + tail
    assert ex["labels"] == [IGNORE] * len(head) + tail
    assert ex["idx"] == 7
    # the generation prompt (eval rule): question, markers, min(n_steps, stage) * c slots
    assert lay.prompt(REC, stage) == head
    # cot=True: no markers, no latents, every step
    cot = lay.train_example(REC, stage, cot=True)
    assert cot["input_ids"] == q + [t for st in steps for t in st] + ans
    assert cot["labels"] == [IGNORE] * len(q) + [t for st in steps for t in st] + ans
    assert lay.prompt(REC, stage, cot=True) == q


def test_layout_past_max_stage_and_padding(word_tokenizer):
    tok = word_tokenizer
    lt = tok.convert_tokens_to_ids(LATENT)
    short = Record(question="Ann has 4 pens.", steps=("<<4+1=5>>",), answer="5")
    # max_latent_stage=2, stage 3 > max: all steps removed, min(n_steps, max) * c slots
    lay = Layout(tok, CurriculumConfig(c_thought=2, max_latent_stage=2))
    ex = lay.train_example(REC, 3)
    assert ex["input_ids"].count(lt) == 4 and _ids(tok, "<<")[0] not in ex["input_ids"]
    assert lay.train_example(short, 3)["input_ids"].count(lt) == 2
    assert lay.prompt(short, 3).count(lt) == 2
    # training inside the curriculum: stage * c slots even past the record's number of steps
    assert lay.train_example(short, 2)["input_ids"].count(lt) == 4
    assert lay.prompt(short, 2).count(lt) == 2  # eval rule: min(n_steps, stage) * c
    padded = Layout(tok, CurriculumConfig(c_thought=2, max_latent_stage=2, pad_latent_to_max=True))
    assert padded.train_example(short, 3)["input_ids"].count(lt) == 4
    assert padded.prompt(short, 3).count(lt) == 4
    assert padded.prompt(short, 2).count(lt) == 4


def test_layout_uniform_prob(word_tokenizer):
    tok = word_tokenizer
    lt = tok.convert_tokens_to_ids(LATENT)
    lay = Layout(tok, CurriculumConfig(c_thought=2, max_latent_stage=3, uniform_prob=1.0))
    base = {k: len(lay.train_example(REC, k)["input_ids"]) for k in range(4)}
    seen = []
    for seed in range(40):
        ex = lay.train_example(REC, 1, rng=random.Random(seed))
        n = ex["input_ids"].count(lt)
        assert n % 2 == 0 and 0 <= n // 2 <= len(REC.steps)
        k = n // 2
        assert ex == lay.train_example(REC, k), "stage drawn uniformly must lay out exactly like stage k"
        assert len(ex["input_ids"]) == base[k]
        seen.append(k)
    assert set(seen) == {0, 1, 2, 3}
    # same rng seed -> same draw
    assert lay.train_example(REC, 1, rng=random.Random(5)) == lay.train_example(REC, 1, rng=random.Random(5))
    # without an rng the scheduled stage is used
    assert lay.train_example(REC, 1)["input_ids"].count(lt) == 2


def test_layout_no_cot(word_tokenizer):
    tok = word_tokenizer
    lay = Layout(tok, CurriculumConfig(c_thought=2, max_latent_stage=3, mode="no_cot"))
    q = _ids(tok, "Tom has 3 apples .\n")
    ans = _ids(tok, "### 9") + [tok.eos_token_id]
    for stage in (0, 2, 5):
        ex = lay.train_example(REC, stage)
        assert ex["input_ids"] == q + ans
        assert ex["labels"] == [IGNORE] * len(q) + ans
        assert lay.prompt(REC, stage) == q


def test_layout_pause_as_thought(word_tokenizer):
    tok = word_tokenizer
    co = Layout(tok, CurriculumConfig(c_thought=2, max_latent_stage=3))
    pa = Layout(tok, CurriculumConfig(c_thought=2, max_latent_stage=3, mode="pause_as_thought"))
    for stage in range(4):
        assert pa.train_example(REC, stage) == co.train_example(REC, stage)
        assert pa.prompt(REC, stage) == co.prompt(REC, stage)
    lm = tiny_gpt2(len(tok), seed=5)
    ids = torch.tensor([pa.train_example(REC, 2)["input_ids"]])
    with torch.no_grad():
        plain = lm(ids).logits
        pause = LatentLM(lm, pa.latent_id, pa.start_id, pa.end_id, feedback=False)(ids).logits
        latent = LatentLM(lm, pa.latent_id, pa.start_id, pa.end_id, feedback=True)(ids).logits
    assert (pause - plain).abs().max().item() < 1e-5
    assert (latent - plain).abs().max().item() > 1e-3


def test_layout_too_long(word_tokenizer):
    lay = Layout(word_tokenizer, CurriculumConfig(c_thought=2, max_latent_stage=3), max_length=20)
    n = len(lay.train_example(REC, 3)["input_ids"])
    assert n <= 20
    with pytest.raises(BadRow) as err:
        lay.train_example(REC, 0)
    assert err.value.reason == "too_long"
    exact = Layout(word_tokenizer, CurriculumConfig(c_thought=2, max_latent_stage=3), max_length=n)
    exact.train_example(REC, 3)  # exactly max_length is fine
    with pytest.raises(BadRow):
        Layout(word_tokenizer, CurriculumConfig(c_thought=2, max_latent_stage=3), max_length=n - 1).train_example(REC, 3)


def test_add_latent_tokens_initialises_from_calc_token():
    tok = build_word_tokenizer(synthetic_vocabulary(SyntheticConfig()))
    n0 = len(tok)
    lm = tiny_gpt2(n0, seed=6)
    ids = add_latent_tokens(tok, lm)
    assert sorted(ids.values()) == [n0, n0 + 1, n0 + 2]
    w = lm.get_input_embeddings().weight
    assert w.shape[0] == n0 + 3
    src = tok.convert_tokens_to_ids("<<")
    for i in ids.values():
        assert torch.equal(w[i], w[src])
    assert torch.equal(lm.get_output_embeddings().weight, w)
    # idempotent
    assert add_latent_tokens(tok, lm) == ids and lm.get_input_embeddings().weight.shape[0] == n0 + 3


# --------------------------------------------------------------------------------------------------
# Collation, a training batch, the supervised loss
# --------------------------------------------------------------------------------------------------


def test_collate_prompts_left_pads_and_collate_train_aligns_the_first_thought():
    pb = collate_prompts([[5, 6, 7], [8]], pad_id=0)
    assert pb["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert pb["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    lt = 9
    b = collate_train([{"input_ids": [1, 2, lt, 3], "labels": [IGNORE, IGNORE, IGNORE, 3], "idx": 4},
                       {"input_ids": [1, lt, 3], "labels": [IGNORE, IGNORE, 3]}], pad_id=0, latent_id=lt)
    # row 1 is left-padded by one so that both first thoughts sit in column 2, then right-padded
    assert b["input_ids"].tolist() == [[1, 2, lt, 3], [0, 1, lt, 3]]
    assert b["labels"].tolist() == [[IGNORE, IGNORE, IGNORE, 3], [IGNORE, IGNORE, IGNORE, 3]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 1, 2]]  # positions restart after the padding
    assert b["idx"].tolist() == [4, -1]


def test_train_batch_leaves_out_and_counts_too_long_records(word_tokenizer):
    lay = Layout(word_tokenizer, CurriculumConfig(c_thought=2, max_latent_stage=3), max_length=20)
    short = Record(question="Ann has 4 pens.", steps=("<<4+1=5>>",), answer="5", idx=3)
    skips = SkipCounter()
    b = train_batch(lay, [REC, short], 0, False, random.Random(0), skips)  # REC at stage 0 is too long
    assert b["idx"].tolist() == [3] and skips.as_dict() == {"layout/too_long": 1}
    assert b["input_ids"][0].tolist() == lay.train_example(short, 0)["input_ids"]
    with pytest.raises(ValueError, match="longer than max_length=20"):
        train_batch(lay, [REC], 0, False, random.Random(0))


def test_sft_loss_by_hand_on_one_row_of_three():
    """Position t's logits predict label t + 1; labels of -100 (the question) are not predicted. On a 1 x 3
    example with labels [7, -100, 2] only position 1 -> label 2 counts (label 0 has no predecessor)."""
    logits = torch.tensor([[[0.5, -1.0, 2.0, 0.0], [1.0, 0.0, 3.0, -2.0], [9.0, 9.0, 9.0, 9.0]]])
    labels = torch.tensor([[7, IGNORE, 2]])
    # log-softmax of row 1 at index 2: 3 - log(e^1 + e^0 + e^3 + e^-2)
    by_hand = -(3.0 - math.log(math.exp(1.0) + 1.0 + math.exp(3.0) + math.exp(-2.0)))
    assert sft_loss(logits, labels).item() == pytest.approx(by_hand, rel=1e-6)
    # labels [-100, 2, 1]: positions 0 -> 2 and 1 -> 1, the mean of two cross-entropies; position 2 unused
    labels2 = torch.tensor([[IGNORE, 2, 1]])
    want = F.cross_entropy(logits[0, :2], torch.tensor([2, 1]))
    assert sft_loss(logits, labels2).item() == pytest.approx(want.item(), rel=1e-6)
    assert sft_loss(logits.double(), labels2).dtype == torch.float32
    # the unlabelled positions' logits do not matter
    other = logits.clone()
    other[0, 2] = -5.0
    assert sft_loss(other, labels2).item() == pytest.approx(want.item(), rel=1e-6)


def test_layout_encodes_each_text_once_and_bounds_what_it_keeps(word_tokenizer, monkeypatch):
    """An evaluation encodes the same problems again at every validation and for each of its k samples: the
    layout keeps what it encoded (the same ids as the tokenizer's, a fresh list each time, so a caller
    may change it), at most ENCODE_CACHE_SIZE texts. A prompt encodes only the question."""
    lay = Layout(word_tokenizer, CurriculumConfig(c_thought=1, max_latent_stage=3))
    calls = []
    encode = word_tokenizer.encode
    monkeypatch.setattr(word_tokenizer, "encode", lambda text, **kw: calls.append(text) or encode(text, **kw))
    first = lay.prompt(REC, 3, cot=True)  # (the question's ids themselves: no markers appended)
    assert calls == ["Tom has 3 apples.\n"]
    first.append(-1)  # the caller's own list
    assert lay.prompt(REC, 3, cot=True) == lay.prompt(REC, 3, cot=True) == first[:-1] and len(calls) == 1
    assert lay.prompt(REC, 3)[: len(first) - 1] == first[:-1] and len(calls) == 1
    ex = lay.train_example(REC, 1)
    assert len(calls) == 1 + 3 + 1  # the steps and the answer, once each
    assert lay.train_example(REC, 1) == ex and len(calls) == 5
    monkeypatch.setattr(Layout, "ENCODE_CACHE_SIZE", 5)
    lay.prompt(Record(question="Ann has 2 pens.", steps=(), answer="2", idx=8), 0)  # full: emptied, then kept
    assert len(lay._encoded) == 1 and len(calls) == 6
