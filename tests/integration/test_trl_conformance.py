"""Agreement of ``lightning_latent.rl.loss`` with the installed TRL ``GRPOTrainer`` (pinned in the dev extra).

A tiny GPT-2 (two layers, random init, dropout 0) and one batch of B=4 prompts x K=4 completions with
padding on both sides (prompts of 2-4 tokens, left-padded; completions of 1-6 tokens, right-padded) and
rewards with two mixed groups (binary and non-binary) and two zero-variance groups (all 1, all 0).

TRL side, nothing re-implemented: a real ``GRPOTrainer`` is built; its generation is replaced by a fixed
``rollout_func`` (TRL's own hook for custom generation) returning our token ids, and the reward function
returns our rewards. ``_generate_and_score_completions`` then computes, as in training, the padded
tensors, TRL's advantages, the old log-probs (``num_iterations=2`` makes TRL compute them) and the
reference log-probs (TRL loads its reference model from ``config._name_or_path``, which points at a
saved perturbed copy). The policy then moves to other weights (as after an optimiser step) and
``_compute_loss`` gives TRL's loss, whose gradient is taken.

Our side, from the same token ids and rewards only: logits of the same model objects,
``sequence_logprobs`` (current, old, reference), ``group_advantages`` and ``grpo_loss``.

Compared: per-token log-probs on completion tokens, advantages, the loss value and every parameter
gradient, in float32 (TRL 1.16 computes log-probs in a chunked fused LM head that projects in float32
whatever the model dtype, so float64 agreement is not available), to 1e-6 absolute + 1e-5 relative.
Run with ``-s`` to see the largest differences per setting.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

trl = pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is marked experimental

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig as TRLGRPOConfig  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from conftest import tiny_gpt2  # noqa: E402
from lightning_latent.data.tokenizer import build_word_tokenizer  # noqa: E402
from lightning_latent.rl.loss import grpo_loss, group_advantages, sequence_logprobs  # noqa: E402

ATOL, RTOL = 1e-6, 1e-5
EPSILON = 0.2
MAX_COMPLETION_LENGTH = 8  # > the padded completion length T=6, so dr_grpo's constant is visible
B, K = 4, 4
REWARDS = [[1.0, 0.0, 0.0, 1.0],    # mixed, binary
           [1.0, 1.0, 1.0, 1.0],    # zero variance
           [0.5, 0.25, 1.0, 0.0],   # mixed, non-binary
           [0.0, 0.0, 0.0, 0.0]]    # zero variance
PROMPT_LENGTHS = [2, 3, 4, 3]
COMPLETION_LENGTHS = [[3, 1, 6, 2], [4, 4, 2, 5], [1, 6, 3, 3], [2, 5, 6, 1]]

# TRL loss_type -> our aggregation (one process, no gradient accumulation; see grpo_loss's docstring)
LOSS_MAP = {"grpo": "grpo", "dr_grpo": "dr_grpo", "dapo": "dapo", "bnpo": "dapo"}
# TRL scale_rewards -> our (mode, std_kind)
SCALE_MAP = {"group": ("std", "sample"), "none": ("mean", "population")}


def _perturbed(model, seed: int, scale: float):
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tokenizer, token ids, and the three weight sets: current, old (generation time), reference."""
    tok = build_word_tokenizer([f"w{i}" for i in range(60)])  # 64 ids; pad 0, eos 1
    vocab = len(tok)
    g = torch.Generator().manual_seed(0)
    prompt_ids = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
    completion_ids = [torch.randint(3, vocab, (n,), generator=g).tolist()
                      for row in COMPLETION_LENGTHS for n in row]
    for i, row in enumerate(COMPLETION_LENGTHS):  # shorter completions end with EOS, the longest is truncated
        for k, n in enumerate(row):
            if n < max(max(r) for r in COMPLETION_LENGTHS):
                completion_ids[i * K + k][-1] = tok.eos_token_id
    current = tiny_gpt2(vocab, seed=0)
    old = _perturbed(current, seed=1, scale=0.03)
    ref = _perturbed(current, seed=2, scale=0.03)
    ref_dir = tmp_path_factory.mktemp("trl") / "ref"
    ref.save_pretrained(ref_dir)
    return {"tok": tok, "prompt_ids": prompt_ids, "completion_ids": completion_ids,
            "current": current, "old": old, "ref": ref, "ref_dir": str(ref_dir),
            "out_dir": str(tmp_path_factory.mktemp("trl_out"))}


