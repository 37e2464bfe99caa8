"""Collectives the training step needs, as plain functions (no Lightning).

Optimisation is manual: a GRPO step makes ``mu`` optimiser steps (and one backward per micro-batch) on
one rollout batch, and DDP's own hook would all-reduce only the backward that follows a forward
through its wrapper. So every backward's gradients are averaged here, explicitly, once per optimiser
step (docs/design.md#ddp). Outside a process group every function is the identity.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_sum(t: Tensor) -> Tensor:
    """The sum of ``t`` over ranks (a copy; ``t`` itself is left as it was)."""
    if is_distributed():
        t = t.clone()
        dist.all_reduce(t)
    return t


def no_ddp_grad_sync(wrapped) -> None:
    """Turn off DDP's own gradient all-reduce on ``wrapped`` (the strategy's model; anything else: no-op).

    Lightning calls ``training_step`` through the DDP wrapper, whose reducer would all-reduce only the
    first backward after its forward; :func:`sync_grads` averages every optimiser step's gradients instead."""
    if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        wrapped.require_backward_grad_sync = False


def sync_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over ranks in place, with one flat all-reduce."""
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    i = 0
    for g in grads:
        g.copy_(flat[i:i + g.numel()].view_as(g))
        i += g.numel()


def mean_over_ranks(values: dict[str, float], device, summed: tuple[str, ...] = ()) -> dict[str, float]:
    """Per-rank statistics averaged over ranks (those named in ``summed`` added up instead, e.g. a
    throughput); unchanged outside a process group. ``device``: where the backend reduces (NCCL: GPU)."""
    if not is_distributed():
        return values
    t = all_sum(torch.tensor(list(values.values()), device=device)) / world_size()
    out = dict(zip(values, t.tolist()))
    for k in summed:
        out[k] *= world_size()
    return out
