"""Evaluation: greedy answers with the perturbation off (the headline pass@1), k sampled, perturbed
answers per problem (pass@k, maj@k), and the per-problem prediction rows written after ``test``.

:class:`Evaluator` holds what answering needs (the latent LM, the layout, the tokenizer, the settings)
and no Lightning state, so the module's validation / test / predict steps, the phase-end evaluations
(:class:`~lightning_latent.callbacks.PhaseSummary`) and scripts all answer the same way.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .data.layout import Layout, collate_prompts
from .data.records import Record
from .metrics import ExactMatchAccuracy, MajorityAtK, PassAtK
from .model.latent_lm import LatentLM, generate
from .model.perturb import PerturbConfig, Perturber
from .distributed import all_sum
from .rl.rewards import RewardFn, answers_equal, extract_answer
from .rl.rollout import rollout, rollout_seed

#: Added to the run's seed for evaluation rollouts, so their seeds never equal a training rollout's.
EVAL_SEED_OFFSET = 7919


@dataclass
class EvalConfig:
    """Evaluation: greedy pass@1 with the perturbation off, plus pass@k / maj@k over ``k`` perturbed,
    sampled rollouts when ``k > 1``. ``perturb`` fixes the sampler of those k rollouts (None: the run's
    own), so that arms can be compared under one evaluation sampler. ``temperature`` None: the run's rollout
    answer temperature (greedy for the greedy arms), resolved by the module; with ``perturb`` None too, each
    arm samples under its own training noise."""

    max_new_tokens: int = 48
    k: int = 0
    temperature: float | None = 1.0
    perturb: PerturbConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.perturb, dict):
            self.perturb = PerturbConfig(**self.perturb)
        if self.max_new_tokens < 1:
            raise ValueError(f"evaluation.max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.k < 0:
            raise ValueError(f"evaluation.k={self.k} must be >= 0 (0 or 1: greedy pass@1 only)")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"evaluation.temperature={self.temperature} must be >= 0 (0 = greedy; null: the arm's own)")


class Evaluator:
    """Answers problems with a latent LM (see the module docstring)."""

    def __init__(self, model: LatentLM, layout: Layout, tokenizer, cfg: EvalConfig, perturber: Perturber,
                 reward_fn: RewardFn, seed: int):
        if cfg.temperature is None:
            raise ValueError("evaluation.temperature is null (the arm's own): resolve it to the rollout "
                             "temperature before building the Evaluator (LatentReasoner does)")
        self.model, self.layout, self.tokenizer, self.cfg = model, layout, tokenizer, cfg
        self.perturber, self.reward_fn, self.seed = perturber, reward_fn, seed

    @torch.no_grad()
    def answer(self, records: list[Record], stage: int, cot: bool) -> tuple[list[str | None], list[str]]:
        """Greedy answers with the perturbation off: (extracted answers, decoded texts)."""
        self.model.eval()
        dev = next(self.model.parameters()).device
        prompts = [self.layout.prompt(r, stage, cot) for r in records]
        pb = collate_prompts(prompts, self.layout.pad_id)
        try:
            gen = generate(self.model, pb["input_ids"].to(dev), pb["attention_mask"].to(dev),
                           self.cfg.max_new_tokens, self.layout.eos_id, self.layout.pad_id)
        except ValueError as err:  # generate checks the prompt length against the model: name the record
            longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
            raise ValueError(f"evaluation record {records[longest].idx} "
                             f"(evaluation.max_new_tokens={self.cfg.max_new_tokens}): {err}") from err
        texts = self.tokenizer.batch_decode([t[: int(m.sum())] for t, m in zip(gen.tokens.cpu(), gen.mask.cpu())])
        return [extract_answer(t) for t in texts], texts

    def evaluate(self, records: list[Record], stage: int, cot: bool, metrics: "EvalMetrics",
                 predictions: list[dict] | None = None) -> None:
        """One batch of a validation / test loop: greedy answers (and ``cfg.k`` sampled ones when
        ``k > 1``) into ``metrics``; per-problem rows appended to ``predictions`` when given."""
        preds, texts = self.answer(records, stage, cot)
        samples = self.sample(records, stage, self.cfg.k) if self.cfg.k > 1 else None
        metrics.update(preds, [r.answer for r in records], samples)
        if predictions is not None:
            predictions.extend(prediction_rows(records, preds, texts, samples))

    @torch.no_grad()
    def sample(self, records: list[Record], stage: int, k: int) -> list[list[str | None]]:
        """k perturbed, sampled rollouts per record (pass@k / maj@k), seeds independent of training."""
        seeds = torch.tensor([rollout_seed(self.seed + EVAL_SEED_OFFSET, -1, r.idx, j)
                              for r in records for j in range(k)])
        rb = rollout(self.model, self.perturber, self.layout, records, stage, seeds, k, self.cfg.temperature,
                     self.cfg.max_new_tokens, self.reward_fn, self.tokenizer)
        return [rb.answers[i * k:(i + 1) * k] for i in range(len(records))]


def count_correct(evaluator: Evaluator, records: list[Record], stage: int, cot: bool, batch_size: int,
                  device, on_batch: Callable[[int], None] | None = None,
                  per_problem: dict[int, bool] | None = None) -> tuple[int, int]:
    """(correct, n) of greedy answers over ``records`` in batches, summed over ranks (each rank holds
    its own share of the split). ``on_batch(size)`` after each batch: a progress display.
    ``per_problem``: filled with this rank's correctness per record id (paired comparisons)."""
    correct = n = 0
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        preds, _ = evaluator.answer(chunk, stage, cot)
        ok = [answers_equal(p, r.answer) for p, r in zip(preds, chunk)]
        if per_problem is not None:
            per_problem.update({r.idx: bool(c) for r, c in zip(chunk, ok)})
        correct += sum(ok)
        n += len(chunk)
        if on_batch is not None:
            on_batch(len(chunk))
    t = all_sum(torch.tensor([float(correct), float(n)], device=device))
    return int(t[0]), int(t[1])


