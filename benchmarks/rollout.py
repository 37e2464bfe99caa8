"""Batched, KV-cached latent rollouts vs the reference Coconut way (one rollout at a time, no cache).

ours      : prompts x K rows in ONE batch: ``generate`` under ``Perturber.rows(seeds)`` (dropout_shared,
            p=0.1, sites attn+mlp, scope latent), n latent thoughts through the KV cache, answers sampled
            at T=1 with per-row seeds, KV-cached decoding. This is ``rl.rollout.rollout`` minus the text
            decoding and the reward.
reference : a Python loop over rows, batch size 1, the HF base model called WITHOUT a cache: the whole
            sequence is recomputed for every latent step and for every answer token (how the reference
            Coconut ``generate`` works). Same model, prompts, masks (the same Perturber, activated with
            ``.rows(one seed)``) and the same sampling uniforms (``answer_uniforms``), so the tokens must
            be identical.

Prints one JSON object as the last stdout line.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import (apply_threads, autocast, base_parser, build_setup, emit, machine_info, median,  # noqa: E402
                    prompt_layout, records, sync, to_dev)
from lightning_latent.data.layout import collate_prompts  # noqa: E402
from lightning_latent.model.latent_lm import generate  # noqa: E402
from lightning_latent.model.perturb import PerturbConfig, Perturber, answer_uniforms  # noqa: E402
from lightning_latent.rl.rollout import rollout_seed  # noqa: E402


def make_batch(setup, n_prompts: int, k: int, n_latent: int, seed: int):
    lay = prompt_layout(setup, n_latent)
    recs = records(n_prompts, seed)
    prompts = [setup.ids(lay.prompt(r, stage=1)) for r in recs for _ in range(k)]
    seeds = torch.tensor([rollout_seed(seed, 0, r.idx, j) for r in recs for j in range(k)], dtype=torch.long)
    return prompts, to_dev(seeds)


def ours(setup, pert, prompts, seeds, max_new: int, temperature: float):
    pb = to_dev(collate_prompts(prompts, setup.pad_id))
    with pert.rows(seeds):
        gen = generate(setup.model, pb["input_ids"], pb["attention_mask"], max_new, setup.eos_id, setup.pad_id,
                       temperature, seeds, pert)
    return [gen.tokens[i, : int(gen.mask[i].sum())].tolist() for i in range(len(prompts))]


@torch.no_grad()
def reference_one(setup, pert, prompt: list[int], seed: int, max_new: int, temperature: float) -> list[int]:
    """One rollout, batch 1, no KV cache: every latent step and answer token recomputes the whole sequence."""
    lm = setup.lm
    base, emb, head = lm.base_model, lm.get_input_embeddings(), lm.get_output_embeddings()
    dev = emb.weight.device
    ids = torch.tensor([prompt], device=dev)
    embeds = emb(ids)
    tp, d = len(prompt), embeds.shape[-1]
    step0 = torch.zeros(1, dtype=torch.long, device=dev)
    seed_t = torch.tensor([seed], dtype=torch.long, device=dev)
    out: list[int] = []
    with pert.rows(seed_t):
        for pos in [i for i, t in enumerate(prompt) if t == setup.latent_id]:
            pert.begin_pass(step0, pos, None, d, ids.device, embeds.dtype)  # shared mask over the prefix
            h = base(inputs_embeds=embeds[:, :pos], use_cache=False).last_hidden_state
            embeds = torch.cat([embeds[:, :pos], h[:, -1:], embeds[:, pos + 1:]], 1)
        for t in range(max_new):
            pert.begin_pass(step0, embeds.shape[1], tp, d, ids.device, embeds.dtype)  # answer columns unmasked
            h = base(inputs_embeds=embeds, use_cache=False).last_hidden_state
            logits = head(h[:, -1]).float()
            logp = torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), -1)
            if temperature > 0:
                cdf = logp.exp().cumsum(-1)
                u = answer_uniforms(seed_t, t).to(cdf.dtype) * cdf[:, -1]
                tok = int(torch.searchsorted(cdf, u[:, None]).clamp(max=logits.shape[-1] - 1)[0, 0])
            else:
                tok = int(logits.argmax(-1))
            out.append(tok)
            if tok == setup.eos_id:
                break
            embeds = torch.cat([embeds, emb(torch.tensor([[tok]], device=dev))], 1)
    return out


def reference(setup, pert, prompts, seeds, rows, max_new, temperature):
    seeds = seeds.tolist()
    return {i: reference_one(setup, pert, prompts[i], int(seeds[i]), max_new, temperature) for i in rows}


def spread_rows(n: int, m: int) -> list[int]:
    """m row indices spread over n rows (different prompts and different k)."""
    if m >= n:
        return list(range(n))
    return sorted({int(round(i * (n - 1) / (m - 1))) for i in range(m)}) if m > 1 else [0]


def main_compare(args, setup, pert) -> dict:
    n_prompts, k, n_latent, max_new = args.prompts, args.k, args.latent, args.max_new_tokens
    prompts, seeds = make_batch(setup, n_prompts, k, n_latent, args.seed)
    n = len(prompts)
    sub = spread_rows(n, args.ref_rows if args.ref_rows else n)
    check = spread_rows(n, args.check_rows if args.check_rows else n)  # rows whose tokens are compared
    with autocast(args.dtype):
        ours(setup, pert, prompts[:4], seeds[:4], 2, args.temperature)  # warm-up
        reference(setup, pert, prompts, seeds, sub[:1], 2, args.temperature)
        t0 = time.perf_counter()
        out_check = reference(setup, pert, prompts, seeds, [i for i in check if i not in sub], max_new,
                              args.temperature)
        t_check = time.perf_counter() - t0
        t_ours, t_ref, out_ours, out_ref = [], [], None, None
        for _ in range(args.repeats):  # interleaved
            sync()
            t0 = time.perf_counter()
            out_ours = ours(setup, pert, prompts, seeds, max_new, args.temperature)
            t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out_ref = reference(setup, pert, prompts, seeds, sub, max_new, args.temperature)
            t_ref.append((time.perf_counter() - t0) * n / len(sub))  # scaled to all n rows
    out_ref_all = {**out_check, **out_ref}
    compared = sorted(out_ref_all)
    same = [out_ours[i] == out_ref_all[i] for i in compared]
    tok_ours = sum(len(x) for x in out_ours)
    tok_ref = sum(len(out_ref_all[i]) for i in compared)
    mo, mr = median(t_ours), median(t_ref)
    return {
        "speedup": mr / mo,
        "rollouts_per_s": n / mo,
        "reference_rollouts_per_s": n / mr,
        "ours_s": mo,
        "reference_s_scaled": mr,
        "ours_s_all": t_ours,
        "reference_s_all_scaled": t_ref,
        "identical_outputs": all(same),
        "identical_rows": int(sum(same)),
        "rows_compared": len(compared),
        "reference_rows_timed": len(sub),
        "reference_scaling": f"reference timed on {len(sub)} of {n} rows (spread over prompts and k) per repeat, "
                             f"scaled by {n}/{len(sub)}; tokens compared on {len(compared)} rows",
        "reference_check_pass_s": t_check,
        "tokens_generated_ours": tok_ours,
        "tokens_generated_reference": tok_ref,
        "tokens_generated_ours_on_compared_rows": sum(len(out_ours[i]) for i in compared),
        "latent_steps": n_latent,
        "prompt_len_max": max(len(p) for p in prompts),
        "rows": n,
    }


def main_sweep(args, setup, pert) -> dict:
    ks = [2, 4] if args.tiny else [4, 8, 16, 32]
    lats = [2, 6] if args.tiny else [2, 6, 12]
    rows = []
    with autocast(args.dtype):
        ours(setup, pert, *make_batch(setup, 2, 2, 2, args.seed), 2, args.temperature)
        for k in ks:
            data = {lat: make_batch(setup, args.prompts, k, lat, args.seed) for lat in lats}
            t_roll = {lat: [] for lat in lats}
            t_prompt = {lat: [] for lat in lats}
            for _ in range(args.repeats):  # interleave the latent counts
                for lat in lats:
                    prompts, seeds = data[lat]
                    sync()
                    t0 = time.perf_counter()
                    ours(setup, pert, prompts, seeds, args.max_new_tokens, args.temperature)
                    sync()
                    t_roll[lat].append(time.perf_counter() - t0)
                    # prompt phase only (prefix + latent window + end marker): 1 new token
                    sync()
                    t0 = time.perf_counter()
                    ours(setup, pert, prompts, seeds, 1, args.temperature)
                    sync()
                    t_prompt[lat].append(time.perf_counter() - t0)
            xs = lats
            ys = [median(t_prompt[lat]) for lat in lats]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            sxx = sum((x - mx) ** 2 for x in xs)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
            icpt = my - slope * mx
            ss_tot = sum((y - my) ** 2 for y in ys)
            r2 = 1 - sum((y - (icpt + slope * x)) ** 2 for x, y in zip(xs, ys)) / ss_tot if ss_tot > 0 else 1.0
            for lat in lats:
                n = len(data[lat][0])
                rows.append({"k": k, "latent_steps": lat, "rows": n,
                             "rollout_s": median(t_roll[lat]), "rollouts_per_s": n / median(t_roll[lat]),
                             "prompt_phase_s": median(t_prompt[lat])})
            rows.append({"k": k, "fit": "prompt_phase_s = a + b * latent_steps", "a_s": icpt,
                         "time_per_latent_step_s": slope, "r2": r2})
    return {"sweep": rows}


def main(argv=None) -> dict:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--latent", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--ref-rows", type=int, default=None, help="reference timed on this many rows (scaled)")
    ap.add_argument("--check-rows", type=int, default=None, help="rows whose tokens are compared (default all)")
    ap.add_argument("--sweep", action="store_true", help="K in {4,8,16,32} x latent steps in {2,6,12}")
    args = ap.parse_args(argv)
    apply_threads(args)
    small = args.shapes == "gpt2-small"
    if args.tiny:
        args.prompts = args.prompts or 2
        args.k = args.k or 2
        args.max_new_tokens = min(args.max_new_tokens, 4)
        args.repeats = args.repeats or 1
    else:
        args.prompts = args.prompts or (4 if small else 16)
        args.k = args.k or 8
        args.repeats = args.repeats or 3
        if args.ref_rows is None:
            args.ref_rows = 4 if small else 32
        if args.check_rows is None:
            args.check_rows = args.ref_rows if small else None  # every row on the default model
    torch.manual_seed(args.seed)
    setup = build_setup(args.shapes, args.seed, args.latent)
    pert = Perturber(setup.lm, PerturbConfig(arm="dropout_shared", p=args.p, sites=["attn", "mlp"], scope="latent"))
    result = {"benchmark": "rollout", "shapes": args.shapes, "dtype": args.dtype, "tiny": args.tiny,
              "prompts": args.prompts, "k": args.k, "max_new_tokens": args.max_new_tokens,
              "temperature": args.temperature, "perturb": {"arm": "dropout_shared", "p": args.p,
                                                           "sites": ["attn", "mlp"], "scope": "latent"},
              "n_params": setup.n_params(), "repeats": args.repeats}
    t0 = time.perf_counter()
    with torch.no_grad():
        if args.sweep:
            result.update(main_sweep(args, setup, pert))
            result["identical_outputs"] = None  # the sweep runs ours only
        else:
            result.update(main_compare(args, setup, pert))
    result["wall_s"] = time.perf_counter() - t0
    result["machine"] = machine_info()
    return result


if __name__ == "__main__":
    emit(main())
