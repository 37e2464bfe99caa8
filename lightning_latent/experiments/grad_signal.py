"""How much of one step's gradient is signal? A probe for a flat training reward (issue 22).

From a converged start, GRPO at a small lr left the training reward flat for 300 steps (KL to the start
0.003), and at a 5x larger lr it lost greedy accuracy before the reward rose. Adam scales every step to about
the learning rate whatever the gradient holds, so when a batch's gradient is mostly noise, a step is mostly a
random move. This probe measures that share, with no training: the gradient of B independent batches at
the same weights, g_i = mu + e_i, gives

    E[g_i . g_j] = |mu|^2 (i != j),    E[|g_i|^2] = |mu|^2 + E|e|^2,

so ``signal_share`` = mean_{i != j} g_i . g_j / mean_i |g_i|^2 is the share of a batch's squared gradient that
is the expected gradient (1: no noise; about 0: noise; ``signal_share_se``: its delete-one jackknife standard
error over the batches), and ``batches_for_even`` = (1 - share) / share is how
many such batches a step would need to average for signal and noise to weigh the same. GRPO's gradient is
the first inner iteration's (ratio 1, no KL term: the policy gradient itself); the supervised gradient is
``sft_continue``'s (the start's training masks), the baseline that does learn at that lr.
"""
from __future__ import annotations

import random
from dataclasses import replace

import torch
from torch import Tensor

from ..model.perturb import Perturber
from ..rl.loss import group_advantages
from ..rl.rollout import rollout, rollout_seed
from ..rl.update import backward_micro_batches
from ..schedule import final_stage
from ..supervised import supervised_loss
from .diversity import DiversitySetting


def signal_share(grads: Tensor) -> dict[str, float]:
    """``grads`` [B, D], B >= 2 independent batches' gradients at the same weights (module docstring)."""
    if grads.dim() != 2 or grads.shape[0] < 2:
        raise ValueError(f"need [B >= 2, D] gradients, got shape {tuple(grads.shape)}")
    g = grads.double()
    b = g.shape[0]
    gram = g @ g.T
    share = _share(gram)
    sq = gram.diagonal()
    norms = sq.sqrt()
    se = float("nan")
    if b >= 3:  # delete-one jackknife over the batches
        keep = [torch.tensor([j for j in range(b) if j != i]) for i in range(b)]
        loo = torch.tensor([_share(gram[k][:, k]) for k in keep], dtype=torch.float64)
        se = float(((b - 1) / b * ((loo - loo.mean()) ** 2).sum()).sqrt())
    cos = gram / (norms[:, None] * norms[None, :]).clamp(min=1e-30)
    mean_cos = float((cos.sum() - cos.diagonal().sum()) / (b * (b - 1)))
    return {"signal_share": share, "signal_share_se": se, "mean_pairwise_cos": mean_cos, "grad_norm": float(norms.mean()),
            "batches_for_even": (1 - share) / share if share > 0 else float("inf")}


def _share(gram: Tensor) -> float:
    b = gram.shape[0]
    sq = gram.diagonal()
    return float((gram.sum() - sq.sum()) / (b * (b - 1)) / sq.mean())


def _flat_grad(params: list[torch.nn.Parameter]) -> Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in params])


def arms_stage(module) -> int:
    """The stage the arms train at: a GRPO or ``sft_continue`` phase with no stages given (the final one)."""
    return final_stage(module.curriculum.max_latent_stage)


