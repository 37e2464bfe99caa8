"""torch.profiler over one batched rollout and one Coconut training step (+ one GRPO update).

Prints the top-ops tables (self CPU time) and, as the last stdout line, one JSON object with the top
ops of each phase and the share of time in the KV-cache concatenation and in mask building.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from common import apply_threads, autocast, base_parser, build_setup, emit, machine_info  # noqa: E402


def top(prof, n: int = 12) -> list[dict]:
    ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ev) or 1.0
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in ev[:n]]


def main(argv=None) -> dict:
    ap = base_parser(__doc__.splitlines()[0])
    args = ap.parse_args(argv)
    apply_threads(args)
    from rollout import make_batch, ours
    from train_step import rollout_batch, sft_loss, train_batch

    from lightning_latent.model.perturb import PerturbConfig, Perturber
    from lightning_latent.rl.loss import group_advantages, grpo_loss
    from lightning_latent.rl.rollout import replay_logprobs

    n_p, k, bs = (2, 2, 4) if args.tiny else (16, 8, 32)
    setup = build_setup(args.shapes, args.seed, 6)
    pert = Perturber(setup.lm, PerturbConfig())
    prompts, seeds = make_batch(setup, n_p, k, 6, args.seed)
    b = train_batch(setup, bs, 6, args.seed)
    rb = rollout_batch(setup, pert, max(n_p // 4, 1), k, 6, 16, args.seed)
    adv = group_advantages(rb.rewards).flatten()

    def roll():
        with torch.no_grad(), autocast(args.dtype):
            ours(setup, pert, prompts, seeds, 16, 1.0)

    def train():
        setup.model.train()
        with autocast(args.dtype):
            out = setup.model(b["input_ids"], b["attention_mask"], b["position_ids"])
            loss = sft_loss(out.logits, b["labels"])
        loss.backward()
        setup.model.zero_grad(set_to_none=True)

    def grpo():
        setup.model.train()
        with autocast(args.dtype):
            logp, _ = replay_logprobs(setup.model, pert, rb, 1.0)
            loss, _ = grpo_loss(logp, rb.logprobs, adv, rb.mask.float())
        loss.backward()
        setup.model.zero_grad(set_to_none=True)

    res = {"benchmark": "profile", "shapes": args.shapes, "dtype": args.dtype, "tiny": args.tiny,
           "rollout_rows": len(prompts), "train_batch_shape": list(b["input_ids"].shape),
           "grpo_rows": rb.prompt_ids.shape[0]}
    for name, fn in (("rollout", roll), ("train_step", train), ("grpo_update", grpo)):
        fn()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"== {name} ==")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        res[name] = top(prof)
    res["machine"] = machine_info()
    return res


if __name__ == "__main__":
    emit(main())
