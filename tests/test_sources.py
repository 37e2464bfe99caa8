"""lightning_latent/data/sources.py: the GSM8K, GSM8K-Aug, Coconut JSON and synthetic streams: local files and
the hub layout, validation slices, bad rows skipped and counted (or strict), rank splits.

Real rows come from ``tests/fixtures`` (GSM8K: the first 300 train / 100 test rows; ProsQA: the first 100
validation / test records; see each folder's README.md)."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from lightning_latent.data.records import SkipCounter
from lightning_latent.data.sources import (
    coconut_json_source,
    gsm8k_aug_source,
    gsm8k_source,
    split_for_rank,
    synthetic_source,
)
from lightning_latent.data.synthetic import SyntheticConfig, synthetic_record

from conftest import GSM8K, PROSQA

N_TRAIN, N_TEST = 300, 100  # rows of the GSM8K fixture (of 7,473 and 1,319 in the full splits)
N_VALID_PROSQA, N_TEST_PROSQA = 100, 100  # records of the ProsQA fixture (of 300 and 500)


# ------------------------------------------------------------------------------------------------
# GSM8K


def test_gsm8k_local_all_rows_parse():
    counter = SkipCounter()
    test = list(gsm8k_source("test", path=GSM8K, counter=counter, strict=True))
    assert len(test) == N_TEST
    for row in test:
        float(row["answer"])
        assert row["steps"] and all(s.strip() == s and s for s in row["steps"])
    assert [r["idx"] for r in test] == list(range(N_TEST))
    train = list(gsm8k_source("train", path=GSM8K, val_size=0, counter=counter, strict=True))
    assert len(train) == N_TRAIN
    assert all(float(r["answer"]) == float(r["answer"]) and r["steps"] for r in train)
    assert counter.total == 0
    # calculator annotations are kept verbatim
    assert any("<<" in s and ">>" in s for s in test[0]["steps"])


def test_gsm8k_local_validation_is_tail_of_train():
    train = list(gsm8k_source("train", path=GSM8K, val_size=50))
    val = list(gsm8k_source("validation", path=GSM8K, val_size=50))
    assert len(train) == N_TRAIN - 50 and len(val) == 50
    assert [r["idx"] for r in val] == list(range(N_TRAIN - 50, N_TRAIN))
    assert {r["idx"] for r in train}.isdisjoint({r["idx"] for r in val})


def test_gsm8k_hub_layout_local_folder(tmp_path):
    import pandas as pd  # a dependency of the package (install_requires)
    root = tmp_path / "gsm8k"
    (root / "main").mkdir(parents=True)
    for split in ("train", "test"):
        df = pd.read_json(GSM8K / f"{split}.jsonl", lines=True)
        df.to_parquet(root / "main" / f"{split}-00000-of-00001.parquet", index=False)
    val_size = 60
    train = list(gsm8k_source("train", hub_name=str(root), config="main", val_size=val_size))
    val = list(gsm8k_source("validation", hub_name=str(root), config="main", val_size=val_size))
    test = list(gsm8k_source("test", hub_name=str(root), config="main"))
    assert len(train) == N_TRAIN - val_size and len(val) == val_size and len(test) == N_TEST
    assert {r["idx"] for r in train}.isdisjoint({r["idx"] for r in val})
    assert sorted(r["idx"] for r in train + val) == list(range(N_TRAIN))
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


def test_prosqa_coconut_json():
    counter = SkipCounter()
    val = list(coconut_json_source("validation", PROSQA, counter=counter, strict=True))
    test = list(coconut_json_source("test", PROSQA, counter=counter, strict=True))
    assert len(val) == N_VALID_PROSQA and len(test) == N_TEST_PROSQA and counter.total == 0
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


# ------------------------------------------------------------------------------------------------
# Synthetic


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
