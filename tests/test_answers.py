"""lightning_latent/answers.py, the one set of answer rules: normalising, extracting and comparing answers;
gold parsing and rewards agree.

Gold answers come from ``parse_gsm8k`` (the ``####`` field, canonicalised); model answers come from
``extract_answer`` on decoded output in the Coconut layout (``steps \\n ### answer <|eos|>``). Both go
through the same rules, so every real GSM8K test row, written the way a model writes it, must earn
reward 1 against its own gold and share its ``answer_key``.
"""
from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_latent.answers import answer_key, answers_equal, extract_answer, normalize_answer
from lightning_latent.data.records import Record, parse_gsm8k
from lightning_latent.rl.rewards import exact_match_reward

from conftest import GSM8K  # the first 100 rows of GSM8K's test split (tests/fixtures/gsm8k/README.md)
from strategies import PROP, numbers, pieces  # (tests/strategies.py: shared with the other property tests)


def _with_dollar_and_commas(answer: str) -> str:
    """``"-1234.5"`` -> ``"-$1,234.5"``: how a model might write a canonical number."""
    sign, body = ("-", answer[1:]) if answer.startswith("-") else ("", answer)
    whole, dot, frac = body.partition(".")
    return f"{sign}${int(whole):,}{dot}{frac}"


def _gsm8k_test_records() -> list[tuple[dict, Record]]:
    rows = [json.loads(line) for line in (GSM8K / "test.jsonl").read_text().splitlines() if line.strip()]
    return [(row, parse_gsm8k(row, i)) for i, row in enumerate(rows)]


def test_every_gsm8k_test_answer_round_trips_through_model_style_output() -> None:
    pairs = _gsm8k_test_records()
    assert len(pairs) == 100  # the fixture's cut of the 1,319 test rows
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


# --------------------------------------------------------------------------------------------------
# normalize_answer
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("1,000", "1000"),
        ("3.50", "3.5"),
        ("-0", "0"),
        ("-0.00", "0"),
        ("5.0", "5"),
        (" $18. ", "18"),
        ("007", "7"),
        (".5", "0.5"),
        ("-1,234.50", "-1234.5"),
        ("123456789012345678901234567890.10", "123456789012345678901234567890.1"),
        ("Tom is a wumpus.", "Tom is a wumpus."),
        ("  Tom is a lempus.  ", "Tom is a lempus."),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


# --------------------------------------------------------------------------------------------------
# extract_answer and answers_equal
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
        ("step\n### 28 <|eos|>", "28"),
        ("### 28<|endoftext|><|endoftext|>", "28"),
        ("#### $1,234,567\nmore text", "1234567"),
        ("### 1 ### 2\n", "2"),  # the LAST marker wins
        ("#### 5\n### 7", "7"),
        ("no marker here 42", None),
        ("###", ""),
        ("####   -3.5  \n", "-3.5"),
        ("### yes, no", "yes, no"),  # a comma not between digits is content
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_answers_equal() -> None:
    assert answers_equal("28.0", "28")
    assert answers_equal("28.", "28")
    assert answers_equal("$1,000", "1000")
    assert answers_equal(" 28 ", "28")
    assert not answers_equal("28.1", "28")
    assert not answers_equal(None, "28")
    assert answers_equal("Tom  is   a cat.", "Tom is a cat")
    assert not answers_equal("Tom", "tom")


# --------------------------------------------------------------------------------------------------
# Property tests
# --------------------------------------------------------------------------------------------------


@PROP
@given(text=st.one_of(pieces, numbers, st.text()))
def test_property_normalize_answer(text):
    out = normalize_answer(text)
    assert isinstance(out, str)
    assert normalize_answer(out) == out or out == text.strip()
    if re.fullmatch(r"\s*\$?\s*[+-]?\d+(\.\d+)?\s*", text):
        assert float(out) == float(text.replace("$", ""))
        assert out == normalize_answer(out)


_NUM = st.one_of(st.integers(-10**30, 10**30), st.decimals(allow_nan=False, allow_infinity=False, places=3))


@settings(max_examples=300, deadline=None)
@given(prefix=st.text(max_size=80), n=_NUM, commas=st.booleans(), dollar=st.booleans(),
       junk=st.text(max_size=40).filter(lambda x: "###" not in x), special=st.sampled_from(["", "<|eos|>", "<|endoftext|>", " <|latent|>"]))
def test_property_extract_answer(prefix, n, commas, dollar, junk, special):
    """Random, unicode, huge, negative and comma-grouped answers after the last marker: extraction never
    raises, returns None only without a marker, and a clean numeric answer compares equal to its gold."""
    s = f"{n:,}" if commas and isinstance(n, int) else str(n)
    text = f"{prefix}\n#### {'$' if dollar else ''}{s}{special}\n{junk}"
    got = extract_answer(text)
    assert got is not None
    gold = str(n)
    assert answers_equal(got, gold), (text, got, gold)
    # arbitrary text: never raises; None exactly when there is no marker
    for t in (prefix, junk, prefix + junk):
        r = extract_answer(t)
        assert (r is None) == ("###" not in t)
        answers_equal(r, gold)
        answers_equal(t, gold)
