"""lightning_latent/evaluation.py: the Evaluator (greedy answers with the perturbation off, k sampled answers),
the metrics and per-problem prediction rows it fills, ``count_correct`` and the settings' checks."""
from __future__ import annotations

import pytest

from lightning_latent.data.layout import CurriculumConfig, Layout
from lightning_latent.evaluation import EvalConfig, EvalMetrics, Evaluator, count_correct, prediction_rows
from lightning_latent.model.perturb import PerturbConfig, Perturber
from lightning_latent.rl.rewards import answers_equal, exact_match_reward, extract_answer

K = 3


@pytest.fixture()
def evaluator(make_latent_lm, word_tokenizer):
    model = make_latent_lm(seed=1)
    layout = Layout(word_tokenizer, CurriculumConfig(c_thought=2, max_latent_stage=3))
    pert = Perturber(model.lm, PerturbConfig(arm="dropout_shared", p=0.2))
    return Evaluator(model, layout, word_tokenizer, EvalConfig(max_new_tokens=6, k=K), pert, exact_match_reward, 0)


def test_evaluate_fills_the_metrics_and_the_prediction_rows(evaluator, synth_records):
    recs = synth_records[:4]
    metrics, rows = EvalMetrics(K), []
    evaluator.evaluate(recs, 1, False, metrics, rows)
    assert [r["idx"] for r in rows] == [r.idx for r in recs] and [r["gold"] for r in rows] == [r.answer for r in recs]
    preds, texts = evaluator.answer(recs, 1, False)  # greedy with the perturbation off: the same again
    assert [r["prediction"] for r in rows] == preds and [r["text"] for r in rows] == texts
    assert all(r["prediction"] == extract_answer(r["text"]) for r in rows)
    assert all(len(r["samples"]) == K for r in rows)
    out = metrics.compute_and_reset("val", "coconut")
    correct = [answers_equal(r["prediction"], r["gold"]) for r in rows]
    assert [r["correct"] for r in rows] == correct
    assert float(out["val/pass@1"]) == pytest.approx(sum(correct) / 4) and out["val/n"] == 4.0
    assert float(out["val/coconut/pass@1"]) == float(out["val/pass@1"])
    assert f"val/pass@{K}" in out and f"val/maj@{K}" in out
    # the seeds of the k samples are the run's, offset: sampling twice gives the same answers
    assert evaluator.sample(recs, 1, K) == [r["samples"] for r in rows]


def test_evaluate_counts_right_answers(evaluator, synth_records, monkeypatch):
    """With known answers (two of four right; the third written as ``$`` and commas of the gold), pass@1 is 1/2
    and the rows say which; the metrics reset after ``compute_and_reset``."""
    recs = synth_records[:4]
    preds = [recs[0].answer, "-1", f"${recs[2].answer}.0", None]  # synthetic answers are >= 0
    monkeypatch.setattr(evaluator, "answer", lambda records, stage, cot: (preds[:len(records)], ["t"] * len(records)))
    monkeypatch.setattr(evaluator, "sample", lambda records, stage, k: [[r.answer] * k for r in records])
    metrics, rows = EvalMetrics(K), []
    evaluator.evaluate(recs, 1, False, metrics, rows)
    want = [True, False, True, False]
    assert [r["correct"] for r in rows] == want
    out = metrics.compute_and_reset("test", "cot")
    assert float(out["test/pass@1"]) == pytest.approx(sum(want) / 4)
    assert float(out[f"test/pass@{K}"]) == 1.0 and float(out[f"test/maj@{K}"]) == 1.0  # every sample right
    assert out["test/n"] == 4.0 and out["test/se"] == pytest.approx((0.5 * 0.5 / 4) ** 0.5)
    evaluator.evaluate(recs[:1], 1, False, metrics)
    assert metrics.compute_and_reset("test", "cot")["test/n"] == 1.0  # reset: only the new batch


def test_count_correct_batches_and_records_each_problem(evaluator, synth_records):
    recs = synth_records[:5]
    sizes, per = [], {}
    correct, n = count_correct(evaluator, recs, 1, False, 2, "cpu", on_batch=sizes.append, per_problem=per)
    preds, _ = evaluator.answer(recs, 1, False)
    assert sizes == [2, 2, 1] and n == 5
    assert per == {r.idx: answers_equal(p, r.answer) for r, p in zip(recs, preds)} and correct == sum(per.values())


def test_prediction_rows_without_correctness():
    from lightning_latent.data.records import Record

    rows = prediction_rows([Record("q", (), "5", 3)], ["5"], ["### 5"], with_correct=False)
    assert rows == [{"idx": 3, "question": "q", "gold": "5", "prediction": "5", "text": "### 5"}]


@pytest.mark.parametrize("kw, key", [
    ({"max_new_tokens": 0}, "evaluation.max_new_tokens=0"),
    ({"k": -1}, "evaluation.k=-1"),
    ({"temperature": -0.5}, "evaluation.temperature=-0.5"),
])
def test_eval_config_refuses_bad_values(kw, key):
    with pytest.raises(ValueError, match=key):
        EvalConfig(**kw)


def test_eval_config_perturb_from_a_dict():
    cfg = EvalConfig(perturb={"arm": "gaussian", "noise_scale": 0.5})
    assert isinstance(cfg.perturb, PerturbConfig) and cfg.perturb.arm == "gaussian"
    assert EvalConfig().max_new_tokens == 48 and EvalConfig().k == 0


def test_an_evaluator_refuses_an_unresolved_temperature(evaluator):
    """evaluation.temperature null means the arm's own rollout temperature, which the module resolves; an
    Evaluator built with it unresolved would sample with None."""
    from dataclasses import replace

    from lightning_latent.evaluation import Evaluator

    with pytest.raises(ValueError, match="evaluation.temperature is null"):
        Evaluator(evaluator.model, evaluator.layout, evaluator.tokenizer, replace(evaluator.cfg, temperature=None),
                  evaluator.perturber, evaluator.reward_fn, 0)
