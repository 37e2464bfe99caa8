"""Peak memory of a GRPO update step as K (rollouts per prompt) and the number of latent steps grow.

The step is the update the LightningModule runs: ``replay_logprobs`` (one batched latent forward with
the rows' dropout_shared masks rebuilt from their seeds) + ``grpo_loss`` + backward, on a rollout batch
made beforehand (1 prompt x K rows unless --prompts). Rows are replayed either all at once or in
micro-batches of ``--micro`` rows (``grpo.micro_batch_rows``: same gradient, one backward per chunk),
and, at the largest K, also with checkpointed latent passes (``model.checkpoint_latents``: same
gradient, each latent pass recomputed in backward).

Peak memory = the process's peak RSS during the step (VmHWM, reset before each step) and its increase
over the RSS before the step; on CUDA, torch.cuda.max_memory_allocated. Prints one JSON object last.

glibc's malloc raises its mmap threshold each time a large block is freed, after which blocks of a few
MB come from the heap and are not returned to the system: RSS then tracks the allocator's high-water
mark, not live tensors (with the default, a K=32 gpt2-small step peaked about 0.8 GiB higher). Each
setting's process therefore runs with ``MALLOC_MMAP_THRESHOLD_=131072`` (a fixed threshold) unless
``--malloc-default``; the same setting lowers the peak RSS of real CPU runs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import (apply_threads, base_parser, build_setup, emit, machine_info,  # noqa: E402
                    peak_rss_mib, reset_peak_rss, rss_mib, sync)
from lightning_latent.model.perturb import PerturbConfig, Perturber  # noqa: E402
from train_step import grpo_backward, rollout_batch  # noqa: E402


MMAP_THRESHOLD = "131072"


def measure(setup, pert, k: int, n_latent: int, prompts: int, max_new: int, micro: int | None, dtype: str,
            seed: int, checkpoint_latents: bool = False) -> dict:
    rb = rollout_batch(setup, pert, prompts, k, n_latent, max_new, seed)
    setup.model.checkpoint_latents = checkpoint_latents  # after the rollouts (no_grad: unaffected anyway)
    n = rb.mask.shape[0]
    model = setup.model
    model.train()
    model.zero_grad(set_to_none=True)
    sync()
    base = rss_mib()
    reset_peak_rss()
    t0 = time.perf_counter()
    grpo_backward(model, pert, rb, dtype, max_new, micro)
    sync()
    dt = time.perf_counter() - t0
    peak = peak_rss_mib()
    model.zero_grad(set_to_none=True)
    return {"k": k, "latent_steps": n_latent, "rows": n, "micro_batch_rows": micro,
            "checkpoint_latents": checkpoint_latents, "step_s": dt,
            "peak_mib": peak, "peak_increase_mib": peak - base,
            "prompt_len": rb.prompt_ids.shape[1], "answer_len": rb.tokens.shape[1]}


def main(argv=None) -> dict:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=1)
    ap.add_argument("--ks", type=int, nargs="+", default=None, help="default 4 8 16 32")
    ap.add_argument("--latents", type=int, nargs="+", default=None, help="default 2 6 12")
    ap.add_argument("--micro", type=int, nargs="*", default=None,
                    help="micro-batch sizes also measured at the largest K and 6 latent steps (default 8)")
    ap.add_argument("--no-checkpoint-rows", action="store_true",
                    help="skip the checkpoint_latents rows (largest K, every latent-step count)")
    ap.add_argument("--malloc-default", action="store_true",
                    help="leave glibc's dynamic mmap threshold on (RSS then includes allocator slack)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--one", type=int, nargs=4, metavar=("K", "LATENT", "MICRO", "CKPT"), default=None,
                    help="(internal) measure one setting in this process; MICRO 0 = whole batch; CKPT 0/1")
    args = ap.parse_args(argv)
    apply_threads(args)
    if args.one:
        k, lat, m, ck = args.one
        s = build_setup(args.shapes, args.seed, lat)
        pert = Perturber(s.lm, PerturbConfig(arm="dropout_shared", p=0.1, sites=["attn", "mlp"], scope="latent"))
        return measure(s, pert, k, lat, args.prompts, args.max_new_tokens, m or None, args.dtype, args.seed,
                       bool(ck))
    if args.tiny:
        ks, lats, micro, args.max_new_tokens = args.ks or [2, 4], args.latents or [2], args.micro or [2], 4
    else:
        ks, lats = args.ks or [4, 8, 16, 32], args.latents or [2, 6, 12]
        micro = [8] if args.micro is None else args.micro
    lat_m = 6 if 6 in lats else lats[0]
    settings = [(k, lat, 0, 0) for lat in lats for k in ks] + [(max(ks), lat_m, m, 0) for m in micro]
    if not args.no_checkpoint_rows:
        settings += [(max(ks), lat, 0, 1) for lat in lats]
    t_start = time.perf_counter()
    env = dict(os.environ)
    if not args.malloc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
    rows = []
    for k, lat, m, ck in settings:  # one fresh process per setting: freed memory kept by the allocator
        cmd = [sys.executable, os.path.abspath(__file__), "--shapes", args.shapes, "--dtype", args.dtype,
               "--device", args.device, "--threads", str(args.threads), "--seed", str(args.seed),
               "--prompts", str(args.prompts), "--max-new-tokens", str(args.max_new_tokens),
               "--one", str(k), str(lat), str(m), str(ck)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return {"benchmark": "memory", "shapes": args.shapes, "dtype": args.dtype, "tiny": args.tiny,
            "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "rows": rows,
            "malloc_mmap_threshold": env.get("MALLOC_MMAP_THRESHOLD_", "glibc default (dynamic)"),
            "method": ("torch.cuda.max_memory_allocated" if common.DEVICE.type == "cuda" else
                       "peak RSS (VmHWM reset before the step); peak_increase = peak - RSS before the step; "
                       "one fresh process per setting"),
            "wall_s": time.perf_counter() - t_start, "machine": machine_info()}


if __name__ == "__main__":
    emit(main())
