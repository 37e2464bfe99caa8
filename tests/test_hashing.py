"""lightning_latent/model/hashing.py: replayable random numbers: pure integer hashes of (seed, keys, feature),
independent of the batch, uniform and uncorrelated; Box-Muller normals from them."""
from __future__ import annotations

import torch

from lightning_latent.model.hashing import SITE_IDS, hash_normal, hash_uniform
from lightning_latent.model.perturb import answer_uniforms


def test_hash_uniform_deterministic_and_batch_independent():
    seeds = torch.tensor([0, 1, 2**40 + 3, 2**62 + 12345, 7], dtype=torch.long)
    steps = torch.tensor([1, 2, 3, 4, 5])
    a = hash_uniform(seeds, (11, 0, steps), 64)
    b = hash_uniform(seeds, (11, 0, steps), 64)
    assert a.shape == (5, 64) and a.dtype == torch.float64
    assert torch.equal(a, b)
    for n in range(len(seeds)):
        alone = hash_uniform(seeds[n:n + 1], (11, 0, steps[n:n + 1]), 64)
        assert torch.equal(alone[0], a[n])
    # reversing the batch permutes rows, nothing else
    rev = hash_uniform(seeds.flip(0), (11, 0, steps.flip(0)), 64)
    assert torch.equal(rev, a.flip(0))
    # every key matters: seed, key values, and high 32 bits of the seed
    assert not torch.equal(hash_uniform(seeds, (11, 1, steps), 64), a)
    assert not torch.equal(hash_uniform(seeds, (13, 0, steps), 64), a)
    assert not torch.equal(hash_uniform(seeds + (1 << 32), (11, 0, steps), 64), a)
    assert len({tuple(r.tolist()) for r in a}) == len(seeds)
    # prefix stable in dim: feature j does not depend on how many features are drawn
    assert torch.equal(hash_uniform(seeds, (11, 0, steps), 16), a[:, :16])


def test_hash_uniform_distribution():
    u = hash_uniform(torch.arange(200, dtype=torch.long), (11, 3), 500)
    assert u.min().item() > 0.0 and u.max().item() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.005  # 1e5 values: sd of the mean ~ 0.0009
    assert abs(u.var().item() - 1 / 12) < 0.002
    # roughly uniform per decile
    hist = torch.histc(u.float(), bins=10, min=0, max=1) / u.numel()
    assert (hist - 0.1).abs().max().item() < 0.01
    # consecutive seeds / features are not correlated
    c = torch.corrcoef(torch.stack([u[:-1].flatten(), u[1:].flatten()]))[0, 1]
    assert abs(c.item()) < 0.02
    z = hash_normal(torch.arange(100, dtype=torch.long), (23, 1), 400)
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02
    a = answer_uniforms(torch.tensor([5, 6]), 0)
    assert a.shape == (2,) and not torch.equal(a, answer_uniforms(torch.tensor([5, 6]), 1))


def test_every_site_draws_its_own_stream():
    assert len(set(SITE_IDS.values())) == len(SITE_IDS)
    seeds = torch.tensor([3, 4], dtype=torch.long)
    draws = [hash_uniform(seeds, (k, 0), 32) for k in SITE_IDS.values()]
    assert all(not torch.equal(a, b) for i, a in enumerate(draws) for b in draws[i + 1:])
    # the normals are built from the keys (k, 1) and (k, 2): a pure function of (seed, keys) as well
    assert torch.equal(hash_normal(seeds, (23, 5), 8), hash_normal(seeds, (23, 5), 8))
    assert not torch.equal(hash_normal(seeds, (23, 5), 8), hash_normal(seeds, (23, 6), 8))