def prediction_rows(records: list[Record], preds: list[str | None], texts: list[str],
                    samples: list[list[str | None]] | None = None, with_correct: bool = True) -> list[dict]:
    """One JSON-ready row per problem (``predictions_test.jsonl`` / ``predict``)."""
    rows = []
    for i, r in enumerate(records):
        row = {"idx": r.idx, "question": r.question, "gold": r.answer, "prediction": preds[i]}
        if with_correct:
            row["correct"] = answers_equal(preds[i], r.answer)
        row["text"] = texts[i]
        if samples is not None:
            row["samples"] = samples[i]
        rows.append(row)
    return rows


class EvalMetrics(torch.nn.Module):
    """Greedy pass@1 (and pass@k / maj@k over k sampled answers when ``k > 1``) of one split, as
    torchmetrics (a module, so that Lightning moves and syncs their state)."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k
        self.acc = ExactMatchAccuracy()
        self.pass_k, self.maj_k = (PassAtK(k), MajorityAtK(k)) if k > 1 else (None, None)

    def update(self, preds: list[str | None], golds: list[str], samples: list[list[str | None]] | None) -> None:
        self.acc.update(preds, golds)
        if self.pass_k is not None and samples is not None:
            self.pass_k.update(torch.tensor([[answers_equal(a, g) for a in s] for s, g in zip(samples, golds)]))
            self.maj_k.update(samples, golds)

    def compute_and_reset(self, prefix: str, phase: str) -> dict[str, Tensor | float]:
        """``{prefix}/pass@1``, its per-phase copy, the size n and the standard error (+ pass@k, maj@k)."""
        value = self.acc.compute()
        with self.acc.sync_context():
            n = int(self.acc.n)
        out = {f"{prefix}/pass@1": value, f"{prefix}/{phase}/pass@1": value, f"{prefix}/n": float(n),
               f"{prefix}/se": math.sqrt(max(float(value) * (1 - float(value)), 0.0) / max(n, 1))}
        self.acc.reset()
        if self.pass_k is not None:
            out[f"{prefix}/pass@{self.k}"] = self.pass_k.compute()
            out[f"{prefix}/maj@{self.k}"] = self.maj_k.compute()
            self.pass_k.reset()
            self.maj_k.reset()
        return out
