"""The GRPO update against the golden values recorded before the one-job-per-file refactor.

``tests/fixtures/golden_grpo.pt`` holds, for each setting of ``tests/golden.py`` (each aggregation,
beta > 0, mu = 2, micro-batching, dynamic sampling, std advantages), every gradient handed to the
optimiser, every logged scalar and the final weights of a two-step GRPO fit. On the machine that
recorded them the refactored code reproduces them bit for bit (``python tests/golden.py compare``);
here a tolerance keeps the test meaningful on other CPUs (other kernels, other summation orders).
"""
from __future__ import annotations


import pytest
import torch

import golden
from conftest import FIXTURES

FIXTURE = FIXTURES / "golden_grpo.pt"


@pytest.fixture(scope="module")
def recorded():
    return torch.load(FIXTURE, weights_only=False)


@pytest.mark.parametrize("setting", list(golden.SETTINGS))
def test_grpo_update_matches_the_golden_values(setting, recorded, tmp_path):
    torch.set_num_threads(1)
    want, got = recorded[setting], golden.run_setting(setting, str(tmp_path))
    assert len(got["grads"]) == len(want["grads"])
    for gw, gg in zip(want["grads"], got["grads"]):
        assert gw.keys() == gg.keys()
        for k in gw:
            torch.testing.assert_close(gg[k], gw[k], rtol=1e-4, atol=1e-6, msg=f"{setting}: gradient {k}")
    for mw, mg in zip(want["metrics"], got["metrics"]):
        for k, v in mw.items():  # metrics added since the recording are not compared
            assert mg[k] == pytest.approx(v, rel=1e-4, abs=1e-6, nan_ok=True), f"{setting}: {k}"
    for k, v in want["weights"].items():
        torch.testing.assert_close(got["weights"][k], v, rtol=1e-4, atol=1e-6, msg=f"{setting}: weight {k}")