def _trl_run(world, loss_type: str, beta: float, scale_rewards: str, bias_correction_kl: bool,
             temperature: float):
    """TRL's inputs dict, loss and gradients, and the trainer (its model holds the current weights)."""
    prompts = [f"prompt {b}" for b in range(B)]
    ids_of = dict(zip(prompts, world["prompt_ids"]))

    def rollout(batch_prompts, trainer):
        return {"prompt_ids": [ids_of[p] for p in batch_prompts],
                "completion_ids": [list(c) for c in world["completion_ids"]], "logprobs": None}

    def reward(prompts, completions, target, **kwargs):
        return list(target)

    policy = copy.deepcopy(world["old"])  # generation happens under the old weights
    policy.config._name_or_path = world["ref_dir"]  # TRL builds its reference model from this path
    args = TRLGRPOConfig(
        output_dir=world["out_dir"], report_to=[], use_cpu=True, bf16=False, seed=0,
        per_device_train_batch_size=B * K, num_generations=K, num_iterations=2,
        max_completion_length=MAX_COMPLETION_LENGTH, temperature=temperature,
        loss_type=loss_type, beta=beta, epsilon=EPSILON, scale_rewards=scale_rewards,
        use_bias_correction_kl=bias_correction_kl, save_strategy="no", logging_strategy="no",
    )
    trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=args, processing_class=world["tok"],
                          train_dataset=Dataset.from_dict({"prompt": prompts}), rollout_func=rollout)
    assert trainer.model is policy and (trainer.ref_model is not None) == (beta != 0)
    trainer.model.train()
    rows = [{"prompt": prompts[b], "target": REWARDS[b][k]} for b in range(B) for k in range(K)]
    inputs = trainer._generate_and_score_completions(rows)
    assert "old_per_token_logps" in inputs
    assert ("ref_per_token_logps" in inputs) == (beta != 0)
    # The optimiser has moved the policy since generation: current weights, same module (fused head kept).
    trainer.model.load_state_dict(world["current"].state_dict())
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop otherwise
    params = [p for _, p in trainer.model.named_parameters()]
    loss = trainer._compute_loss(trainer.model, inputs)
    grads = torch.autograd.grad(loss, params)
    return trainer, inputs, loss.detach(), grads


def _ours(model, inputs, temperature: float):
    """Our per-token log-probs of the completion tokens under ``model`` (same ids and masks as TRL)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    t = inputs["completion_ids"].shape[1]
    logits = model(input_ids=ids, attention_mask=attn).logits[:, -t - 1:-1]
    return sequence_logprobs(logits, inputs["completion_ids"], temperature=temperature)


def _diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(max |a - b|, max |a - b| / |b| over entries with |b| > ATOL, max |a - b| / max |b|)."""
    a, b = a.double(), b.double()
    d = (a - b).abs()
    big = b.abs() > ATOL
    rel = (d[big] / b.abs()[big]).max().item() if big.any() else 0.0
    return d.max().item(), rel, d.max().item() / max(b.abs().max().item(), ATOL)


SETTINGS = [(lt, 0.0, sr, False, 1.0) for lt in LOSS_MAP for sr in SCALE_MAP] + [
    (lt, 0.04, sr, bc, 1.0) for lt in LOSS_MAP for sr in SCALE_MAP for bc in (False, True)
] + [("grpo", 0.04, "group", True, 0.7), ("dapo", 0.04, "none", False, 0.7)]


