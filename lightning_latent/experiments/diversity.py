"""How different are the K rollouts of a prompt? Measured before any tuning (docs/design.md#arms).

For one checkpoint and a set of prompts, each perturbation setting (arm, strength, scope, greedy or
sampled answers) gets K rollouts per prompt, and we record the fraction of zero-variance groups (GRPO
learns nothing from them), the number of distinct answers per group and the spread of the final
thoughts. No training happens here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data.records import Record
from ..model.arms import get_arm
from ..model.perturb import PerturbConfig, Perturber
from ..rl.loss import group_stats
from ..answers import answer_key
from ..rl.rollout import rollout, rollout_seed


@dataclass
class DiversitySetting:
    arm: str
    strength: float  # p for the dropout arms, noise_scale for gaussian
    scope: str = "latent"
    temperature: float = 0.0  # 0: greedy answers
    sites: list[str] = field(default_factory=lambda: ["attn", "mlp"])

    def perturb_config(self) -> PerturbConfig:
        """The arm at this strength: ``p`` for dropout arms, ``noise_scale`` for arms with a thought function."""
        arm = get_arm(self.arm)
        if arm.thought is not None:
            return PerturbConfig(arm=self.arm, noise_scale=self.strength, sites=["thought"], scope=self.scope)
        if arm.dropout:
            return PerturbConfig(arm=self.arm, p=self.strength, sites=list(self.sites), scope=self.scope)
        return PerturbConfig(arm="none", p=0.0, scope=self.scope)


def default_settings() -> list[DiversitySetting]:
    """The grid of the study: p x scope x answer decoding for the method, and the other arms."""
    out = []
    for temp in (0.0, 1.0):
        for scope in ("latent", "all"):
            for p in (0.0, 0.05, 0.1, 0.2, 0.3, 0.5):
                out.append(DiversitySetting("dropout_shared", p, scope, temp))
        for p in (0.1, 0.3):
            out.append(DiversitySetting("dropout_per_step", p, "latent", temp))
        for s in (0.1, 0.3, 1.0):
            out.append(DiversitySetting("gaussian", s, "latent", temp))
    return out


@torch.no_grad()
def measure(module, records: list[Record], settings: list[DiversitySetting], k: int = 8, batch_prompts: int = 32,
            seed: int = 0) -> list[dict]:
    """One row per setting: frac_zero_std, frac_mixed, distinct answers per group, thought spread, reward."""
    module.model.eval()
    stage = module.segments[-1].stage
    rows = []
    for st in settings:
        pert = Perturber(module.model.lm, st.perturb_config())
        try:
            zero = mixed = distinct = spread = reward = 0.0
            n = 0
            for i in range(0, len(records), batch_prompts):
                chunk = records[i:i + batch_prompts]
                seeds = torch.tensor([rollout_seed(seed, 0, r.idx, j) for r in chunk for j in range(k)])
                rb = rollout(module.model, pert, module.layout, chunk, stage, seeds, k, st.temperature,
                             module.grpo_cfg.max_new_tokens, module.reward_fn, module.tokenizer)
                gs = group_stats(rb.rewards)
                b = len(chunk)
                zero += float(gs["frac_zero_std"]) * b
                mixed += float(gs["frac_mixed"]) * b
                reward += float(gs["reward_mean"]) * b
                keys = [answer_key(a) for a in rb.answers]
                distinct += sum(len(set(keys[g * k:(g + 1) * k])) for g in range(b))
                if rb.final_thought is not None:
                    th = rb.final_thought.float().view(b, k, -1)
                    spread += float(torch.cdist(th, th).sum() / (k * (k - 1)))
                n += b
        finally:
            pert.remove()
        rows.append({"arm": st.arm, "strength": st.strength, "scope": st.scope,
                     "answers": "greedy" if st.temperature == 0 else f"T={st.temperature:g}", "k": k, "n_prompts": n,
                     "frac_zero_std": zero / n, "frac_mixed": mixed / n, "distinct_answers": distinct / n,
                     "thought_spread": spread / n, "reward_mean": reward / n})
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m lightning_latent.experiments.diversity CKPT --arm dropout_greedy --p 0 0.05 0.1 0.2``: the
    probe on validation prompts, one row per strength (CSV with ``--out``; one JSON line per row)."""
    import argparse

    from ..checkpoints import load_module
    from ..data.synthetic import synthetic_record
    from .reporting import emit_rows

    ap = argparse.ArgumentParser(prog="python -m lightning_latent.experiments.diversity", description=main.__doc__)
    ap.add_argument("ckpt")
    ap.add_argument("--arm", default="dropout_greedy", help="dropout_greedy: the premise, masks as the only noise")
    ap.add_argument("--p", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.3],
                    help="strengths: p for the dropout arms, the noise scale for gaussian")
    ap.add_argument("--temperature", type=float, default=None,
                    help="answer temperature (default: 0 for arms that answer greedily, else 1)")
    ap.add_argument("--scope", default="latent")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--out", help="CSV file")
    a = ap.parse_args(argv)
    module = load_module(a.ckpt)
    recs = [synthetic_record(module.hparams["synthetic"], "validation", i) for i in range(a.prompts)]
    temp = a.temperature if a.temperature is not None else (0.0 if get_arm(a.arm).greedy_answers else 1.0)
    rows = measure(module, recs, [DiversitySetting(a.arm, p, a.scope, temp) for p in a.p], k=a.k)
    return emit_rows(rows, a.out)


if __name__ == "__main__":
    raise SystemExit(main())
