"""lightning_latent/data/synthetic.py: the synthetic task: pure records, disjoint and correct splits."""
from __future__ import annotations

import re

from lightning_latent.data.synthetic import MAX_VALUE, SyntheticConfig, synthetic_record


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
