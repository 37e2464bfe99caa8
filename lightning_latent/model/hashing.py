"""Replayable random numbers: pure integer hashes of (seed, keys, feature index).

Every random number of a perturbation comes from here (docs/design.md#replay): an integer hash in plain
int64 tensor ops, exact on every device, so a rollout's mask or noise is rebuilt bit for bit at rollout,
replay and reference, whatever other rows share the batch, and no global RNG state is read or changed.
"""
from __future__ import annotations

import torch
from torch import Tensor

#: A distinct key per kind of random number, so that two sites never draw the same stream.
SITE_IDS = {"attn": 11, "mlp": 13, "thought": 17, "embed": 19, "gauss": 23, "answer": 29}
_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) without int64 overflow (c split into 16-bit halves)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit avalanche hash (lowbias32), exact on every device because it is integer-only."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x735A2D97)
    x = x ^ (x >> 15)
    return x


def hash_uniform(seeds: Tensor, keys: tuple[int | Tensor, ...], dim: int) -> Tensor:
    """Uniform numbers in [0, 1), shape [N, dim], a pure function of (seed, keys, feature index).

    ``seeds`` is [N] int64; each key is an int or an [N] int64 tensor (e.g. a per-row step).
    """
    x = seeds.to(torch.int64) & _M32
    x = _mix32(x ^ ((seeds.to(torch.int64) >> 32) & _M32))
    for k in keys:
        k_t = k.to(torch.int64) if isinstance(k, Tensor) else torch.tensor(int(k), dtype=torch.int64)
        x = _mix32(x ^ _mix32((k_t.to(x.device) + 0x9E3779B9) & _M32))
    feat = _mix32(torch.arange(dim, device=seeds.device, dtype=torch.int64) * 2 + 1)
    x = _mix32(x[:, None] ^ feat[None, :])
    return (x.to(torch.float64) + 0.5) / 4294967296.0


def hash_normal(seeds: Tensor, keys: tuple[int | Tensor, ...], dim: int) -> Tensor:
    """Standard normal numbers [N, dim] from two hashed uniforms (Box-Muller), replayable."""
    u1 = hash_uniform(seeds, keys + (1,), dim)
    u2 = hash_uniform(seeds, keys + (2,), dim)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)