@pytest.mark.parametrize("loss_type, beta, scale_rewards, bias_correction_kl, temperature", SETTINGS)
def test_matches_trl(world, loss_type, beta, scale_rewards, bias_correction_kl, temperature) -> None:
    trainer, inputs, trl_loss, trl_grads = _trl_run(world, loss_type, beta, scale_rewards,
                                                    bias_correction_kl, temperature)
    model = trainer.model
    mask = inputs["completion_mask"].bool()
    n_tokens = int(mask.sum())
    assert int(inputs["num_items_in_batch"]) == n_tokens
    assert n_tokens < mask.numel()  # padding present

    # Advantages: ours from the same rewards.
    mode, std_kind = SCALE_MAP[scale_rewards]
    adv = group_advantages(torch.tensor(REWARDS), mode, eps=1e-4, std_kind=std_kind).reshape(-1)
    torch.testing.assert_close(adv, inputs["advantages"], atol=ATOL, rtol=RTOL)
    adv_diff = _diff(adv, inputs["advantages"])
    assert (adv.view(B, K)[[1, 3]] == 0).all() and (inputs["advantages"].view(B, K)[[1, 3]] == 0).all()

    # Per-token log-probs: current (TRL's forward of the same model), old and reference.
    with torch.no_grad():
        old_logp = _ours(world["old"], inputs, temperature)
        ref_logp = _ours(world["ref"], inputs, temperature)
        trl_logp = trainer._get_per_token_logps_and_entropies(
            model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), mask.shape[1])[0]
    logp = _ours(model, inputs, temperature)
    diffs = {"adv": adv_diff, "logp": _diff(logp.detach()[mask], trl_logp[mask]),
             "old_logp": _diff(old_logp[mask], inputs["old_per_token_logps"][mask])}
    torch.testing.assert_close(logp.detach()[mask], trl_logp[mask], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(old_logp[mask], inputs["old_per_token_logps"][mask], atol=ATOL, rtol=RTOL)
    if beta:
        diffs["ref_logp"] = _diff(ref_logp[mask], inputs["ref_per_token_logps"][mask])
        torch.testing.assert_close(ref_logp[mask], inputs["ref_per_token_logps"][mask], atol=ATOL, rtol=RTOL)

    # Loss and gradients.
    loss, stats = grpo_loss(
        logp, old_logp, adv, mask, ref_logp=ref_logp, beta=beta, epsilon=EPSILON,
        aggregation=LOSS_MAP[loss_type],  # type: ignore[arg-type]
        max_tokens=MAX_COMPLETION_LENGTH if loss_type == "dr_grpo" else None,
        kl_importance_ratio=bias_correction_kl,
    )
    grads = torch.autograd.grad(loss, [p for _, p in model.named_parameters()])
    # The batch exercises the clip on both sides and keeps the KL clamp out of play.
    assert 0 < stats["clip_frac_low"] and 0 < stats["clip_frac_high"] and stats["clip_frac"] < 0.5
    assert stats["kl_clamped"] == 0
    diffs["loss"] = _diff(loss.detach().reshape(1), trl_loss.reshape(1))
    g_ours, g_trl = torch.cat([g.reshape(-1) for g in grads]), torch.cat([g.reshape(-1) for g in trl_grads])
    diffs["grad"] = _diff(g_ours, g_trl)
    print(f"\n[trl {trl.__version__}] loss_type={loss_type} beta={beta} scale_rewards={scale_rewards} "
          f"bias_correction_kl={bias_correction_kl} T={temperature}: loss={trl_loss.item():.6g} "
          f"|grad|max={g_trl.abs().max().item():.3g} clip_frac={stats['clip_frac'].item():.3f}")
    for name, (a, r, n) in diffs.items():
        print(f"    {name:9s} max abs {a:.2e}  max rel {r:.2e}  max abs / max|trl| {n:.2e}")
    torch.testing.assert_close(loss.detach(), trl_loss, atol=ATOL, rtol=RTOL)
    for g, h in zip(grads, trl_grads):
        torch.testing.assert_close(g, h, atol=ATOL, rtol=RTOL)
    assert g_trl.abs().max() > 1e-3  # a real gradient, not a trivially equal zero


def test_population_vs_sample_std_convention(world) -> None:
    """TRL's group std is the sample std; our default the population std: a sqrt(K/(K-1)) factor."""
    trainer, inputs, _, _ = _trl_run(world, "grpo", 0.0, "group", False, 1.0)
    r = torch.tensor(REWARDS)
    ours_default = group_advantages(r, "std", eps=1e-12)
    ours_sample = group_advantages(r, "std", eps=1e-12, std_kind="sample")
    mixed = torch.tensor([0, 2])
    torch.testing.assert_close(ours_default[mixed] / ours_sample[mixed],
                               torch.full((2, K), (K / (K - 1)) ** 0.5), atol=1e-5, rtol=1e-5)
    # ... and TRL's advantages are the sample-std ones, not the default (population) ones.
    trl_adv = inputs["advantages"].view(B, K)
    torch.testing.assert_close(trl_adv, group_advantages(r, "std", std_kind="sample"), atol=ATOL, rtol=RTOL)
    assert (trl_adv[mixed] - group_advantages(r, "std")[mixed]).abs().max() > 0.05
