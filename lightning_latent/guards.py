"""Guards that stop a run which has gone wrong instead of training through it.

:class:`NonFiniteGuard`: a non-finite loss or gradient skips that update; too many in a row stop the
run (the module saves a checkpoint of the last good weights first).
"""
from __future__ import annotations

import torch
from torch import Tensor


class NonFiniteGuard:
    """Counts consecutive updates whose loss or gradient norm is not finite."""

    def __init__(self, max_bad_steps: int):
        self.max_bad_steps = max_bad_steps
        self.bad_steps = 0

    def check(self, loss: Tensor | float, grad_norm: Tensor | float) -> bool:
        """True (and the count reset) when both are finite; else False and one more bad step."""
        finite = bool(torch.isfinite(torch.as_tensor(loss))) and bool(torch.isfinite(torch.as_tensor(grad_norm)))
        self.bad_steps = 0 if finite else self.bad_steps + 1
        return finite

    @property
    def exhausted(self) -> bool:
        return self.bad_steps > self.max_bad_steps

    def message(self, step: int, ids, path: str) -> str:
        return (f"{self.bad_steps} non-finite steps in a row (limit optim.max_bad_steps={self.max_bad_steps}) "
                f"at step {step}, last batch {ids}; the weights are those before them, saved to {path}")
