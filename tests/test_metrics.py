"""lightning_latent/metrics.py: pass@k, maj@k, intervals, reward trends and the torchmetrics classes (their
2-process gloo DDP sync: tests/integration/test_ddp_metrics.py)."""

from __future__ import annotations

import math
from math import comb

import pytest
import torch

from lightning_latent.metrics import (
    ExactMatchAccuracy,
    MajorityAtK,
    PassAtK,
    binomial_ci95,
    majority_vote,
    mean_and_ci95,
    pass_at_k,
    t975,
)

# --------------------------------------------------------------------------------------------------
# pass@k
# --------------------------------------------------------------------------------------------------


def test_pass_at_k_hand_values() -> None:
    # k = 1 reduces to c / n
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    # k = 2: 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    # n - c < k: any 4 of 5 samples include one of the 2 correct ones
    assert pass_at_k(5, 2, 4) == 1.0
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 5, 5) == 1.0
    assert pass_at_k(5, 0, 5) == 0.0


def test_pass_at_k_matches_binomial_form() -> None:
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1.0 if n - c < k else 1 - comb(n - c, k) / comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    # large n stays finite and in [0, 1] where the binomial form would overflow a float
    v = pass_at_k(2000, 3, 100)
    assert 0.0 < v < 1.0


@pytest.mark.parametrize("n, c, k", [(3, 1, 4), (3, 4, 1), (-1, 0, 1), (3, -1, 1), (3, 1, -1), (3, 1, 0)])
def test_pass_at_k_invalid(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


# --------------------------------------------------------------------------------------------------
# majority vote
# --------------------------------------------------------------------------------------------------


def test_majority_vote() -> None:
    assert majority_vote(["3", "5", "5", "3", "7"]) == "3"  # 2-2 tie: "3" appeared first
    assert majority_vote(["5", "3", "5", "3"]) == "5"
    assert majority_vote(["7", "28", "28.0", "$28", "7"]) == "28"  # numeric canonical key
    assert majority_vote([None, None, "4"]) == "4"  # None abstains, never wins
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None
    assert majority_vote(["a", None, "b", None, "b"]) == "b"


# --------------------------------------------------------------------------------------------------
# intervals
# --------------------------------------------------------------------------------------------------


def test_intervals() -> None:
    values = [1.0, 0.0, 1.0, 1.0]
    mean, hw = mean_and_ci95(values)
    # sample sd of [1,0,1,1]: mean .75, squared deviations .0625*3 + .5625 = .75, /3 = .25 -> sd .5
    assert mean == pytest.approx(0.75)
    assert hw == pytest.approx(3.1824463 * 0.5 / 2)  # t quantile, df = 3
    m2, hw2 = mean_and_ci95(torch.tensor(values))
    assert (m2, hw2) == pytest.approx((mean, hw))
    assert math.isnan(mean_and_ci95([1.0])[1])
    with pytest.raises(ValueError):
        mean_and_ci95([])
    assert binomial_ci95(0.5, 100) == pytest.approx(1.96 * 0.05)  # summary.json's interval, unchanged
    assert binomial_ci95(0.0, 10) == 0.0
    with pytest.raises(ValueError):
        binomial_ci95(0.5, 0)


def test_t975_matches_the_printed_table() -> None:
    """scipy's quantiles agree to 3 decimals with the t-table the study used to carry (where it had df)."""
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
             10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}
    for df, q in table.items():
        assert round(t975(df), 3) == q
    assert math.isnan(t975(0))
    assert 1.96 < t975(10_000) < 1.961


# --------------------------------------------------------------------------------------------------
# torchmetrics
# --------------------------------------------------------------------------------------------------


def test_exact_match_accuracy() -> None:
    m = ExactMatchAccuracy()
    m.update(["28", "28.0", None], ["28", "28", "28"])
    m.update(["$1,000"], ["1000"])
    assert m.compute().item() == pytest.approx(0.75)
    assert m.n.item() == 4
    m.reset()
    m.update(["1"], ["2"])
    assert m.compute().item() == 0.0


def test_pass_at_k_metric() -> None:
    m = PassAtK(k=2)
    # problem 0: c=2 of 5 -> 0.7; problem 1: c=0 -> 0; problem 2: c=5 -> 1
    correct = torch.tensor(
        [[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool
    )
    m.update(correct[:2])
    m.update(correct[2:])
    assert m.compute().item() == pytest.approx((0.7 + 0.0 + 1.0) / 3)
    m1 = PassAtK(k=1)
    m1.update(correct)
    assert m1.compute().item() == pytest.approx((0.4 + 0 + 1) / 3)
    with pytest.raises(ValueError):
        PassAtK(k=6).update(correct)


def test_majority_at_k_metric() -> None:
    m = MajorityAtK()
    m.update([["3", "5", "5", "3"], ["28.0", "7", "28"], [None, None]], ["3", "28", "1"])
    # votes: "3" (tie, first seen) correct; "28.0" correct; None wrong
    assert m.compute().item() == pytest.approx(2 / 3)
    m2 = MajorityAtK(k=2)
    m2.update([["1", "2", "2", "2"]], ["2"])  # only the first 2 vote: tie -> "1" -> wrong
    assert m2.compute().item() == 0.0
    with pytest.raises(ValueError):
        m2.update([["1"]], ["1"])


def test_mean_and_ci95_from_sums_equals_the_direct_interval():
    from lightning_latent.metrics import mean_and_ci95, mean_and_ci95_from_sums

    v = torch.tensor([1.0, -1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    m, h = mean_and_ci95(v)
    m2, h2 = mean_and_ci95_from_sums(7, float(v.sum()), float((v * v).sum()))
    assert m2 == pytest.approx(m) and h2 == pytest.approx(h)
    with pytest.raises(ValueError, match="n >= 1"):
        mean_and_ci95_from_sums(0, 0.0, 0.0)


def test_reward_trend_needs_a_rise_beyond_two_standard_errors():
    from lightning_latent.metrics import reward_trend

    rising = [0.5, 0.52, 0.49, 0.51] + [0.6] * 12 + [0.70, 0.72, 0.69, 0.71]
    t = reward_trend(rising)
    assert t["window"] == 4 and t["first"] == pytest.approx(0.505) and t["last"] == pytest.approx(0.705)
    se = math.sqrt(2 * (sum((x - 0.505) ** 2 for x in rising[:4]) / 3) / 4)  # same spread in both windows
    assert t["se"] == pytest.approx(se) and t["learns"] is True
    noisy = [0.5, 0.9, 0.1, 0.5] + [0.6] * 12 + [0.9, 0.3, 0.7, 0.5]  # +0.1 but within 2 SE
    assert reward_trend(noisy)["learns"] is False
    assert reward_trend(list(reversed(rising)))["learns"] is False
    with pytest.raises(ValueError, match="at least 4 steps"):
        reward_trend([0.1, 0.2, 0.3])
