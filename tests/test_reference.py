"""lightning_latent/rl/reference.py: the frozen GRPO reference: a copy of the policy when its phase started
(or of saved weights), without gradients, scoring rollouts under their own perturbations."""
from __future__ import annotations

import torch

from lightning_latent.model.perturb import PerturbConfig, Perturber
from lightning_latent.rl.reference import Reference
from lightning_latent.rl.rollout import replay_logprobs, rollout, rollout_seed


def _batch(model, pert, layout, word_tokenizer, recs):
    seeds = torch.tensor([rollout_seed(0, 0, r.idx, j) for r in recs for j in range(2)])
    reward = lambda texts, golds: torch.zeros(len(texts))  # noqa: E731
    return rollout(model, pert, layout, recs, 3, seeds, 2, 1.0, 5, reward, word_tokenizer)


def test_reference_is_a_frozen_copy_that_scores_like_the_policy_did(make_latent_lm, layout, word_tokenizer,
                                                                   synth_records):
    policy = make_latent_lm(seed=3)
    cfg = PerturbConfig(arm="dropout_shared", p=0.3)
    pert = Perturber(policy.lm, cfg)
    rb = _batch(policy, pert, layout, word_tokenizer, synth_records[:2])
    ref = Reference(policy, cfg)
    assert all(not p.requires_grad for p in ref.model.parameters()) and not ref.model.training
    assert ref.model is not policy and ref.model.lm is not policy.lm
    perturbed, plain = ref.logprobs(rb, 1.0, True), ref.logprobs(rb, 1.0, False)
    m = rb.mask.bool()
    # under the rows' own masks the reference reproduces the rollout's log-probs; without them it does not
    assert (perturbed - rb.logprobs).abs()[m].max() <= 1e-5
    assert (plain - rb.logprobs).abs()[m].max() > 1e-3
    # the policy moves on; the reference does not
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05)
    assert torch.equal(ref.logprobs(rb, 1.0, True), perturbed)
    moved, _ = replay_logprobs(policy, pert, rb, 1.0)
    assert (moved.detach() - perturbed).abs()[m].max() > 1e-3
    # a resumed run rebuilds the same reference from the saved state, whatever the policy holds now
    again = Reference(policy, cfg, ref.state)
    assert torch.equal(again.logprobs(rb, 1.0, True), perturbed)


def test_reference_scores_bit_for_bit_like_the_policy_at_equal_weights(make_latent_lm, layout, word_tokenizer,
                                                                       synth_records):
    """At the phase's start the reference IS the policy, so the KL term and its gradient must be exactly 0:
    Adam turns even a 1e-8 gradient into an lr-sized step, and an arm without signal (``none``) would then
    drift on rounding alone. The reference's weights do not require grad and the policy's do, which selects
    another GEMM path in torch's matmul for a non-contiguous 3-D input (the slice from ``logits_from``) and,
    on some CPUs, other rounding: so the output embedding must see a contiguous input."""
    policy = make_latent_lm(seed=3)
    cfg = PerturbConfig(arm="dropout_shared", p=0.3)
    pert = Perturber(policy.lm, cfg)
    rb = _batch(policy, pert, layout, word_tokenizer, synth_records[:2])
    seen = []
    hook = policy.lm.get_output_embeddings().register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        logp, _ = replay_logprobs(policy, pert, rb, 1.0)
    finally:
        hook.remove()
    assert seen and all(x.is_contiguous() for x in seen)  # the machine-independent half of the guarantee
    ref = Reference(policy, cfg)
    assert torch.equal(ref.logprobs(rb, 1.0, True), logp.detach())
