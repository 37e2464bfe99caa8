"""lightning_latent/model/latent_lm.py: the Coconut recurrence (LatentLM) and batched generation.

* the reference Coconut fixture is reproduced (logits, losses, gradient norms, our collation);
* the KV-cached, batched recurrence equals a naive recompute-everything implementation (logits and
  gradients) on left-padded rows with different numbers of thoughts;
* batched generation equals one-at-a-time generation (greedy and seeded sampling).

The layout (token lists at every stage) is tested in test_layout.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_latent.data.layout import IGNORE, CurriculumConfig, Layout, collate_prompts, collate_train
from lightning_latent.model.latent_lm import LatentLM, generate, positions_from_mask

from conftest import FIXTURE_DIR, tiny_gpt2

# --------------------------------------------------------------------------------------------------
# The reference Coconut fixture
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ref_model(coconut_fixture):
    from safetensors.torch import load_file

    cfg = GPT2Config(**coconut_fixture["config"])
    lm = GPT2LMHeadModel(cfg)
    missing, unexpected = lm.load_state_dict(load_file(str(FIXTURE_DIR / "model.safetensors")), strict=False)
    assert missing == ["lm_head.weight"] and not unexpected
    lm.tie_weights()
    lm.eval()
    sp = coconut_fixture["special_tokens"]
    return LatentLM(lm, sp["latent"], sp["start_latent"], sp["end_latent"]).eval()


def _ce_sum(logits, labels):
    return F.cross_entropy(logits[:-1].double(), labels[1:], ignore_index=IGNORE, reduction="sum")


def test_reference_examples_unpadded(ref_model, coconut_fixture):
    n_lat = []
    for ex in coconut_fixture["examples"]:
        ids = torch.tensor([ex["input_ids"]])
        labels = torch.tensor(ex["labels"])
        with torch.no_grad():
            out = ref_model(ids)
        ref = torch.tensor(ex["logits"])
        assert out.logits.shape[1:] == ref.shape
        assert (out.logits[0] - ref).abs().max().item() < 1e-5
        assert _ce_sum(out.logits[0], labels).item() == pytest.approx(ex["loss_sum"], abs=1e-5 * ex["n_label_tokens"])
        n_lat.append(ex["input_ids"].count(coconut_fixture["special_tokens"]["latent"]))
    assert n_lat == [3, 2, 3, 0]


def test_reference_batch_with_our_collation(ref_model, coconut_fixture):
    exs = coconut_fixture["examples"]
    sp = coconut_fixture["special_tokens"]
    b = collate_train([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in exs], sp["pad"], sp["latent"])
    # our collator builds exactly the reference collator's batch
    for k in ("input_ids", "labels", "attention_mask", "position_ids"):
        assert b[k].tolist() == coconut_fixture["reference_batch"][k], k
    with torch.no_grad():
        out = ref_model(b["input_ids"], b["attention_mask"], b["position_ids"])
    for i, ex in enumerate(exs):
        valid = b["attention_mask"][i].bool()
        got = out.logits[i][valid]
        assert (got - torch.tensor(ex["logits"])).abs().max().item() < 1e-5, f"example {i}"
    loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=IGNORE)
    assert loss.item() == pytest.approx(coconut_fixture["reference_batch_loss"], abs=1e-5)


def test_reference_batch_loss_and_grad_norms(ref_model, coconut_fixture):
    b = {k: torch.tensor(v) for k, v in coconut_fixture["reference_batch"].items()}
    ref_model.zero_grad(set_to_none=True)
    out = ref_model(b["input_ids"], b["attention_mask"], b["position_ids"])
    loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=IGNORE)
    assert loss.item() == pytest.approx(coconut_fixture["reference_batch_loss"], abs=1e-5)
    loss.backward()
    params = dict(ref_model.lm.named_parameters())
    assert len(coconut_fixture["reference_grad_norms"]) == 2
    for name, expected in coconut_fixture["reference_grad_norms"].items():
        got = params[name].grad.norm().item()
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-5), name
    ref_model.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------------------
# KV-cached recurrence == naive recomputation
# --------------------------------------------------------------------------------------------------

V, S_ID, E_ID, L_ID = 64, 61, 62, 63


def naive_latent_logits(lm, ids, am, pos, latent_id):
    """Coconut the slow way: before filling each latent column, rerun the whole model on everything
    to its left and take the last hidden state at the previous position; then one full pass."""
    emb = lm.get_input_embeddings()(ids)
    is_lat = ids == latent_id
    for c in sorted(set(is_lat.any(0).nonzero().flatten().tolist())):
        h = lm.base_model(inputs_embeds=emb[:, :c], attention_mask=am[:, :c], position_ids=pos[:, :c],
                          use_cache=False).last_hidden_state
        fill = torch.where(is_lat[:, c, None], h[:, c - 1], emb[:, c])
        emb = torch.cat([emb[:, :c], fill[:, None], emb[:, c + 1:]], 1)
    h = lm.base_model(inputs_embeds=emb, attention_mask=am, position_ids=pos, use_cache=False).last_hidden_state
    return lm.get_output_embeddings()(h)


ROWS = [
    [5, 6, 7, 8, S_ID, L_ID, L_ID, L_ID, E_ID, 10, 11, 12, 1],
    [9, 10, S_ID, L_ID, E_ID, 13, 14, 15, 16, 17, 18, 1],
    [20, 21, 22, 23, 24, 25, 26, S_ID, E_ID, 30, 31, 1],
]


def _batch(padding: str):
    if padding == "left":
        pb = collate_prompts(ROWS, 0)
        am = pb["attention_mask"]
        return pb["input_ids"], am, positions_from_mask(am)
    b = collate_train([{"input_ids": r, "labels": r} for r in ROWS], 0, L_ID)
    return b["input_ids"], b["attention_mask"], b["position_ids"]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("padding", ["left", "aligned"])
def test_kv_cached_equals_naive(padding, attn):
    lm = tiny_gpt2(V, seed=3)
    lm.config._attn_implementation = attn
    model = LatentLM(lm, L_ID, S_ID, E_ID).eval()
    ids, am, pos = _batch(padding)
    # the latent slots sit in different columns, and rows have 3, 1 and 0 thoughts
    lat_cols = [set((r == L_ID).nonzero().flatten().tolist()) for r in ids]
    assert [len(c) for c in lat_cols] == [3, 1, 0]
    if padding == "left":
        assert not lat_cols[1] <= lat_cols[0]
    else:
        assert min(lat_cols[0]) == min(lat_cols[1])
    valid = am.bool()
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        lm.to(dtype)
        torch.manual_seed(0)
        proj = torch.randn(ids.shape[0], ids.shape[1], V, dtype=dtype)

        def loss_and_grads(fn):
            lm.zero_grad(set_to_none=True)
            logits = fn()
            (logits * proj * valid[..., None]).sum().backward()
            return logits.detach(), {n: p.grad.clone() for n, p in lm.named_parameters()}

        fast, g_fast = loss_and_grads(lambda: model(ids, am, pos).logits)
        slow, g_slow = loss_and_grads(lambda: naive_latent_logits(lm, ids, am, pos, L_ID))
        assert (fast[valid] - slow[valid]).abs().max().item() < tol
        assert g_fast.keys() == g_slow.keys()
        for n in g_fast:
            # gradients are O(10-100) here: compare relative to each tensor's largest entry
            scale = max(1.0, g_slow[n].abs().max().item())
            err = (g_fast[n] - g_slow[n]).abs().max().item() / scale
            assert err < tol, f"{dtype} {n}: {err}"
        # the gradient reaches the position embeddings of thought positions, i.e. it is not all zero
        assert g_fast["transformer.wpe.weight"].abs().sum() > 0
    lm.to(torch.float32)
    # the thoughts matter: a pause-token model (no feedback) gives different logits
    with torch.no_grad():
        pause = LatentLM(lm, L_ID, S_ID, E_ID, feedback=False)(ids, am, pos).logits
        slow = naive_latent_logits(lm, ids, am, pos, L_ID)
    assert (pause[valid] - slow[valid]).abs().max().item() > 1e-2


def _grads_of(model, lm, ids, am, pos, proj, valid, pert=None, seeds=None, answer_from=None):
    """Logits and every parameter's gradient of a fixed projection of the logits. The perturber's rows
    end before backward, as in the GRPO update (a checkpointed pass must not depend on them then)."""
    lm.zero_grad(set_to_none=True)
    if pert is not None:
        with pert.rows(seeds):
            logits = model(ids, am, pos, perturber=pert, answer_from=answer_from).logits
    else:
        logits = model(ids, am, pos).logits
    (logits * proj * valid[..., None]).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("padding", ["left", "aligned"])
@pytest.mark.parametrize("arm", ["none", "dropout_shared", "dropout_per_step", "gaussian"])
def test_checkpointed_latent_passes_give_the_same_logits_and_gradients(padding, attn, arm):
    from lightning_latent.model.perturb import PerturbConfig, Perturber

    lm = tiny_gpt2(V, seed=5)
    lm.config._attn_implementation = attn
    plain = LatentLM(lm, L_ID, S_ID, E_ID).eval()
    ckpt = LatentLM(lm, L_ID, S_ID, E_ID, checkpoint_latents=True).eval()
    ids, am, pos = _batch(padding)
    valid = am.bool()
    torch.manual_seed(1)
    proj = torch.randn(ids.shape[0], ids.shape[1], V)
    pert = seeds = answer_from = None
    if arm != "none":
        pert = Perturber(lm, PerturbConfig(arm=arm, p=0.3, sites=["attn", "mlp", "thought"], noise_scale=0.5))
        seeds = torch.tensor([11, 12, 13])
        answer_from = ids.shape[1] - 2
    a, ga = _grads_of(plain, lm, ids, am, pos, proj, valid, pert, seeds, answer_from)
    b, gb = _grads_of(ckpt, lm, ids, am, pos, proj, valid, pert, seeds, answer_from)
    assert torch.equal(a, b)
    assert ga.keys() == gb.keys() and len(ga) > 0
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-5, atol=1e-6, msg=n)
    if pert is not None:
        # the perturbation is really on: without it the logits differ
        c, _ = _grads_of(plain, lm, ids, am, pos, proj, valid)
        assert (c[valid] - a[valid]).abs().max() > 1e-3


def test_checkpointed_latent_passes_replay_the_base_dropout():
    """Supervised phases use the base model's own dropout: the recomputation must draw the same masks."""
    torch.manual_seed(5)
    cfg = GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.3,
                     embd_pdrop=0.3, attn_pdrop=0.3, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    lm = GPT2LMHeadModel(cfg)
    ids, am, pos = _batch("aligned")
    valid = am.bool()
    proj = torch.randn(ids.shape[0], ids.shape[1], V)
    out = []
    for flag in (False, True):
        model = LatentLM(lm, L_ID, S_ID, E_ID, checkpoint_latents=flag).train()
        model.set_base_dropout(True)
        torch.manual_seed(7)
        out.append(_grads_of(model, lm, ids, am, pos, proj, valid))
    (a, ga), (b, gb) = out
    assert torch.equal(a, b)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("ckpt", [False, True])
