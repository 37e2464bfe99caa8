"""Evaluation metrics (docs/design.md#evaluation and #protocol).

* :func:`pass_at_k`: the unbiased pass@k estimator of Chen et al. 2021 (Codex paper).
* :func:`majority_vote`: maj@k by vote over k sampled answers; ties go to the answer seen first.
* torchmetrics ``Metric`` classes whose states are sums (``dist_reduce_fx="sum"``), so the value
  computed after a DDP sync is exactly the value over the union of all ranks' data.
* :func:`mean_and_ci95`: the 95% t-interval of a mean (scipy's t quantile :func:`t975`), the interval
  every reported mean carries; :func:`binomial_ci95`: its normal-approximation special case for a
  proportion known only as (p, n), as in ``summary.json``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_latent.answers import answer_key, answers_equal

__all__ = [
    "ExactMatchAccuracy",
    "MajorityAtK",
    "PassAtK",
    "binomial_ci95",
    "majority_vote",
    "mean_and_ci95",
    "pass_at_k",
    "pass_at_k_table",
    "t975",
]


# --------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples of which c are correct (Chen et al. 2021).

    ``pass@k = 1 - C(n - c, k) / C(n, k)``, computed in the numerically stable product form
    ``1 - prod_{i = n-c+1}^{n} (1 - k / i)`` (no huge binomials). When ``n - c < k`` every size-k
    subset contains a correct sample, so the estimate is exactly 1.0.

    Raises ValueError for negative arguments, ``k < 1`` (pass@0 is meaningless), ``k > n`` (the
    estimator needs at least k samples) or ``c > n``.
    """
    if n < 0 or c < 0 or k < 0:
        raise ValueError(f"pass_at_k arguments must be non-negative, got n={n}, c={c}, k={k}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n:
        raise ValueError(f"k={k} exceeds the number of samples n={n}")
    if c > n:
        raise ValueError(f"c={c} exceeds the number of samples n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k_table(n: int, k: int) -> Tensor:
    """float64 tensor ``[n + 1]`` with ``pass_at_k(n, c, k)`` at index c: vectorises the estimator
    over a batch of problems by indexing with per-problem correct counts."""
    return torch.tensor([pass_at_k(n, c, k) for c in range(n + 1)], dtype=torch.float64)


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent non-None answer, or None when there is none.

    Answers are compared by a canonical key (:func:`~lightning_latent.answers.answer_key`), so
    ``"28"``, ``"28.0"`` and ``"$28"`` are one candidate; the returned string is that candidate's
    first occurrence. Ties go to the candidate that appeared FIRST (deterministic, docs/design.md#evaluation,
    and independent of hash order). A missing answer (None) is an abstention, not a vote.
    """
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for a in answers:
        key = answer_key(a)
        if key is None:
            continue
        if key not in counts:
            counts[key] = 0
            first[key] = a  # type: ignore[assignment]
        counts[key] += 1
    if not counts:
        return None
    best = max(counts.values())
    # dicts preserve insertion order: the first key reaching the max count appeared first.
    for key, cnt in counts.items():
        if cnt == best:
            return first[key]
    raise AssertionError("unreachable")


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (scipy), NaN for ``df < 1``.

    The multiplier of every 95% interval of a mean in this project: exact for any ``df`` (a hand-written
    table would have to round the ``df`` it lacks), and close to 1.96 only for large samples.
    """
    if df < 1:
        return float("nan")
    from scipy.stats import t  # imported here: scipy.stats is slow to import and only reports need it

    return float(t.ppf(0.975, df))


def mean_and_ci95(values: Tensor | Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval, ``t975(n - 1) * sd / sqrt(n)``.

    The ONE interval of a mean in the project: per-problem scores of one evaluation (0/1 correctness,
    per-problem pass@k, paired per-problem differences) and per-seed results across seeds alike. sd is
    the sample standard deviation (n - 1 denominator). The half-width is NaN for a single value (no
    spread can be estimated) so a one-value "interval" is never mistaken for certainty.
    """
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    n = v.numel()
    if n == 0:
        raise ValueError("mean_and_ci95 needs at least one value")
    mean = v.mean().item()
    if n == 1:
        return mean, float("nan")
    sd = v.std(unbiased=True).item()
    return mean, t975(n - 1) * sd / math.sqrt(n)


def mean_and_ci95_from_sums(n: int, total: float, total_sq: float) -> tuple[float, float]:
    """:func:`mean_and_ci95` from the count, sum and sum of squares of the values.

    Sums add up over ranks (one all-reduce), so a DDP evaluation whose ranks each hold a share of the
    problems gets the same interval as one process holding them all, without gathering the values.
    """
    if n < 1:
        raise ValueError("mean_and_ci95_from_sums needs n >= 1")
    mean = total / n
    if n == 1:
        return mean, float("nan")
    var = max(total_sq - n * mean * mean, 0.0) / (n - 1)
    return mean, t975(n - 1) * math.sqrt(var / n)


def paired_sums(before: Mapping[int, bool], after: Mapping[int, bool]) -> tuple[int, float, float]:
    """(n, sum, sum of squares) of the per-problem differences ``after - before`` over the problems both
    evaluations answered (keyed by problem id): the input of :func:`mean_and_ci95_from_sums` for a
    paired comparison of two checkpoints on the same problems."""
    common = [k for k in after if k in before]
    d = [float(after[k]) - float(before[k]) for k in common]
    return len(d), sum(d), sum(x * x for x in d)


def reward_trend(rewards: Sequence[float], frac: float = 0.2) -> dict[str, float | bool]:
    """Did the training reward rise? The mean over the last ``frac`` of the steps against the first's,
    with the standard error of the difference (each step's reward is one value; the two windows are
    independent samples): ``learns`` when the difference exceeds 2 standard errors.

    Half of the project's "learns" criterion for a GRPO recipe (the other half: greedy pass@1 above the
    start, paired per problem); a flat or falling curve is a finding to chase before any study.
    """
    r = [float(x) for x in rewards]
    w = max(2, int(round(frac * len(r))))
    if len(r) < 2 * w:
        raise ValueError(f"reward_trend needs at least {2 * w} steps, got {len(r)}")
    first, last = r[:w], r[-w:]
    m0, m1 = statistics.fmean(first), statistics.fmean(last)
    se = math.sqrt((statistics.variance(first, m0) + statistics.variance(last, m1)) / w)  # sample variances
    diff = m1 - m0
    return {"first": m0, "last": m1, "diff": diff, "se": se, "window": w, "learns": bool(diff > 2 * se)}


Z975 = 1.96
"""The normal 0.975 quantile as conventionally rounded (scipy: 1.95996...), used by :func:`binomial_ci95`."""


def binomial_ci95(p: float, n: int) -> float:
    """Half-width of the 95% normal-approximation (Wald) interval of an accuracy p over n problems:
    ``1.96 * sqrt(p (1 - p) / n)``.

    The documented special case of :func:`mean_and_ci95` for a proportion: the same mean's interval with
    the population sd ``sqrt(p (1 - p))`` of the n 0/1 scores and the large-n limit 1.96 of ``t975``
    (headline evaluations have hundreds of problems, where t975 is 1.96 to two decimals). It needs
    only (p, n), which is what ``summary.json`` keeps per phase, and it stays the interval that file
    has always reported.
    """
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    return Z975 * math.sqrt(p * (1.0 - p) / n)


# --------------------------------------------------------------------------------------------------
# torchmetrics
# --------------------------------------------------------------------------------------------------


class ExactMatchAccuracy(Metric):
    """Fraction of predictions equal to the gold answer (:func:`answers_equal`).

    States ``correct`` and ``n`` are summed across ranks, so the synced value is the global
    accuracy whatever the per-rank split (no mean of means). ``update(preds, golds)`` takes the
    extracted answers (None = no answer found, counted wrong).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: Tensor
    n: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("n", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str | None], golds: Sequence[str]) -> None:
        if len(preds) != len(golds):
            raise ValueError(f"preds and golds differ in length: {len(preds)} != {len(golds)}")
        self.correct += sum(answers_equal(p, g) for p, g in zip(preds, golds))
        self.n += len(preds)

    def compute(self) -> Tensor:
        return self.correct.double() / self.n.clamp(min=1).double()


class PassAtK(Metric):
    """Mean over problems of the unbiased pass@k estimate.

    ``update(correct)`` takes a bool tensor ``[B, n_samples]`` (per problem, which of its samples
    were correct; ``n_samples >= k``). States are the sum of per-problem estimates and the problem
    count, both summed across ranks.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    total: Tensor
    count: Tensor

    def __init__(self, k: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self._tables: dict[int, Tensor] = {}
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, correct: Tensor) -> None:
        if correct.dim() != 2:
            raise ValueError(f"correct must have shape [B, n_samples], got {tuple(correct.shape)}")
        n = correct.shape[1]
        if n < self.k:
            raise ValueError(f"pass@{self.k} needs at least {self.k} samples per problem, got {n}")
        if n not in self._tables:
            self._tables[n] = pass_at_k_table(n, self.k)
        c = correct.bool().sum(dim=1).cpu()
        est = self._tables[n][c]
        self.total += est.sum().to(self.total.device, self.total.dtype)
        self.count += correct.shape[0]

    def compute(self) -> Tensor:
        return self.total / self.count.clamp(min=1).to(self.total.dtype)


class MajorityAtK(Metric):
    """Fraction of problems whose majority-vote answer (:func:`majority_vote`) is correct.

    ``update(answers, golds)``: ``answers[i]`` is the list of sampled answers for problem i. With
    ``k`` set, only the first k answers of each problem vote (so one set of rollouts can report
    several maj@k); a problem with fewer than k answers raises ValueError.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: Tensor
    n: Tensor

    def __init__(self, k: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if k is not None and k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("n", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, answers: Sequence[Sequence[str | None]], golds: Sequence[str]) -> None:
        if len(answers) != len(golds):
            raise ValueError(f"answers and golds differ in length: {len(answers)} != {len(golds)}")
        hits = 0
        for votes, gold in zip(answers, golds):
            if self.k is not None:
                if len(votes) < self.k:
                    raise ValueError(f"maj@{self.k} needs {self.k} answers, got {len(votes)}")
                votes = votes[: self.k]
            hits += answers_equal(majority_vote(votes), gold)
        self.correct += hits
        self.n += len(golds)

    def compute(self) -> Tensor:
        return self.correct.double() / self.n.clamp(min=1).double()
