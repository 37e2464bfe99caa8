"""Hypothesis strategies shared by the property tests of answers (test_answers.py) and records (test_records.py):
number-like strings in every format the parsers meet, and text pieces with the separators they split on."""
from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

numbers = st.one_of(
    st.integers(min_value=-(10**40), max_value=10**40).map(str),
    st.integers(min_value=-(10**12), max_value=10**12).map(lambda n: f"{n:,}"),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.decimals(allow_nan=False, allow_infinity=False).map(str),
)
texty = st.one_of(st.text(), numbers, st.sampled_from(["", " ", "####", "||", "<<", ">>", "\n", "$", ","]))
pieces = st.lists(texty, max_size=8).map("".join)
PROP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