def test_an_unperturbed_forward_ignores_a_perturber_left_active(ckpt):
    """``perturber=None`` means unperturbed, even while a Perturber on the same model is inside its
    ``rows`` with factors left by a perturbed pass, in the forward and in a checkpointed recomputation."""
    from lightning_latent.model.perturb import PerturbConfig, Perturber

    lm = tiny_gpt2(V, seed=5)
    lm.config._attn_implementation = "sdpa"
    pert = Perturber(lm, PerturbConfig(arm="dropout_shared", p=0.3, sites=["attn", "mlp"]))
    model = LatentLM(lm, L_ID, S_ID, E_ID, checkpoint_latents=ckpt).eval()
    ids, am, pos = _batch("left")
    valid = am.bool()
    proj = torch.randn(ids.shape[0], ids.shape[1], V, generator=torch.Generator().manual_seed(2))
    clean, g_clean = _grads_of(LatentLM(lm, L_ID, S_ID, E_ID).eval(), lm, ids, am, pos, proj, valid)
    lm.zero_grad(set_to_none=True)
    with pert.rows(torch.tensor([7, 8, 9])):
        with torch.no_grad():
            perturbed = model(ids, am, pos, perturber=pert).logits  # leaves the last pass's factors behind
        assert pert._factors
        logits = model(ids, am, pos).logits
        (logits * proj * valid[..., None]).sum().backward()
    assert (perturbed[valid] - clean[valid]).abs().max() > 1e-3
    assert torch.equal(logits.detach(), clean)
    for n, p in lm.named_parameters():
        torch.testing.assert_close(p.grad, g_clean[n], rtol=1e-5, atol=1e-6, msg=n)


