"""lightning_latent/model/perturb.py: the mask sampler: shared / per-step dropout masks, config checks, hook
sites, and backpropagation through the fed-back thoughts (the hashing it draws from: test_hashing.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_latent.model.latent_lm import LatentLM
from lightning_latent.model.perturb import (
    POST_LATENT_STEP,
    PerturbConfig,
    Perturber,
    residual_sites,
)

from conftest import tiny_gpt2

V, S_ID, E_ID, L_ID = 64, 61, 62, 63
ROW = [5, 6, 7, 8, S_ID, L_ID, L_ID, L_ID, E_ID, 10, 11, 12, 1]


def _model(seed=0, dtype=torch.float32, **kw):
    lm = tiny_gpt2(V, seed=seed, dtype=dtype, **kw)
    return LatentLM(lm, L_ID, S_ID, E_ID).eval()


# --------------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------------


def _capture_passes(pert: Perturber):
    """Record the factors of every pass (a copy of ``_factors`` after each ``begin_pass``)."""
    passes = []
    orig = pert.begin_pass

    def begin_pass(step, n_cols, answer_from, dim, device, dtype):
        orig(step, n_cols, answer_from, dim, device, dtype)
        passes.append({"step": step.clone(), "n_cols": n_cols, "answer_from": answer_from,
                       "factors": {k: v.clone() for k, v in pert._factors.items()}})

    pert.begin_pass = begin_pass
    return passes


def test_dropout_shared_same_mask_at_every_step():
    p = 0.3
    model = _model()
    pert = Perturber(model.lm, PerturbConfig(arm="dropout_shared", p=p, sites=["attn", "mlp"]))
    seeds = torch.tensor([101, 202], dtype=torch.long)
    with pert.rows(seeds):
        m1 = pert.mask("attn", 0, torch.tensor([1, 1]), 32, "cpu", torch.float32)
        for step in ([2, 2], [3, 0], [POST_LATENT_STEP, POST_LATENT_STEP]):
            assert torch.equal(pert.mask("attn", 0, torch.tensor(step), 32, "cpu", torch.float32), m1)
        assert not torch.equal(m1[0], m1[1])  # rollouts differ
        assert not torch.equal(pert.mask("attn", 1, torch.tensor([1, 1]), 32, "cpu", torch.float32), m1)
        assert not torch.equal(pert.mask("mlp", 0, torch.tensor([1, 1]), 32, "cpu", torch.float32), m1)
    # the factors actually used by the forward: the same for the prefix, each latent pass, the rest
    passes = _capture_passes(pert)
    ids = torch.tensor([ROW, ROW])
    with pert.rows(seeds), torch.no_grad():
        model(ids, perturber=pert)
    assert len(passes) == 1 + 3 + 1  # prefix, three latent columns, the rest
    assert [int(ps["step"][0]) for ps in passes] == [0, 1, 2, 3, POST_LATENT_STEP]
    keys = {(s, layer) for s in ("attn", "mlp") for layer in range(2)}
    for ps in passes:
        assert set(ps["factors"]) == keys
        for k in keys:
            f = ps["factors"][k]
            assert f.shape == (2, 1, 32)
            assert torch.equal(f, passes[0]["factors"][k])
    f = passes[0]["factors"][("attn", 0)]
    vals = sorted(f.unique().tolist())
    assert len(vals) == 2 and vals[0] == 0.0 and vals[1] == pytest.approx(1 / (1 - p))
    assert torch.allclose(f[f > 0], torch.tensor(1 / (1 - p)))
    # no hooks active outside ``rows``: the output is exactly the unperturbed one
    with torch.no_grad():
        a = model(ids).logits
        pert.remove()
        b = model(ids).logits
    assert torch.equal(a, b)


def test_dropout_mask_values_and_rate():
    for p in (0.1, 0.3, 0.5):
        pert = Perturber(_model().lm, PerturbConfig(arm="dropout_shared", p=p))
        with pert.rows(torch.arange(50, dtype=torch.long)):
            m = pert.mask("mlp", 1, torch.zeros(50, dtype=torch.long), 4000, "cpu", torch.float64)
        assert set(m.unique().tolist()) == {0.0, 1 / (1 - p)}
        assert abs((m == 0).double().mean().item() - p) < 0.005  # 2e5 features
        assert abs(m.mean().item() - 1.0) < 0.02  # inverted dropout keeps the expectation
        pert.remove()


def test_dropout_per_step_masks_differ_between_steps():
    model = _model()
    pert = Perturber(model.lm, PerturbConfig(arm="dropout_per_step", p=0.3))
    seeds = torch.tensor([5, 6], dtype=torch.long)
    with pert.rows(seeds):
        m = {s: pert.mask("attn", 0, torch.tensor([s, s]), 64, "cpu", torch.float32) for s in (0, 1, 2, 3)}
        again = pert.mask("attn", 0, torch.tensor([2, 2]), 64, "cpu", torch.float32)
        mixed = pert.mask("attn", 0, torch.tensor([1, 3]), 64, "cpu", torch.float32)
    assert torch.equal(again, m[2])  # a pure function of (seed, step)
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.equal(m[a][0], m[b][0]) and not torch.equal(m[a][1], m[b][1])
    assert torch.equal(mixed[0], m[1][0]) and torch.equal(mixed[1], m[3][1])  # per-row steps
    passes = _capture_passes(pert)
    with pert.rows(seeds), torch.no_grad():
        model(torch.tensor([ROW, ROW]), perturber=pert)
    f = [ps["factors"][("mlp", 1)] for ps in passes]
    assert len(f) == 5
    for i in range(len(f)):
        for j in range(i + 1, len(f)):
            assert not torch.equal(f[i], f[j])


def test_shared_mask_equals_scaled_output_projections():
    """The attn / mlp sites scale what each block adds to the residual stream: with a shared mask,
    the perturbed latent forward equals the unperturbed one of a model whose output projections
    (c_proj weight columns and bias) are multiplied by the mask, for prefix, thoughts and answer."""
    p = 0.3
    model = _model(seed=1)
    pert = Perturber(model.lm, PerturbConfig(arm="dropout_shared", p=p, sites=["attn", "mlp"]))
    seed = torch.tensor([77], dtype=torch.long)
    ids = torch.tensor([ROW])
    with pert.rows(seed), torch.no_grad():
        got = model(ids, perturber=pert)
        masks = {(s, i): pert.mask(s, i, torch.zeros(1, dtype=torch.long), 32, "cpu", torch.float32)[0]
                 for s in ("attn", "mlp") for i in range(2)}
    pert.remove()
    with torch.no_grad():
        plain = model(ids)
        for i, blk in enumerate(model.lm.transformer.h):
            for s, mod in (("attn", blk.attn.c_proj), ("mlp", blk.mlp.c_proj)):
                mod.weight.mul_(masks[(s, i)][None, :])  # Conv1D weight: [in, out]
                mod.bias.mul_(masks[(s, i)])
        scaled = model(ids)
    assert (got.logits - scaled.logits).abs().max().item() < 1e-5
    assert (got.final_thought - scaled.final_thought).abs().max().item() < 1e-5
    assert (got.logits - plain.logits).abs().max().item() > 1e-2


@pytest.mark.parametrize("site", ["thought", "embed"])
def test_thought_and_embed_sites(site):
    model = _model(seed=2)
    pert = Perturber(model.lm, PerturbConfig(arm="dropout_shared", p=0.5, sites=[site]))
    ids = torch.tensor([ROW, ROW])
    seeds = torch.tensor([1, 2], dtype=torch.long)
    with torch.no_grad():
        plain = model(ids)
        with pert.rows(seeds):
            a = model(ids, perturber=pert)
            b = model(ids, perturber=pert)
    assert torch.equal(a.logits, b.logits)
    lat = ids[0] == L_ID
    first = int(lat.nonzero()[0])
    if site == "thought":  # nothing changes before the first thought is fed back
        assert torch.equal(a.logits[:, :first], plain.logits[:, :first])
    assert (a.logits[:, first:] - plain.logits[:, first:]).abs().max().item() > 1e-3
    assert (a.logits[0] - a.logits[1]).abs().max().item() > 1e-3


# --------------------------------------------------------------------------------------------------
# config validation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"p": 1.0}, "1.0"),
        ({"p": -0.1}, "-0.1"),
        ({"p": 1.5}, "1.5"),
        ({"sites": ["attn", "ffn"]}, "ffn"),
        ({"arm": "mc_dropout"}, "mc_dropout"),
        ({"scope": "answer"}, "answer"),
        ({"arm": "gaussian", "noise_scale": -1.0}, "-1.0"),
    ],
)
def test_config_validation(kw, needle):
    """A bad value is refused when the config is made (``__post_init__``), naming the value."""
    with pytest.raises(ValueError, match=needle.replace(".", r"\.").replace("-", r"\-")):
        PerturbConfig(**kw)


def test_config_valid_values():
    for arm in ("none", "temperature", "dropout_shared", "dropout_per_step", "gaussian", "sft_continue"):
        PerturbConfig(arm=arm, p=0.0)
    PerturbConfig(p=0.0, sites=["attn", "mlp", "thought", "embed"], scope="all")
    assert not PerturbConfig(arm="dropout_shared", p=0.0).active
    assert not PerturbConfig(arm="temperature", p=0.3).active
    assert PerturbConfig(arm="dropout_per_step", p=0.3).active


def test_model_without_sites_rejected():
    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="NoBlocks"):
        Perturber(NoBlocks(), PerturbConfig())

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

    class NoAttn(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

    with pytest.raises(ValueError, match="block 0"):
        residual_sites(NoAttn())
    # the GPT-2 sites: one attn and one mlp per block
    sites = residual_sites(_model().lm)
    assert len(sites["attn"]) == 2 and len(sites["mlp"]) == 2


# --------------------------------------------------------------------------------------------------
# gradients flow through the thoughts
# --------------------------------------------------------------------------------------------------


class _Detacher:
    """Stands in for a perturber that only detaches each fed-back thought (no hooks, no masks)."""

    enabled = True

    def begin_pass(self, *a, **k):
        pass

    def embed(self, x):
        return x

    def thought(self, h, step):
        return h.detach()


def test_gradient_through_thoughts_finite_difference():
    model = _model(seed=4, dtype=torch.float64)
    ids = torch.tensor([ROW])
    torch.manual_seed(1)
    proj = torch.randn(1, len(ROW), V, dtype=torch.float64)
    after = torch.zeros(1, len(ROW), 1, dtype=torch.float64)
    after[:, ROW.index(E_ID):] = 1.0  # loss on the answer side only: it depends on W via the thoughts too
    w = model.lm.transformer.h[0].mlp.c_fc.weight
    idx = (3, 5)

    def loss(perturber=None):
        return (model(ids, perturber=perturber).logits * proj * after).sum()

    model.zero_grad(set_to_none=True)
    loss().backward()
    g = w.grad[idx].item()
    model.zero_grad(set_to_none=True)
    loss(_Detacher()).backward()
    g_detached = w.grad[idx].item()
    eps = 1e-6
    with torch.no_grad():
        w0 = w[idx].item()
        w[idx] = w0 + eps
        lp = loss().item()
        w[idx] = w0 - eps
        lm_ = loss().item()
        w[idx] = w0
        fd = (lp - lm_) / (2 * eps)
        assert loss(_Detacher()).item() == pytest.approx(loss().item(), rel=1e-12)  # same value
    assert abs(g) > 1e-4
    assert abs(g - fd) <= 1e-4 * abs(fd)
    assert abs(g_detached - fd) > 1e-3 * abs(fd)
    # whole-tensor check: detaching changes the gradient of every block's weights
    model.zero_grad(set_to_none=True)
    loss().backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss(_Detacher()).backward()
    for n, p in model.named_parameters():
        if ".h." in n and n.endswith("weight"):
            rel = ((full[n] - p.grad).norm() / full[n].norm()).item()
            assert rel > 1e-3, n