def grpo_gradient(module, setting: DiversitySetting, records: list, k: int, seed: int, step: int,
                  stage: int | None = None, cot_layout: bool = False) -> tuple[Tensor, float]:
    """The policy gradient of one GRPO batch (``records`` x ``k`` rollouts under ``setting``'s noise, at
    ``stage``: the arms' by default) and the batch's mean reward. The module is left in eval mode, no grads."""
    stage = arms_stage(module) if stage is None else stage
    cfg = replace(module.grpo_cfg, beta=0.0)
    pert = Perturber(module.model.lm, setting.perturb_config())
    params = [p for p in module.model.parameters() if p.requires_grad]
    try:
        module.model.eval()
        seeds = torch.tensor([rollout_seed(seed, step, r.idx, j) for r in records for j in range(k)], dtype=torch.long)
        with torch.no_grad():
            rb = rollout(module.model, pert, module.layout, records, stage, seeds, k, setting.temperature,
                         cfg.max_new_tokens, module.reward_fn, module.tokenizer, cot_layout)
        adv = group_advantages(rb.rewards, cfg.advantage, std_kind=cfg.advantage_std).flatten().to(rb.mask.device)
        module.model.train()
        backward_micro_batches(module.model, pert, rb, adv, None, cfg, setting.temperature, 1.0, Tensor.backward)
        return _flat_grad(params), float(rb.rewards.float().mean())
    finally:
        pert.remove()
        _clear(module, params)


def sft_gradient(module, records: list, seed: int, step: int, stage: int | None = None,
                 cot_layout: bool = False) -> Tensor:
    """The supervised gradient of one batch (``sft_continue``'s: the arms' stage, the start's training masks).
    The module is left in eval mode, no grads."""
    stage = arms_stage(module) if stage is None else stage
    params = [p for p in module.model.parameters() if p.requires_grad]
    try:
        loss = supervised_loss(module.model, module.layout, records, stage, cot_layout, random.Random(f"{seed}/{step}"),
                               module.device, module.train_perturber, seed, step)
        loss.backward()
        return _flat_grad(params)
    finally:
        _clear(module, params)


def _clear(module, params: list[torch.nn.Parameter]) -> None:
    for p in params:
        p.grad = None
    module.model.eval()


def main(argv: list[str] | None = None) -> int:
    """``python -m lightning_latent.experiments.grad_signal CKPT``: the signal share of GRPO's gradient under
    temperature sampling, a frozen mask with greedy answers, and a mask with sampled answers, against the
    supervised gradient's; one JSON line per setting (``--out``: also a CSV)."""
    import argparse

    from ..checkpoints import load_module
    from ..data.synthetic import synthetic_record
    from .reporting import emit_rows

    ap = argparse.ArgumentParser(prog="python -m lightning_latent.experiments.grad_signal", description=main.__doc__)
    ap.add_argument("ckpt")
    ap.add_argument("--batches", type=int, default=8, help="independent batches per setting (>= 2)")
    ap.add_argument("--prompts", type=int, default=32, help="prompts per GRPO batch (records per supervised batch)")
    ap.add_argument("--k", type=int, default=4, help="rollouts per prompt")
    ap.add_argument("--p", type=float, default=0.1, help="the dropout arms' rollout rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="CSV file")
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    module = load_module(a.ckpt)
    syn = module.hparams["synthetic"]
    first = a.seed * 10**6  # another seed, other prompts (whatever --batches and --prompts)
    batches = [[synthetic_record(syn, "train", first + i) for i in range(b * a.prompts, (b + 1) * a.prompts)]
               for b in range(a.batches)]
    settings = [("temperature", DiversitySetting("temperature", 0.0, temperature=1.0)),
                ("dropout_greedy", DiversitySetting("dropout_greedy", a.p, temperature=0.0)),
                ("dropout_shared", DiversitySetting("dropout_shared", a.p, temperature=1.0))]
    rows = []
    for name, st in settings:
        out = [grpo_gradient(module, st, recs, a.k, a.seed, b) for b, recs in enumerate(batches)]
        rows.append({"gradient": f"grpo {name}", "p": st.strength, "answers": "greedy" if st.temperature == 0 else
                     f"T={st.temperature:g}", "batches": a.batches, "prompts": a.prompts, "k": a.k,
                     "reward": sum(r for _, r in out) / len(out), **signal_share(torch.stack([g for g, _ in out]))})
    grads = torch.stack([sft_gradient(module, recs, a.seed, b) for b, recs in enumerate(batches)])
    rows.append({"gradient": "sft (sft_continue)", "p": None, "answers": None, "batches": a.batches,
                 "prompts": a.prompts, "k": None, "reward": None, **signal_share(grads)})
    return emit_rows(rows, a.out)


if __name__ == "__main__":
    raise SystemExit(main())