def test_a_thought_in_column_0_is_refused_by_name():
    lm = tiny_gpt2(V, seed=5)
    ids = torch.tensor([[L_ID, L_ID, E_ID, 5, 6]])
    with pytest.raises(ValueError, match="column 0"):
        LatentLM(lm, L_ID, S_ID, E_ID)(ids)


def _saved_bytes(model, ids, am, pos) -> int:
    """Bytes of the distinct activation storages (weights excluded) that autograd holds for backward
    after one forward: tensors saved outside checkpointed regions, plus what a checkpointed pass keeps (its inputs' K/V chunks are held by
    its recomputation; they are counted through the returned cache, which holds the same values)."""
    seen: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in weights:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, am, pos, return_cache=True)
    extra = 0
    if model.checkpoint_latents:
        extra = sum(lay.keys.nbytes + lay.values.nbytes for lay in out.cache.layers)
    return sum(seen.values()) + extra


def test_checkpointed_latent_passes_keep_less_for_backward():
    lm = tiny_gpt2(V, seed=6, n_layer=2, n_embd=64)
    lm.config._attn_implementation = "sdpa"
    figures = {}
    for n_lat in (2, 12):
        row = [2, 3, 4, S_ID] + [L_ID] * n_lat + [E_ID, 20, 1]
        ids = torch.tensor([row] * 4)
        am = torch.ones_like(ids)
        pos = positions_from_mask(am)
        for flag in (False, True):
            model = LatentLM(lm, L_ID, S_ID, E_ID, checkpoint_latents=flag).eval()
            figures[(n_lat, flag)] = _saved_bytes(model, ids, am, pos)
    plain_growth = figures[(12, False)] - figures[(2, False)]
    ckpt_growth = figures[(12, True)] - figures[(2, True)]
    # 10 more thoughts: the plain passes keep a full-length K/V copy each and their activations;
    # checkpointed ones a K/V column each
    assert figures[(12, True)] < 0.5 * figures[(12, False)], figures
    assert ckpt_growth < 0.2 * plain_growth, figures


