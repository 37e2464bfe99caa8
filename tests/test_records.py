"""lightning_latent/data/records.py: the row parsers (GSM8K, GSM8K-Aug, Coconut JSON) and skip counting.

Property tests: a parser returns a Record or raises BadRow, nothing else."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lightning_latent.data.records import (
    BadRow,
    Record,
    SkipCounter,
    parse_coconut_json,
    parse_gsm8k,
    parse_gsm8k_aug,
    raise_or_count,
)
from strategies import PROP, numbers, pieces  # (tests/strategies.py: shared with the other property tests)


# ------------------------------------------------------------------------------------------------
# GSM8K


def test_parse_gsm8k_example():
    row = {
        "question": "Janet has 16 eggs.",
        "answer": "She eats 3: 16 - 3 = <<16-3=13>>13.\n\n  She sells them for $2: 13*2 = $<<13*2=26>>26 \n#### 26",
    }
    r = parse_gsm8k(row, 4)
    assert r == Record(
        "Janet has 16 eggs.",
        ("She eats 3: 16 - 3 = <<16-3=13>>13.", "She sells them for $2: 13*2 = $<<13*2=26>>26"),
        "26",
        4,
    )
    assert parse_gsm8k({"question": "q", "answer": "x\n#### 1,000"}, 0).answer == "1000"


@pytest.mark.parametrize(
    "row,reason",
    [
        ({"answer": "#### 3"}, "missing_field"),
        ({"question": "q"}, "missing_field"),
        ({"question": None, "answer": "#### 3"}, "missing_field"),
        ({"question": "  ", "answer": "#### 3"}, "empty_question"),
        ({"question": "q", "answer": "2+1=3"}, "no_answer"),
        ({"question": "q", "answer": "2+1=3\n####  "}, "no_answer"),
        ({"question": "q", "answer": "#### three"}, "non_numeric_answer"),
        ({"question": 3, "answer": "#### 3"}, "bad_type"),
        ("not a dict", "unparsable"),
    ],
)
def test_parse_gsm8k_bad(row, reason):
    with pytest.raises(BadRow) as e:
        parse_gsm8k(row, 0)
    assert e.value.reason == reason


# ------------------------------------------------------------------------------------------------
# GSM8K-Aug


def test_parse_gsm8k_aug_examples():
    r = parse_gsm8k_aug(
        "Out of 600 employees, 30% got a raise. How many?||<<600*30/100=180>> <<600-180=420>> #### 420\n", 7
    )
    assert r == Record(
        "Out of 600 employees, 30% got a raise. How many?",
        ("<<600*30/100=180>>", "<<600-180=420>>"),
        "420",
        7,
    )
    assert parse_gsm8k_aug("q||#### -3.50", 0) == Record("q", (), "-3.5", 0)
    assert parse_gsm8k_aug("q||<<1+1=2>><<2*2=4>> #### 4", 0).steps == ("<<1+1=2>>", "<<2*2=4>>")


@pytest.mark.parametrize(
    "line,reason",
    [
        ("no separator <<1+1=2>> #### 2", "unparsable"),
        ("q||<<1+1=2>> 2", "no_answer"),
        ("q||<<1+1=2>> then 2 #### 2", "unparsable"),
        ("||<<1+1=2>> #### 2", "empty_question"),
        ("q||<<1+1=2>> #### ", "no_answer"),
        ("q||<<1+1=2>> #### two", "non_numeric_answer"),
        ("q||<<1+1=2>> #### 2 #### 3", "unparsable"),
    ],
)
def test_parse_gsm8k_aug_bad(line, reason):
    with pytest.raises(BadRow) as e:
        parse_gsm8k_aug(line, 0)
    assert e.value.reason == reason


# ------------------------------------------------------------------------------------------------
# Skips


def test_raise_or_count():
    c = SkipCounter()
    raise_or_count(c, False, "src", "f:1", BadRow("no_answer"))
    assert c.total == 1 and c.count("src", "no_answer") == 1
    with pytest.raises(ValueError, match=r"^src: bad row at f:2: no_answer$"):
        raise_or_count(c, True, "src", "f:2", BadRow("no_answer"))


def test_skip_counter_counts_by_source_and_reason():
    c = SkipCounter()
    c.add("gsm8k/train", "no_answer")
    c.add("gsm8k/train", "no_answer")
    c.add("gsm8k/test", "unparsable")
    assert c.total == 3 and c.count("gsm8k/train", "no_answer") == 2 and c.count("gsm8k/test", "no_answer") == 0
    assert c.as_dict() == {"gsm8k/test/unparsable": 1, "gsm8k/train/no_answer": 2}


def test_parse_coconut_json_example():
    r = parse_coconut_json({"question": " Is Tom a cat? ", "steps": [" Tom is a cat. "], "answer": "Tom is a cat. "}, 5)
    assert r == Record("Is Tom a cat?", ("Tom is a cat.",), "Tom is a cat.", 5)
    assert parse_coconut_json({"question": "q", "steps": [], "answer": "1,000"}, 0).answer == "1000"
    with pytest.raises(BadRow) as e:
        parse_coconut_json({"question": "q", "answer": "A."}, 0)
    assert e.value.reason == "missing_field"


# ------------------------------------------------------------------------------------------------
# Property tests: parsers return a Record or raise BadRow, nothing else


_values = st.one_of(st.none(), st.integers(), st.floats(), pieces, st.lists(pieces, max_size=4), st.text())




def _ok(record) -> None:
    assert isinstance(record, Record)
    assert isinstance(record.question, str) and record.question.strip()
    assert isinstance(record.answer, str) and record.answer
    assert all(isinstance(s, str) for s in record.steps)


def _check(fn, arg) -> None:
    try:
        rec = fn(arg, 0)
    except BadRow as e:
        assert isinstance(e.reason, str) and e.reason
    else:
        _ok(rec)


@PROP
@given(q=_values, steps=st.lists(pieces, max_size=4), ans=numbers, tail=pieces, cut=st.integers(0, 200),
       extra=st.dictionaries(st.sampled_from(["question", "answer"]), _values, max_size=2))
def test_property_parse_gsm8k(q, steps, ans, tail, cut, extra):
    answer = "\n".join(steps) + "\n#### " + ans + tail
    _check(parse_gsm8k, {"question": q, "answer": answer})
    _check(parse_gsm8k, {"question": q, "answer": answer[:cut]})
    _check(parse_gsm8k, extra)
    if isinstance(q, str) and q.strip():
        try:
            r = parse_gsm8k({"question": q, "answer": "\n".join(steps) + "\n#### " + ans}, 0)
        except BadRow:
            pass
        else:
            float(r.answer)


@PROP
@given(q=pieces, eqs=st.lists(pieces, max_size=4), ans=numbers, cut=st.integers(0, 200), junk=pieces)
def test_property_parse_gsm8k_aug(q, eqs, ans, cut, junk):
    line = q + "||" + " ".join(f"<<{e}>>" for e in eqs) + " #### " + ans
    _check(parse_gsm8k_aug, line)
    _check(parse_gsm8k_aug, line[:cut])
    _check(parse_gsm8k_aug, junk)
    _check(parse_gsm8k_aug, None)


@PROP
@given(q=_values, steps=_values, ans=_values,
       row=st.dictionaries(st.sampled_from(["question", "steps", "answer", "x"]), _values, max_size=4))
def test_property_parse_coconut_json(q, steps, ans, row):
    _check(parse_coconut_json, {"question": q, "steps": steps, "answer": ans})
    _check(parse_coconut_json, row)
    _check(parse_coconut_json, [q])
