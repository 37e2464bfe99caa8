"""Prompts x K perturbed rollouts in one batch, and the replay of their log-probs.

Flow: records -> prompts at the rollout stage -> B*K rows (row = b*K + k) -> one batched
:func:`~lightning_latent.model.latent_lm.generate` under the rows' perturbations -> rewards. The update
later calls :func:`replay_logprobs` with the same seeds, so the same masks are rebuilt.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from ..data.layout import Layout, collate_prompts
from ..data.records import Record
from ..model.latent_lm import LatentLM, generate, positions_from_mask
from ..model.perturb import Perturber
from .loss import group_stats, sequence_logprobs, token_entropy
from .rewards import RewardFn, answer_key, extract_answer


#: ``rollout_seed``'s ``k`` for the mask a supervised sequence trains under (``perturb.p_train``); a step's
#: rollouts use k = 0 .. K-1, so a training mask is never a rollout's.
TRAINING_MASK_K = -1


def rollout_seed(base_seed: int, iteration: int, record_key: int, k: int) -> int:
    """A 63-bit seed, a pure function of (run seed, iteration, the prompt's global position, k).

    It does not depend on the rank or on which rows share the batch, so rollouts replay anywhere."""
    h = hashlib.blake2b(f"{base_seed}/{iteration}/{record_key}/{k}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


@dataclass
class RolloutBatch:
    prompt_ids: Tensor  # [N, Tp] left-padded
    prompt_mask: Tensor  # [N, Tp]
    seeds: Tensor  # [N]
    tokens: Tensor  # [N, L]
    logprobs: Tensor  # [N, L] rollout-time log-probs
    mask: Tensor  # [N, L]
    rewards: Tensor  # [B, K]
    answers: list[str | None]  # extracted per row
    golds: list[str]  # per prompt
    final_thought: Tensor | None  # [N, D]
    truncated: Tensor | None = None  # [N] bool: the answer hit max_new_tokens without its EOS

    @property
    def group_size(self) -> int:
        return self.rewards.shape[1]

    def rows(self, start: int, stop: int) -> "RolloutBatch":
        """Rows ``start:stop`` (a micro-batch for the update; ``rewards`` / ``golds`` stay whole, the
        replay does not use them)."""
        sl = lambda t: None if t is None else t[start:stop]  # noqa: E731
        return RolloutBatch(sl(self.prompt_ids), sl(self.prompt_mask), sl(self.seeds), sl(self.tokens),
                            sl(self.logprobs), sl(self.mask), self.rewards, self.answers[start:stop], self.golds,
                            sl(self.final_thought), sl(self.truncated))

    def select_groups(self, keep: Tensor) -> "RolloutBatch":
        """The rollouts of the groups where ``keep`` [B] is True (dynamic sampling)."""
        k = self.group_size
        rows = keep.repeat_interleave(k)
        idx = rows.nonzero().flatten()
        sel = lambda t: None if t is None else t[idx.to(t.device)]  # noqa: E731
        return RolloutBatch(
            sel(self.prompt_ids), sel(self.prompt_mask), sel(self.seeds), sel(self.tokens), sel(self.logprobs),
            sel(self.mask), self.rewards[keep], [self.answers[i] for i in idx.tolist()],
            [g for g, kp in zip(self.golds, keep.tolist()) if kp], sel(self.final_thought), sel(self.truncated),
        )


@torch.no_grad()
def rollout(
    model: LatentLM,
    perturber: Perturber | None,
    layout: Layout,
    records: list[Record],
    stage: int,
    seeds: Tensor,
    group_size: int,
    temperature: float,
    max_new_tokens: int,
    reward_fn: RewardFn,
    tokenizer,
    cot: bool = False,
) -> RolloutBatch:
    """B records -> B*K rollouts with per-row perturbations, in one batch. ``cot``: the prompt layout of
    the CoT phase (no latent markers), for GRPO on a CoT model."""
    k = group_size
    prompts = [p for r in records for p in [layout.prompt(r, stage, cot)] * k]  # (read only: one list k times)
    pb = collate_prompts(prompts, layout.pad_id)
    dev = next(model.parameters()).device
    ids, am = pb["input_ids"].to(dev), pb["attention_mask"].to(dev)
    seeds = seeds.to(dev)
    if perturber is not None:
        with perturber.rows(seeds):
            gen = generate(model, ids, am, max_new_tokens, layout.eos_id, layout.pad_id, temperature, seeds, perturber)
    else:
        gen = generate(model, ids, am, max_new_tokens, layout.eos_id, layout.pad_id, temperature, seeds)
    texts = tokenizer.batch_decode([t[: int(m.sum())] for t, m in zip(gen.tokens.cpu(), gen.mask.cpu())])
    golds = [r.answer for r in records]
    rewards = reward_fn(texts, [g for g in golds for _ in range(k)]).view(len(records), k)
    lengths = gen.mask.sum(1)
    last = gen.tokens.gather(1, (lengths - 1).clamp(min=0).long()[:, None])[:, 0]
    truncated = (lengths >= max_new_tokens) & (last != layout.eos_id)
    return RolloutBatch(ids, am, seeds, gen.tokens, gen.logprobs, gen.mask, rewards,
                        [extract_answer(t) for t in texts], golds, gen.final_thought, truncated)


def replay_logprobs(
    model: LatentLM, perturber: Perturber | None, batch: RolloutBatch, temperature: float, with_entropy: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Log-probs [N, L] of the rollout's answer tokens under ``model`` with the rows' own perturbations
    rebuilt from their seeds (teacher forcing, one batched latent forward). Differentiable."""
    tp = batch.prompt_ids.shape[1]
    full = torch.cat([batch.prompt_ids, batch.tokens], 1)
    am = torch.cat([batch.prompt_mask, batch.mask.to(batch.prompt_mask.dtype)], 1)
    pos = positions_from_mask(am)
    t_eff = temperature if temperature > 0 else 1.0

    def fwd():
        return model(full, am, pos, perturber=perturber, answer_from=tp, logits_from=tp - 1)

    if perturber is not None:
        with perturber.rows(batch.seeds):
            out = fwd()
    else:
        out = fwd()
    logits = out.logits[:, : batch.tokens.shape[1]].float()
    logp = sequence_logprobs(logits, batch.tokens, t_eff)
    ent = token_entropy(logits.detach(), t_eff) if with_entropy else None
    return logp, ent


def rollout_stats(rb: RolloutBatch, seconds: float) -> dict[str, float]:
    """What a GRPO step logs about its rollouts: reward and group statistics (how many groups carry
    signal), distinct answers per group, the spread of the final thoughts within groups, throughput."""
    st = group_stats(rb.rewards)
    k = rb.group_size
    keys = [answer_key(a) for a in rb.answers]
    distinct = [len({keys[b * k + j] for j in range(k)}) for b in range(rb.rewards.shape[0])]
    vals = {f"grpo/{n}": float(st[n]) for n in ("reward_mean", "reward_std", "frac_zero_std",
                                                "frac_all_correct", "frac_all_wrong", "frac_mixed")}
    vals["grpo/distinct_answers"] = sum(distinct) / len(distinct)
    if rb.final_thought is not None:
        th = rb.final_thought.float().view(-1, k, rb.final_thought.shape[-1])
        d = torch.cdist(th, th)
        vals["grpo/thought_diversity"] = float(d.sum() / (th.shape[0] * k * (k - 1)))
    if rb.truncated is not None:
        vals["grpo/truncated_frac"] = float(rb.truncated.float().mean())
    vals["perf/rollouts_per_s"] = rb.tokens.shape[0] / max(seconds, 1e-9)
    return vals
