"""lightning_latent/rl/rollout.py: rollouts (prompts x K under per-row perturbations), the replay of their
log-probs, truncated rollouts, and rollouts of GRPO on a CoT model (stage 0, the CoT prompt).

A tiny random GPT-2 over the synthetic word tokenizer; rewards are a deterministic function of the
decoded text with several levels, so equal rollouts give exactly equal rewards and different ones
usually do not.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from lightning_latent.data.datamodule import LatentDataModule
from lightning_latent.data.layout import CurriculumConfig, Layout
from lightning_latent.model.latent_lm import LatentLM, positions_from_mask
from lightning_latent.model.perturb import PerturbConfig, Perturber
from lightning_latent.rl.loss import group_advantages, group_stats, grpo_loss, sequence_logprobs
from lightning_latent.rl.rewards import REWARDS
from lightning_latent.rl.rollout import replay_logprobs, rollout, rollout_seed, rollout_stats
from lightning_latent.schedule import Phase

from conftest import tiny_gpt2
from cot_start import SYN, grpo_from, tiny

B, K, NEW = 4, 4, 6
STAGE = 4  # past max_latent_stage=3: every step latent, 3 thoughts for a 3-step record


def text_reward(texts, golds):
    """A deterministic, multi-level reward of the decoded text (ignores the gold)."""
    return torch.tensor([float(sum(map(ord, t)) % 5) / 4.0 for t in texts])


@pytest.fixture()
def setup(word_tokenizer, synth_records):
    lay = Layout(word_tokenizer, CurriculumConfig(c_thought=1, max_latent_stage=3), max_length=256)

    def make(seed=0, dropout=0.0):
        lm = tiny_gpt2(len(word_tokenizer), seed=seed)
        lm.config.resid_pdrop = lm.config.embd_pdrop = lm.config.attn_pdrop = dropout
        if dropout:  # rebuild so the modules pick the rates up
            lm = type(lm)(lm.config)
            torch.manual_seed(seed)
            lm.apply(lm._init_weights)
        m = LatentLM(lm, lay.latent_id, lay.start_id, lay.end_id).eval()
        return m

    def seeds(records, k=K, base=0):
        return torch.tensor([rollout_seed(base, 0, r.idx, j) for r in records for j in range(k)], dtype=torch.long)

    def run(model, pert, records, temperature, k=K, sd=None):
        sd = seeds(records, k) if sd is None else sd
        return rollout(model, pert, lay, records, STAGE, sd, k, temperature, NEW, text_reward, word_tokenizer)

    return lay, make, seeds, run, synth_records[:B]


def _groups(x, k=K):
    return x.view(-1, k, *x.shape[1:])


def test_none_greedy_collapses(setup):
    lay, make, seeds, run, recs = setup
    model = make()
    pert = Perturber(model.lm, PerturbConfig(arm="none"))
    rb = run(model, pert, recs, temperature=0.0)
    n_lat = [int((r == lay.latent_id).sum()) for r in rb.prompt_ids]
    assert n_lat == [3] * (B * K)
    assert rb.tokens.shape[0] == B * K and rb.rewards.shape == (B, K)
    assert len(set(rb.seeds.tolist())) == B * K
    for g_tok, g_th, g_lp in zip(_groups(rb.tokens), _groups(rb.final_thought), _groups(rb.logprobs)):
        for j in range(1, K):
            assert torch.equal(g_tok[j], g_tok[0])
            assert (g_th[j] - g_th[0]).abs().max().item() < 1e-6
            assert (g_lp[j] - g_lp[0]).abs().max().item() < 1e-6
    # different prompts, different thoughts (the rollouts are not trivially constant)
    th = _groups(rb.final_thought)[:, 0]
    assert torch.cdist(th, th).fill_diagonal_(1.0).min().item() > 1e-3
    for mode in ("mean", "std", "none"):
        adv = group_advantages(rb.rewards, mode)
        assert torch.equal(adv, torch.zeros_like(adv)), mode
    assert group_stats(rb.rewards)["frac_zero_std"].item() == 1.0
    # greedy: every token is the argmax, so its log-prob is the max log-prob (<= 0)
    assert (rb.logprobs <= 0).all()


def test_dropout_shared_rollouts_differ(setup):
    lay, make, seeds, run, recs = setup
    model = make()
    pert = Perturber(model.lm, PerturbConfig(arm="dropout_shared", p=0.3, sites=["attn", "mlp"]))
    rb = run(model, pert, recs, temperature=0.0)  # greedy: only the masks can make rollouts differ
    for g in _groups(rb.final_thought):
        d = torch.cdist(g, g).fill_diagonal_(1.0)
        assert d.min().item() > 1e-3  # every rollout of every group has its own thought
    differing = [len({tuple(t.tolist()) for t in g}) > 1 for g in _groups(rb.tokens)]
    assert any(differing)
    # the same seeds give the same rollouts (replayable sampling of the action, masks included)
    rb2 = run(model, pert, recs, temperature=0.0)
    assert torch.equal(rb2.tokens, rb.tokens) and torch.equal(rb2.final_thought, rb.final_thought)
    # and without the perturber the collapse comes back
    rb0 = run(model, None, recs, temperature=0.0)
    for g in _groups(rb0.tokens):
        assert all(torch.equal(g[j], g[0]) for j in range(K))


def _answer_gap(logp, batch):
    m = batch.mask.bool()
    return (logp.detach() - batch.logprobs).abs()[m].max().item()


def test_replay_gap(setup):
    lay, make, seeds, run, recs = setup
    model = make(dropout=0.1)  # the base model's own dropout must stay off in rollouts and replays
    pert = Perturber(model.lm, PerturbConfig(arm="dropout_shared", p=0.2))
    rb = run(model, pert, recs, temperature=1.0)
    assert rb.mask.sum() > B * K  # several answer tokens per rollout
    model.train()
    assert model.training and not model.lm.training
    logp, ent = replay_logprobs(model, pert, rb, 1.0, with_entropy=True)
    assert logp.requires_grad
    assert _answer_gap(logp, rb) <= 1e-5
    assert ent.shape == logp.shape and (ent[rb.mask.bool()] > 0).all()
    # on the first inner iteration every ratio is 1: no clipping
    adv = group_advantages(rb.rewards).flatten()
    loss, st = grpo_loss(logp, rb.logprobs, adv, rb.mask.float())
    assert abs(st["ratio_min"].item() - 1) < 1e-4 and abs(st["ratio_max"].item() - 1) < 1e-4
    assert st["clip_frac"].item() == 0.0
    # redrawn masks (other seeds) or no masks at all do not reproduce the rollout's log-probs
    redrawn = dataclasses.replace(rb, seeds=rb.seeds + 1)
    with torch.no_grad():
        assert _answer_gap(replay_logprobs(model, pert, redrawn, 1.0)[0], rb) >= 1e-2
        assert _answer_gap(replay_logprobs(model, None, rb, 1.0)[0], rb) >= 1e-2
    # the base model in train mode (its own dropout on) would break replay: LatentLM prevents it
    model.set_base_dropout(True)
    assert model.lm.training
    with torch.no_grad():
        torch.manual_seed(0)
        assert _answer_gap(replay_logprobs(model, pert, rb, 1.0)[0], rb) > 1e-3
    model.set_base_dropout(False)
    assert not model.lm.training


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batched_rollouts_equal_one_at_a_time(setup, temperature):
    lay, make, seeds, run, recs = setup
    model = make(seed=1)
    pert = Perturber(model.lm, PerturbConfig(arm="dropout_shared", p=0.2))
    recs3, k = recs[:3], 2
    sd = seeds(recs3, k)
    rb = run(model, pert, recs3, temperature, k=k, sd=sd)
    lens = rb.prompt_mask.sum(1)
    assert len(set(lens.tolist())) > 1  # left padding in the batch
    for i in range(len(recs3) * k):
        one = run(model, pert, [recs3[i // k]], temperature, k=1, sd=sd[i:i + 1])
        n = int(one.mask.sum())
        assert int(rb.mask[i].sum()) == n
        assert rb.tokens[i, :n].tolist() == one.tokens[0, :n].tolist(), f"row {i}"
        assert (rb.logprobs[i, :n] - one.logprobs[0, :n]).abs().max().item() <= 1e-5
        assert (rb.final_thought[i] - one.final_thought[0]).abs().max().item() <= 1e-5
        assert rb.rewards.flatten()[i].item() == one.rewards.flatten()[0].item()


def _capture(pert):
    passes = []
    orig = pert.begin_pass

    def begin_pass(step, n_cols, answer_from, dim, device, dtype):
        orig(step, n_cols, answer_from, dim, device, dtype)
        passes.append((n_cols, answer_from, {k: v.clone() for k, v in pert._factors.items()}))

    pert.begin_pass = begin_pass
    return passes


def test_scope_latent_leaves_answer_unperturbed(setup):
    lay, make, seeds, run, recs = setup
    model = make(seed=2)
    lat = Perturber(model.lm, PerturbConfig(arm="dropout_shared", p=0.3, scope="latent"))
    passes = _capture(lat)
    rb = run(model, lat, recs, temperature=1.0)
    n_prompt_passes = 1 + 3 + 1  # prefix, 3 thoughts, end marker
    assert len(passes) == n_prompt_passes + rb.tokens.shape[1] - 1
    for n_cols, af, f in passes[:n_prompt_passes]:
        assert af is None and len(f) == 4  # attn, mlp x 2 layers: prefill and latent phase perturbed
    for n_cols, af, f in passes[n_prompt_passes:]:
        assert af == 0 and f == {}  # answer decoding: off
    lat.begin_pass = type(lat).begin_pass.__get__(lat)
    # replay: the answer columns of the last pass are unperturbed ...
    logp_lat, _ = replay_logprobs(model, lat, rb, 1.0)
    assert _answer_gap(logp_lat, rb) <= 1e-5
    # ... which is the same as: prompt with masks (cache), then the answer with no perturbation
    tp = rb.prompt_ids.shape[1]
    with torch.no_grad():
        with lat.rows(rb.seeds):
            out = model(rb.prompt_ids, rb.prompt_mask, positions_from_mask(rb.prompt_mask), perturber=lat,
                        return_cache=True)
        am = torch.cat([rb.prompt_mask, rb.mask.to(rb.prompt_mask.dtype)], 1)
        pos = positions_from_mask(am)[:, tp:]
        h = model._run(model.lm.get_input_embeddings()(rb.tokens), am, pos, out.cache)
        logits = torch.cat([out.logits[:, -1:], model.lm.get_output_embeddings()(h[:, :-1])], 1)
        manual = sequence_logprobs(logits, rb.tokens, 1.0)
    m = rb.mask.bool()
    assert (manual - logp_lat.detach()).abs()[m].max().item() <= 1e-5
    # scope "all": the same masks also on the answer -> the first answer token (predicted from the
    # prompt) is unchanged, later ones differ
    full = Perturber(model.lm, PerturbConfig(arm="dropout_shared", p=0.3, scope="all"))
    with torch.no_grad():
        logp_all, _ = replay_logprobs(model, full, rb, 1.0)
    assert (logp_all[:, 0] - logp_lat[:, 0].detach()).abs().max().item() <= 1e-5
    assert (logp_all - logp_lat.detach()).abs()[:, 1:][m[:, 1:]].max().item() > 1e-3
    # and scope "all" replays its own rollouts exactly, with the answer passes perturbed
    passes = _capture(full)
    rb_all = run(model, full, recs, temperature=1.0)
    assert all(len(f) == 4 for _, _, f in passes)
    for _, af, f in passes[n_prompt_passes:]:
        for key in f:
            assert torch.equal(f[key], passes[0][2][key])  # the shared mask, on the answer too
    full.begin_pass = type(full).begin_pass.__get__(full)
    with torch.no_grad():
        assert _answer_gap(replay_logprobs(model, full, rb_all, 1.0)[0], rb_all) <= 1e-5


def test_gaussian_arm_changes_thoughts_and_replays(setup):
    lay, make, seeds, run, recs = setup
    model = make(seed=3)
    pert = Perturber(model.lm, PerturbConfig(arm="gaussian", noise_scale=0.5))
    assert not pert._handles  # only the fed-back thoughts are perturbed, no hooks
    rb = run(model, pert, recs, temperature=0.0)
    for g in _groups(rb.final_thought):
        assert torch.cdist(g, g).fill_diagonal_(1.0).min().item() > 1e-3
    base = run(model, None, recs, temperature=0.0)
    assert (base.final_thought - rb.final_thought).abs().max().item() > 1e-2
    rs = run(model, pert, recs, temperature=1.0)
    with torch.no_grad():
        assert _answer_gap(replay_logprobs(model, pert, rs, 1.0)[0], rs) <= 1e-5
        redrawn = dataclasses.replace(rs, seeds=rs.seeds + 1)
        assert _answer_gap(replay_logprobs(model, pert, redrawn, 1.0)[0], rs) >= 1e-2


def test_dropout_per_step_replays(setup):
    lay, make, seeds, run, recs = setup
    model = make(seed=4)
    pert = Perturber(model.lm, PerturbConfig(arm="dropout_per_step", p=0.2, sites=["attn", "mlp", "thought"]))
    rb = run(model, pert, recs, temperature=1.0)
    with torch.no_grad():
        assert _answer_gap(replay_logprobs(model, pert, rb, 1.0)[0], rb) <= 1e-5


def test_replay_treats_generated_latent_ids_as_tokens(setup):
    """A sampled answer may contain the ``<|latent|>`` id; generation embeds it as an ordinary token,
    and the replay must do the same (not feed back a thought there)."""
    from lightning_latent.data.layout import collate_prompts
    from lightning_latent.rl.rollout import RolloutBatch

    lay, make, seeds, run, recs = setup
    model = make(seed=5)
    pert = Perturber(model.lm, PerturbConfig(arm="dropout_shared", p=0.2))
    pb = collate_prompts([lay.prompt(r, STAGE) for r in recs[:2]], lay.pad_id)
    ids, am = pb["input_ids"], pb["attention_mask"]
    tokens = torch.tensor([[7, lay.latent_id, 9, lay.latent_id, lay.eos_id], [lay.latent_id, 8, lay.eos_id, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    sd = torch.tensor([123, 456])
    with torch.no_grad():  # what generate computes for these tokens: cached, token embeddings
        with pert.rows(sd):
            out = model(ids, am, positions_from_mask(am), perturber=pert, return_cache=True)
        am_full = torch.cat([am, mask], 1)
        h = model._run(model.lm.get_input_embeddings()(tokens), am_full, positions_from_mask(am_full)[:, ids.shape[1]:],
                       out.cache)
        logits = torch.cat([out.logits[:, -1:], model.lm.get_output_embeddings()(h[:, :-1])], 1)
        expected = sequence_logprobs(logits, tokens, 1.0) * mask
    batch = RolloutBatch(ids, am, sd, tokens, expected, mask, torch.zeros(2, 1), [None, None], ["1", "2"], None)
    with torch.no_grad():
        logp, _ = replay_logprobs(model, pert, batch, 1.0)
    assert _answer_gap(logp, batch) <= 1e-5


# --------------------------------------------------------------------------------------------------
# From a trained CoT start (cot_start.py): truncated rollouts, GRPO on a CoT model
# --------------------------------------------------------------------------------------------------


def test_grpo_at_stage_0_uses_the_cot_prompt(cot_ckpt):
    m = tiny([Phase("cot", steps=1), Phase("grpo", steps=1, stages=[0])])
    cot_seg, grpo_seg = m.segments
    assert cot_seg.cot_layout and grpo_seg.cot_layout
    recs = LatentDataModule(synthetic=SYN, val_limit=4).eval_records("validation")
    m.step_count = 1  # in the GRPO segment
    assert m.eval_stage() == (0, True)
    rb = rollout(m.model, m.perturber, m.layout, recs, 0, torch.arange(8), 2, 1.0, 4, REWARDS["exact_match"],
                 m.tokenizer, cot=grpo_seg.cot_layout)
    for i, r in enumerate(recs):
        cot_prompt = m.layout.prompt(r, cot_seg.stage, cot=True)  # what the CoT phase trained and evaluated with
        row = rb.prompt_ids[2 * i][rb.prompt_mask[2 * i].bool()].tolist()
        assert row == cot_prompt
        assert m.layout.start_id not in row and m.layout.end_id not in row


def test_truncated_rollouts_are_counted(cot_ckpt):
    m = grpo_from(cot_ckpt)
    recs = LatentDataModule(synthetic=SYN, val_limit=8).eval_records("validation")
    seeds = torch.tensor([rollout_seed(0, 0, r.idx, j) for r in recs for j in range(2)])
    for max_new in (3, 16):
        rb = rollout(m.model, m.perturber, m.layout, recs, 0, seeds, 2, 1.0, max_new, REWARDS["exact_match"],
                     m.tokenizer, cot=True)
        lengths = rb.mask.sum(1)
        ended = [m.layout.eos_id in rb.tokens[i, : int(lengths[i])].tolist() for i in range(len(seeds))]
        assert rb.truncated.tolist() == [not e for e in ended]
        frac = rollout_stats(rb, 1.0)["grpo/truncated_frac"]
        assert frac == pytest.approx(sum(not e for e in ended) / len(ended))
        if max_new == 3:  # an answer here is about 12 tokens: every rollout is cut off
            assert frac == 1.0 and float(rb.rewards.sum()) == 0.0
        else:
            assert frac < 0.5
