"""Training-step cost: Coconut (latent recurrence) vs a plain LM step on the same tokens, and a GRPO update.

coconut : forward + backward through ``LatentLM`` on a ``collate_train`` batch with 6 continuous thoughts
          (cross-entropy on the supervised tail, the LightningModule's SFT loss).
plain   : forward + backward of the same HF model on the same ids (latent slots are ordinary tokens:
          no recurrence, one pass), same loss.
grpo    : ``replay_logprobs`` (the rows' dropout_shared masks rebuilt from their seeds) + ``grpo_loss``
          (beta=0, no reference replay) + backward, on a rollout batch of prompts x K made beforehand.

No optimizer step in any of them (gradients are zeroed between steps). FLOPs are counted as
6 * n_params * n_tokens for forward + backward (n_params: every parameter, the tied embedding / LM head
once; n_tokens: rows x columns processed, padding included; attention-score FLOPs not counted) and
compared with a dense [n, n] x [n, n] matmul peak measured in the same run, dtype and threads (``mfu``).
Prints one JSON object as the last stdout line.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402

from common import (apply_threads, autocast, base_parser, build_setup, emit, machine_info,  # noqa: E402
                    matmul_peak_flops, median, peak_rss_mib, prompt_layout, records, reset_peak_rss, rss_mib,
                    sync, to_dev)
from lightning_latent.data.layout import IGNORE, collate_prompts, collate_train  # noqa: E402
from lightning_latent.model.latent_lm import generate  # noqa: E402
from lightning_latent.model.perturb import PerturbConfig, Perturber  # noqa: E402
from lightning_latent.rl.loss import group_advantages  # noqa: E402
from lightning_latent.rl.rollout import RolloutBatch, rollout_seed  # noqa: E402
from lightning_latent.rl.update import GRPOConfig, backward_micro_batches  # noqa: E402


def train_batch(setup, n_rows: int, n_latent: int, seed: int) -> dict:
    lay = prompt_layout(setup, n_latent)
    feats = []
    for r in records(n_rows, seed, offset=1000):
        f = lay.train_example(r, stage=1)
        f["input_ids"] = setup.ids(f["input_ids"])
        f["labels"] = [x if x == IGNORE else setup.remap.get(x, x) for x in f["labels"]]
        feats.append(f)
    return to_dev(collate_train(feats, setup.pad_id, setup.latent_id))


def rollout_batch(setup, pert, n_prompts: int, k: int, n_latent: int, max_new: int, seed: int) -> RolloutBatch:
    lay = prompt_layout(setup, n_latent)
    recs = records(n_prompts, seed)
    prompts = [setup.ids(lay.prompt(r, stage=1)) for r in recs for _ in range(k)]
    seeds = to_dev(torch.tensor([rollout_seed(seed, 0, r.idx, j) for r in recs for j in range(k)], dtype=torch.long))
    pb = to_dev(collate_prompts(prompts, setup.pad_id))
    setup.model.eval()
    with torch.no_grad(), pert.rows(seeds):
        gen = generate(setup.model, pb["input_ids"], pb["attention_mask"], max_new, setup.eos_id, setup.pad_id,
                       1.0, seeds, pert)
    g = torch.Generator().manual_seed(seed)
    rewards = to_dev((torch.rand(n_prompts, k, generator=g) < 0.5).float())  # synthetic mixed rewards
    return RolloutBatch(pb["input_ids"], pb["attention_mask"], seeds, gen.tokens, gen.logprobs, gen.mask, rewards,
                        [None] * len(prompts), [r.answer for r in recs], gen.final_thought)


def sft_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


def make_steps(setup, pert, b: dict, rb: RolloutBatch, dtype: str, max_new: int) -> dict:
    """The three timed steps (forward + backward, no optimizer step) as closures over fixed batches."""
    model, lm = setup.model, setup.lm

    def coconut():
        model.train()
        with autocast(dtype):
            out = model(b["input_ids"], b["attention_mask"], b["position_ids"])
            loss = sft_loss(out.logits, b["labels"])
        loss.backward()
        return loss

    def plain():
        model.train()
        with autocast(dtype):
            logits = lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                        position_ids=b["position_ids"], use_cache=False).logits
            loss = sft_loss(logits, b["labels"])
        loss.backward()
        return loss

    def grpo():
        return grpo_backward(model, pert, rb, dtype, max_new)

    return {"coconut": coconut, "plain": plain, "grpo": grpo}


def grpo_backward(model, pert, rb: RolloutBatch, dtype: str, max_new: int, micro: int | None = None):
    """The GRPO update's forward + backward (beta=0), as the module runs it: ``rl.update``'s
    micro-batched replay + loss + backward, whole batch or in micro-batches of ``micro`` rows.
    Returns the summed loss and the replayed log-probs, detached."""
    model.train()
    adv = group_advantages(rb.rewards, "mean").flatten()
    cfg = GRPOConfig(max_new_tokens=max_new, micro_batch_rows=micro)
    with autocast(dtype):
        total, logp, _ = backward_micro_batches(model, pert, rb, adv, None, cfg, 1.0, 1.0, torch.Tensor.backward)
    return total, logp


def add_step_args(ap) -> None:
    """The batch arguments of the steps (shared with compile.py)."""
    ap.add_argument("--batch", type=int, default=None, help="training rows (coconut / plain)")
    ap.add_argument("--prompts", type=int, default=None, help="GRPO prompts")
    ap.add_argument("--k", type=int, default=None, help="GRPO rollouts per prompt")
    ap.add_argument("--latent", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=16)


def resolve_step_args(args) -> None:
    """Fill the unset batch sizes and repeats for the shapes (and the seconds-long ``--tiny`` mode)."""
    small = args.shapes == "gpt2-small"
    if args.tiny:
        args.batch, args.prompts, args.k = args.batch or 4, args.prompts or 2, args.k or 2
        args.max_new_tokens = min(args.max_new_tokens, 4)
        args.repeats = args.repeats or 1
    else:
        args.batch = args.batch or (4 if small else 32)
        args.prompts = args.prompts or (1 if small else 4)
        args.k = args.k or 8
        args.repeats = args.repeats or (2 if small else 5)


def main(argv=None) -> dict:
    ap = base_parser(__doc__.splitlines()[0])
    add_step_args(ap)
    args = ap.parse_args(argv)
    apply_threads(args)
    resolve_step_args(args)
    setup = build_setup(args.shapes, args.seed, args.latent)
    model, lm = setup.model, setup.lm
    pert = Perturber(lm, PerturbConfig(arm="dropout_shared", p=0.1, sites=["attn", "mlp"], scope="latent"))
    b = train_batch(setup, args.batch, args.latent, args.seed)
    rb = rollout_batch(setup, pert, args.prompts, args.k, args.latent, args.max_new_tokens, args.seed)
    maskf = rb.mask.float()
    n_params = setup.n_params()
    n_lat = int((b["input_ids"] == setup.latent_id).sum(1).max())

    steps = make_steps(setup, pert, b, rb, args.dtype, args.max_new_tokens)
    grpo = steps["grpo"]
    tokens = {"coconut": b["input_ids"].numel(), "plain": b["input_ids"].numel(),
              "grpo": rb.prompt_ids.numel() + rb.tokens.numel()}
    times = {k: [] for k in steps}
    peak = {k: 0.0 for k in steps}
    delta = {k: 0.0 for k in steps}
    hwm_reset = True
    t_start = time.perf_counter()
    peak_flops = [matmul_peak_flops(args.dtype)]
    for name, fn in steps.items():  # warm-up
        fn()
        model.zero_grad(set_to_none=True)
    _, logp0 = grpo()
    model.zero_grad(set_to_none=True)
    replay_gap = float(((logp0.detach().float() - rb.logprobs).abs() * maskf).max())
    for _ in range(args.repeats):  # interleaved
        for name, fn in steps.items():
            base = rss_mib()
            hwm_reset = reset_peak_rss() and hwm_reset
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
            peak[name] = max(peak[name], peak_rss_mib())
            delta[name] = max(delta[name], peak_rss_mib() - base)
            model.zero_grad(set_to_none=True)
        peak_flops.append(matmul_peak_flops(args.dtype, repeats=2))
    peak_fl = max(peak_flops)
    med = {k: median(v) for k, v in times.items()}
    flops = {k: 6 * n_params * tokens[k] for k in steps}
    achieved = {k: flops[k] / med[k] for k in steps}
    res = {
        "benchmark": "train_step", "shapes": args.shapes, "dtype": args.dtype, "tiny": args.tiny,
        "repeats": args.repeats, "n_params": n_params, "latent_steps": n_lat,
        "train_batch_shape": list(b["input_ids"].shape),
        "grpo_batch": {"prompts": args.prompts, "k": args.k, "rows": rb.prompt_ids.shape[0],
                       "prompt_len": rb.prompt_ids.shape[1], "answer_len": rb.tokens.shape[1]},
        "latent_overhead": med["coconut"] / med["plain"],
        "coconut_step_s": med["coconut"], "plain_step_s": med["plain"], "grpo_step_s": med["grpo"],
        "step_s_all": times,
        "tokens": tokens,
        "flops_formula": "6 * n_params * n_tokens (fwd+bwd; n_tokens = rows x columns incl. padding; "
                         "attention scores not counted)",
        "achieved_flops": achieved,
        "matmul_peak_flops": peak_fl,
        "matmul_peak": ("best of torch.mm [8192,8192]x[8192,8192] on the GPU" if common.DEVICE.type == "cuda" else
                        "best of torch.mm [1024,1024]x[1024,1024]") + " in this run and dtype (CPU: these threads)",
        "mfu": {k: achieved[k] / peak_fl for k in steps},
        "grpo_mfu_ge_plain": achieved["grpo"] >= achieved["plain"],
        "peak_rss_mib": peak,
        "peak_rss_delta_mib": delta,
        "peak_rss_method": ("torch.cuda.max_memory_allocated, reset per phase (GPU memory, not RSS)"
                            if common.DEVICE.type == "cuda" else
                            "VmHWM reset per phase via /proc/self/clear_refs" if hwm_reset else "ru_maxrss (process)"),
        "replay_gap_first_iter": replay_gap,
        "identical_outputs": replay_gap <= (1e-5 if args.dtype == "fp32" else 1e-1),
        "identical_outputs_meaning": "replayed log-probs equal the rollout's (|gap| <= 1e-5 fp32)",
        "wall_s": time.perf_counter() - t_start,
        "machine": machine_info(),
    }
    return res


if __name__ == "__main__":
    emit(main())
