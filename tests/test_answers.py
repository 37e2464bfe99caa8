"""The one set of answer rules (lightning_latent/answers.py): gold parsing and rewards agree.

Gold answers come from ``parse_gsm8k`` (the ``####`` field, canonicalised); model answers come from
``extract_answer`` on decoded output in the Coconut layout (``steps \\n ### answer <|eos|>``). Both go
through the same rules, so every real GSM8K test row, written the way a model writes it, must earn
reward 1 against its own gold and share its ``answer_key``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_latent.answers import answer_key, answers_equal, extract_answer, normalize_answer
from lightning_latent.data.records import Record, parse_gsm8k
from lightning_latent.rl.rewards import exact_match_reward

GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"
needs_gsm8k = pytest.mark.skipif(not (GSM8K / "test.jsonl").is_file(), reason="shared GSM8K copy absent")


def _with_dollar_and_commas(answer: str) -> str:
    """``"-1234.5"`` -> ``"-$1,234.5"``: how a model might write a canonical number."""
    sign, body = ("-", answer[1:]) if answer.startswith("-") else ("", answer)
    whole, dot, frac = body.partition(".")
    return f"{sign}${int(whole):,}{dot}{frac}"


def _gsm8k_test_records() -> list[tuple[dict, Record]]:
    rows = [json.loads(line) for line in (GSM8K / "test.jsonl").read_text().splitlines() if line.strip()]
    return [(row, parse_gsm8k(row, i)) for i, row in enumerate(rows)]


@needs_gsm8k
def test_every_gsm8k_test_answer_round_trips_through_model_style_output() -> None:
    pairs = _gsm8k_test_records()
    assert len(pairs) == 1319
    texts, golds = [], []
    for row, rec in pairs:
        field = row["answer"].rpartition("####")[2]
        assert rec.answer == normalize_answer(field)  # the gold IS the canonical #### field
        steps = "\n".join(rec.steps)
        for written in (field.strip(), _with_dollar_and_commas(rec.answer)):
            text = f"{steps}\n### {written} <|eos|>"
            pred = extract_answer(text)
            assert answers_equal(pred, rec.answer), (rec.idx, text[-60:], pred, rec.answer)
            assert answer_key(pred) == answer_key(rec.answer), (rec.idx, pred, rec.answer)
            assert normalize_answer(pred) == rec.answer, (rec.idx, pred, rec.answer)
            texts.append(text)
            golds.append(rec.answer)
    assert exact_match_reward(texts, golds).sum().item() == len(texts)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("28<|eos|>", "28"),  # special tokens are not part of an answer
        ("Tom<|eos|> ", "Tom"),
        ("<|<|x|>|>", ""),  # idempotent: a token left by removing an inner one goes too
        ("٣.٥", "3.5"),  # Unicode decimal digits become ASCII
        ("28 . .", "28"),  # every trailing full stop
        ("1,000,", "1,000,"),  # only commas between two digits are thousands separators
        ("1e3", "1e3"),  # exponents are text
        ("1/2", "1/2"),
        ("5%", "5%"),
        ("3 dollars", "3 dollars"),
        ("$5 apples", "$5 apples"),  # text keeps its $ (a stored target), comparison ignores it
    ],
)
def test_unified_rules(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected
    assert normalize_answer(normalize_answer(text)) == normalize_answer(text)


def test_comparison_rules() -> None:
    assert answers_equal("28 . .", "28.0") and answer_key("28...") == answer_key("28")
    assert answers_equal("Tom  is a cat..", "Tom is a cat") and answers_equal("$5 apples", "5 apples")
    assert not answers_equal("1e3", "1000")  # not a decimal literal: compared as text
    big = "1" * 400  # beyond a float: compared by its exact canonical decimal, not as inf
    assert answers_equal("0" + big, big) and not answers_equal(big, big + "1")
    assert answer_key("0" + big) == answer_key(big) != answer_key(big + "1")
    assert not answers_equal(big, "inf") and not answers_equal("28", "Tom")
