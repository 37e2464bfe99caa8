"""lightning_latent/distributed.py: outside a process group every collective is the identity (the
multi-process behaviour: tests/integration/test_ddp_grpo.py and test_ddp_metrics.py); DDP's own
gradient sync is turned off only on a DDP wrapper."""
from __future__ import annotations

import torch

from lightning_latent.distributed import (
    all_sum,
    is_distributed,
    mean_over_ranks,
    no_ddp_grad_sync,
    sync_grads,
    world_size,
)


def test_collectives_are_the_identity_on_one_process():
    assert not is_distributed() and world_size() == 1
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(all_sum(t), t)
    values = {"a": 0.5, "b": 3.0}
    assert mean_over_ranks(values, "cpu", summed=("b",)) == {"a": 0.5, "b": 3.0}
    lin = torch.nn.Linear(2, 1)
    lin(torch.ones(1, 2)).sum().backward()
    grads = [p.grad.clone() for p in lin.parameters()]
    sync_grads(lin.parameters())
    assert all(torch.equal(p.grad, g) for p, g in zip(lin.parameters(), grads))


def test_no_ddp_grad_sync_touches_only_a_ddp_wrapper():
    class FakeDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self):  # no process group needed: only the flag matters
            torch.nn.Module.__init__(self)
            self.require_backward_grad_sync = True

    wrapped = FakeDDP()
    no_ddp_grad_sync(wrapped)
    assert wrapped.require_backward_grad_sync is False
    plain = torch.nn.Linear(1, 1)
    no_ddp_grad_sync(plain)  # anything else: a no-op
    assert not hasattr(plain, "require_backward_grad_sync")
