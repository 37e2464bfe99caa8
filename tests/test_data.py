"""Data layer: parsers, sources, the synthetic task and its tokenizer."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_latent.answers import normalize_answer
from lightning_latent.data.records import (
    BadRow,
    Record,
    SkipCounter,
    parse_coconut_json,
    parse_gsm8k,
    parse_gsm8k_aug,
    raise_or_count,
)
from lightning_latent.data.sources import (
    coconut_json_source,
    gsm8k_aug_source,
    gsm8k_source,
    split_for_rank,
    synthetic_source,
)
from lightning_latent.data.synthetic import (
    MAX_VALUE,
    TOKEN_PATTERN,
    SyntheticConfig,
    synthetic_record,
    synthetic_vocabulary,
)
from lightning_latent.data.tokenizer import build_word_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data")
GSM8K = SHARED / "gsm8k"
PROSQA = SHARED / "prosqa"
needs_gsm8k = pytest.mark.skipif(not (GSM8K / "test.jsonl").is_file(), reason="shared GSM8K copy absent")
needs_prosqa = pytest.mark.skipif(not (PROSQA / "valid.json").is_file(), reason="shared ProsQA copy absent")


# ------------------------------------------------------------------------------------------------
# normalize_answer


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


@needs_gsm8k
def test_gsm8k_local_all_rows_parse():
    counter = SkipCounter()
    test = list(gsm8k_source("test", path=GSM8K, counter=counter, strict=True))
    assert len(test) == 1319
    for row in test:
        float(row["answer"])
        assert row["steps"] and all(s.strip() == s and s for s in row["steps"])
    assert [r["idx"] for r in test] == list(range(1319))
    train = list(gsm8k_source("train", path=GSM8K, val_size=0, counter=counter, strict=True))
    assert len(train) == 7473
    assert all(float(r["answer"]) == float(r["answer"]) and r["steps"] for r in train)
    assert counter.total == 0
    # calculator annotations are kept verbatim
    assert any("<<" in s and ">>" in s for s in test[0]["steps"])


@needs_gsm8k
def test_gsm8k_local_validation_is_tail_of_train():
    train = list(gsm8k_source("train", path=GSM8K, val_size=500))
    val = list(gsm8k_source("validation", path=GSM8K, val_size=500))
    assert len(train) == 7473 - 500 and len(val) == 500
    assert [r["idx"] for r in val] == list(range(7473 - 500, 7473))
    assert {r["idx"] for r in train}.isdisjoint({r["idx"] for r in val})


@needs_gsm8k
def test_gsm8k_hub_layout_local_folder(tmp_path):
    pd = pytest.importorskip("pandas")
    root = tmp_path / "gsm8k"
    (root / "main").mkdir(parents=True)
    for split in ("train", "test"):
        df = pd.read_json(GSM8K / f"{split}.jsonl", lines=True)
        df.to_parquet(root / "main" / f"{split}-00000-of-00001.parquet", index=False)
    val_size = 300
    train = list(gsm8k_source("train", hub_name=str(root), config="main", val_size=val_size))
    val = list(gsm8k_source("validation", hub_name=str(root), config="main", val_size=val_size))
    test = list(gsm8k_source("test", hub_name=str(root), config="main"))
    assert len(train) == 7473 - val_size and len(val) == val_size and len(test) == 1319
    assert {r["idx"] for r in train}.isdisjoint({r["idx"] for r in val})
    assert sorted(r["idx"] for r in train + val) == list(range(7473))
    # same rows as the JSONL reader
    local_val = list(gsm8k_source("validation", path=GSM8K, val_size=val_size))
    assert val == local_val


def _write_gsm8k_with_bad_rows(tmp_path: Path) -> Path:
    rows = [
        json.dumps({"question": "ok 1", "answer": "1+1=<<1+1=2>>2\n#### 2"}),
        json.dumps({"question": "no answer field"}),
        "",  # blank line: ignored, not a bad row
        json.dumps({"question": "no marker", "answer": "1+1=2"}),
        "{not json",
        json.dumps({"question": "ok 2", "answer": "#### 1,000"}),
    ]
    d = tmp_path / "gsm"
    d.mkdir()
    (d / "train.jsonl").write_text("\n".join(rows) + "\n")
    (d / "test.jsonl").write_text("\n".join(rows) + "\n")
    return d


def test_gsm8k_bad_rows_skipped_and_counted(tmp_path, caplog):
    d = _write_gsm8k_with_bad_rows(tmp_path)
    counter = SkipCounter()
    with caplog.at_level(logging.DEBUG, logger="lightning_latent.data"):
        rows = list(gsm8k_source("test", path=d, counter=counter))
    assert [r["question"] for r in rows] == ["ok 1", "ok 2"]
    assert rows[1]["answer"] == "1000" and rows[1]["idx"] == 4
    assert counter.total == 3
    assert counter.as_dict() == {
        "gsm8k/test/missing_field": 1,
        "gsm8k/test/no_answer": 1,
        "gsm8k/test/unparsable": 1,
    }
    assert any(r.levelno == logging.WARNING and "skipped 3" in r.getMessage() for r in caplog.records)
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) >= 3


def test_gsm8k_strict_names_file_and_line(tmp_path):
    d = _write_gsm8k_with_bad_rows(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"{d / 'test.jsonl'}:2") + ".*missing_field"):
        list(gsm8k_source("test", path=d, strict=True))


def test_missing_local_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        gsm8k_source("train", path=tmp_path)
    with pytest.raises(FileNotFoundError, match="nope"):
        gsm8k_aug_source("train", tmp_path / "nope")


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


def test_gsm8k_aug_source(tmp_path):
    lines = [
        "A has 2. B has 3. Total?||<<2+3=5>> #### 5",
        "garbage line without separators",
        "",
        "C has 4, doubles. How many?||<<4*2=8>> #### 8",
    ]
    for name in ("train", "valid", "test"):
        (tmp_path / f"{name}.txt").write_text("\n".join(lines) + "\n")
    counter = SkipCounter()
    for split in ("train", "validation", "test"):
        rows = list(gsm8k_aug_source(split, tmp_path, counter=counter))
        assert [r["answer"] for r in rows] == ["5", "8"]
        assert rows[1]["steps"] == ["<<4*2=8>>"] and rows[1]["idx"] == 2
    assert counter.as_dict() == {
        "gsm8k_aug/train/unparsable": 1,
        "gsm8k_aug/validation/unparsable": 1,
        "gsm8k_aug/test/unparsable": 1,
    }
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'test.txt'}:2") + ".*unparsable"):
        list(gsm8k_aug_source("test", tmp_path, strict=True))
    # a single file for the split
    assert len(list(gsm8k_aug_source("test", tmp_path / "test.txt"))) == 2


# ------------------------------------------------------------------------------------------------
# Coconut JSON


@needs_prosqa
def test_prosqa_coconut_json():
    counter = SkipCounter()
    val = list(coconut_json_source("validation", PROSQA, counter=counter, strict=True))
    test = list(coconut_json_source("test", PROSQA, counter=counter, strict=True))
    assert len(val) == 300 and len(test) == 500 and counter.total == 0
    raw = json.loads((PROSQA / "valid.json").read_text())
    for row, orig in zip(val, raw):
        assert row["question"] == orig["question"].strip()
        assert row["answer"] == orig["answer"].strip()
        assert row["steps"] == [s.strip() for s in orig["steps"]]
    assert all(r["answer"].endswith(".") for r in val)  # text answers keep their period
    with pytest.raises(FileNotFoundError, match=re.escape(str(PROSQA / "train.json"))):
        coconut_json_source("train", PROSQA)


def test_coconut_json_bad_rows(tmp_path):
    rows = [
        {"question": "q1", "steps": ["a", "b"], "answer": "A."},
        {"question": "q2", "answer": "A."},
        {"question": "q3", "steps": "a", "answer": "A."},
        {"question": "q4", "steps": ["a", " "], "answer": "A."},
        {"question": "q5", "steps": [], "answer": "1,000"},
    ]
    (tmp_path / "prosqa_train.json").write_text(json.dumps(rows))
    counter = SkipCounter()
    out = list(coconut_json_source("train", tmp_path, counter=counter))
    assert [r["question"] for r in out] == ["q1", "q5"]
    assert out[1]["steps"] == [] and out[1]["answer"] == "1000" and out[1]["idx"] == 4
    assert counter.as_dict() == {
        "coconut_json/train/bad_type": 1,
        "coconut_json/train/empty_step": 1,
        "coconut_json/train/missing_field": 1,
    }
    with pytest.raises(ValueError, match="prosqa_train.json row 1: missing_field"):
        list(coconut_json_source("train", tmp_path, strict=True))


def test_raise_or_count():
    c = SkipCounter()
    raise_or_count(c, False, "src", "f:1", BadRow("no_answer"))
    assert c.total == 1 and c.count("src", "no_answer") == 1
    with pytest.raises(ValueError, match=r"^src: bad row at f:2: no_answer$"):
        raise_or_count(c, True, "src", "f:2", BadRow("no_answer"))


# ------------------------------------------------------------------------------------------------
# Synthetic


_STEP_RE = re.compile(r"<<(\d+)([+\-*])(\d+)=(\d+)>>")


def test_synthetic_purity():
    cfg = SyntheticConfig(seed=3)
    for split in ("train", "validation", "test"):
        for i in (0, 1, 57):
            assert synthetic_record(cfg, split, i) == synthetic_record(SyntheticConfig(seed=3), split, i)
    a = [synthetic_record(SyntheticConfig(seed=0), "train", i) for i in range(20)]
    b = [synthetic_record(SyntheticConfig(seed=1), "train", i) for i in range(20)]
    assert a != b
    assert len({r.question for r in a}) > 15


def test_synthetic_splits_disjoint_and_correct():
    cfg = SyntheticConfig(min_steps=2, max_steps=4)
    seen = {}
    for split in ("train", "validation", "test"):
        recs = [synthetic_record(cfg, split, i) for i in range(3000)]
        seen[split] = {r.question for r in recs}
        for r in recs:
            assert 2 <= len(r.steps) <= 4
            prev = None
            for step in r.steps:
                m = _STEP_RE.fullmatch(step)
                assert m, step
                a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
                assert c == {"+": a + b, "-": a - b, "*": a * b}[op]
                assert 0 <= c <= MAX_VALUE and (op != "*" or 2 <= b <= 4)
                assert prev is None or a == prev
                prev = c
            assert r.answer == str(prev)
            assert r.question.split(".")[0].split()[-2] == _STEP_RE.fullmatch(r.steps[0])[1]
    assert seen["train"].isdisjoint(seen["validation"])
    assert seen["train"].isdisjoint(seen["test"])
    assert seen["validation"].isdisjoint(seen["test"])
    # disjoint across seeds too: the split depends on the problem, not the seed
    other = {synthetic_record(SyntheticConfig(seed=9, min_steps=2, max_steps=4), "test", i).question for i in range(500)}
    assert other.isdisjoint(seen["train"])


def test_synthetic_source_sizes_and_rank_split():
    cfg = SyntheticConfig(seed=1)
    val = list(synthetic_source("validation", cfg, size=10))
    assert [r["idx"] for r in val] == list(range(10))
    assert val[3]["question"] == synthetic_record(cfg, "validation", 3).question
    assert len(list(synthetic_source("test", cfg))) == 500
    train = iter(synthetic_source("train", cfg))
    assert [next(train)["idx"] for _ in range(1200)][-1] == 1199  # endless
    parts = [list(split_for_rank(synthetic_source("test", cfg, size=11), r, 2)) for r in range(2)]
    assert sorted(r["idx"] for p in parts for r in p) == list(range(11))
    assert {len(p) for p in parts} == {5, 6}


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


# ------------------------------------------------------------------------------------------------
# Property tests: parsers return a Record or raise BadRow, nothing else


_numbers = st.one_of(
    st.integers(min_value=-(10**40), max_value=10**40).map(str),
    st.integers(min_value=-(10**12), max_value=10**12).map(lambda n: f"{n:,}"),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.decimals(allow_nan=False, allow_infinity=False).map(str),
)
_texty = st.one_of(st.text(), _numbers, st.sampled_from(["", " ", "####", "||", "<<", ">>", "\n", "$", ","]))
_pieces = st.lists(_texty, max_size=8).map("".join)
_values = st.one_of(st.none(), st.integers(), st.floats(), _pieces, st.lists(_pieces, max_size=4), st.text())
_PROP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


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


@_PROP
@given(q=_values, steps=st.lists(_pieces, max_size=4), ans=_numbers, tail=_pieces, cut=st.integers(0, 200),
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


@_PROP
@given(q=_pieces, eqs=st.lists(_pieces, max_size=4), ans=_numbers, cut=st.integers(0, 200), junk=_pieces)
def test_property_parse_gsm8k_aug(q, eqs, ans, cut, junk):
    line = q + "||" + " ".join(f"<<{e}>>" for e in eqs) + " #### " + ans
    _check(parse_gsm8k_aug, line)
    _check(parse_gsm8k_aug, line[:cut])
    _check(parse_gsm8k_aug, junk)
    _check(parse_gsm8k_aug, None)


@_PROP
@given(q=_values, steps=_values, ans=_values,
       row=st.dictionaries(st.sampled_from(["question", "steps", "answer", "x"]), _values, max_size=4))
def test_property_parse_coconut_json(q, steps, ans, row):
    _check(parse_coconut_json, {"question": q, "steps": steps, "answer": ans})
    _check(parse_coconut_json, row)
    _check(parse_coconut_json, [q])


@_PROP
@given(text=st.one_of(_pieces, _numbers, st.text()))
def test_property_normalize_answer(text):
    out = normalize_answer(text)
    assert isinstance(out, str)
    assert normalize_answer(out) == out or out == text.strip()
    if re.fullmatch(r"\s*\$?\s*[+-]?\d+(\.\d+)?\s*", text):
        assert float(out) == float(text.replace("$", ""))
        assert out == normalize_answer(out)