def test_final_thought_is_last_latent_hidden(make_latent_lm):
    lm = tiny_gpt2(V, seed=4)
    model = LatentLM(lm, L_ID, S_ID, E_ID).eval()
    ids, am, pos = _batch("left")
    with torch.no_grad():
        out = model(ids, am, pos)
    for i, row in enumerate(ids):
        lat = (row == L_ID).nonzero().flatten()
        if len(lat):
            torch.testing.assert_close(out.final_thought[i], out.hidden[i, lat[-1]])
        else:
            assert out.final_thought[i].abs().sum() == 0


# --------------------------------------------------------------------------------------------------
# Batched generation == one at a time
# --------------------------------------------------------------------------------------------------


def _gen_prompts(word_tokenizer, synth_records):
    lay = Layout(word_tokenizer, CurriculumConfig(c_thought=2, max_latent_stage=3))
    prompts = [lay.prompt(synth_records[0], 0), lay.prompt(synth_records[1], 1),
               lay.prompt(synth_records[2], 3), lay.prompt(synth_records[3], 0, cot=True)]
    n_lat = [p.count(lay.latent_id) for p in prompts]
    assert n_lat == [0, 2, 6, 0]
    assert len({len(p) for p in prompts}) > 1
    return lay, prompts


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batched_generate_equals_one_at_a_time(make_latent_lm, word_tokenizer, synth_records, temperature):
    model = make_latent_lm(seed=1)
    lay, prompts = _gen_prompts(word_tokenizer, synth_records)
    seeds = torch.tensor([11, 22, 33, 44]) if temperature > 0 else None
    n_new = 8

    def one(i, eos):
        pb = collate_prompts([prompts[i]], lay.pad_id)
        s = None if seeds is None else seeds[i:i + 1]
        return generate(model, pb["input_ids"], pb["attention_mask"], n_new, eos, lay.pad_id, temperature, s)

    # choose an EOS that row 0 emits at its third token, so rows stop at different times
    eos = int(one(0, lay.eos_id).tokens[0, 2])
    singles = [one(i, eos) for i in range(len(prompts))]
    pb = collate_prompts(prompts, lay.pad_id)
    batch = generate(model, pb["input_ids"], pb["attention_mask"], n_new, eos, lay.pad_id, temperature, seeds)
    lengths = batch.mask.sum(1).tolist()
    assert lengths[0] <= 3
    for i, g in enumerate(singles):
        n = int(g.mask.sum())
        assert lengths[i] == n, f"row {i}"
        assert batch.tokens[i, :n].tolist() == g.tokens[0, :n].tolist(), f"row {i}"
        assert (batch.logprobs[i, :n] - g.logprobs[0, :n]).abs().max().item() < 1e-5
        assert (batch.tokens[i, n:] == lay.pad_id).all()
        assert (batch.logprobs[i, n:] == 0).all()
        if n < batch.tokens.shape[1] or n < n_new:
            assert g.tokens[0, n - 1].item() == eos
        if g.final_thought is None:  # a batch without any thought has no final thought
            assert prompts[i].count(lay.latent_id) == 0 and batch.final_thought[i].abs().sum() == 0
        else:
            torch.testing.assert_close(batch.final_thought[i], g.final_thought[0], atol=1e-5, rtol=1e-5)
    assert batch.logprobs.max().item() <= 0.0
    if temperature == 0:
        # greedy log-probs are the max log-prob: re-score with a plain forward of the full sequence
        i = 2
        n = lengths[i]
        full = torch.tensor([prompts[i] + batch.tokens[i, :n].tolist()])
        with torch.no_grad():
            lp = torch.log_softmax(model(full).logits[0, len(prompts[i]) - 1:-1], -1)
        assert (lp.argmax(-1) == batch.tokens[i, :n]).all()
        got = lp.gather(1, batch.tokens[i, :n, None])[:, 0]
        assert (got - batch.logprobs[i, :n]).abs().max().item() < 1e-5


def test_sampling_needs_seeds(make_latent_lm, word_tokenizer, synth_records):
    model = make_latent_lm()
    lay, prompts = _gen_prompts(word_tokenizer, synth_records)
    pb = collate_prompts(prompts, lay.pad_id)
    with pytest.raises(ValueError, match="seed"):
        generate(model, pb["input_ids"], pb["attention_mask"], 2, lay.eos_id, lay.pad_id, 1.0, None)


def test_sampling_depends_on_seed(make_latent_lm, word_tokenizer, synth_records):
    model = make_latent_lm(seed=2)
    lay, prompts = _gen_prompts(word_tokenizer, synth_records)
    pb = collate_prompts([prompts[2]] * 6, lay.pad_id)
    g = generate(model, pb["input_ids"], pb["attention_mask"], 6, lay.eos_id, lay.pad_id, 1.0,
                 torch.arange(6) * 1000 + 7)
    assert len({tuple(t.tolist()) for t in g.tokens}) > 1


def test_cache_argument_name_and_silent_drop_guard():
    """transformers 5.17 calls the cache ``past_key_values``, 5.24 ``cache``; a wrong name is swallowed by
    ``**kwargs`` and the model runs without the cache (seen on a GPU machine: CoT pass@1 0.2% instead of
    59%). The wrapper reads the name from the signature and refuses a pass that did not extend the cache."""
    import inspect

    lm = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=64))
    m = LatentLM(lm, 47, 48, 49)
    params = inspect.signature(lm.base_model.forward).parameters
    assert m.cache_kwarg in params and m.cache_kwarg in ("cache", "past_key_values")
    ids = torch.tensor([[1, 2, 48, 47, 47, 49, 3, 4]])
    out = m(ids)
    assert out.logits.shape == (1, 8, 50)
    m.cache_kwarg = "not_a_cache_argument"  # what a renamed argument looks like
    with pytest.raises(RuntimeError, match="did not extend the KV cache"):
        m(ids)


def test_prompts_past_the_learned_positions_are_refused_by_name():
    """GPT-2 has n_positions learned positions; a longer prompt used to end in an IndexError deep inside
    the embedding lookup (seen with ProsQA prompts and a small tokenizer)."""
    from lightning_latent.model.build import ModelConfig
    from lightning_latent.module import LatentReasoner

    lm = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16))
    m = LatentLM(lm, 47, 48, 49)
    ids = torch.ones(1, 12, dtype=torch.long)
    generate(m, ids, torch.ones_like(ids), 4, 0, 0)  # 12 + 4 = 16 fits
    with pytest.raises(ValueError, match="13 tokens plus max_new_tokens=4 exceeds the model's 16 learned positions"):
        ids = torch.ones(1, 13, dtype=torch.long)
        generate(m, ids, torch.ones_like(ids), 4, 0, 0)
    with pytest.raises(ValueError, match=r"max_length=600 exceeds the model's 512 learned positions"):
        LatentReasoner(backbone=ModelConfig(n_layer=1, n_embd=32, n_head=2, n_positions=512), max_length=600)
