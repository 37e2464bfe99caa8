"""A toy arm defined outside the package, in one file: uniform noise on the fed-back thoughts.

Importing this module registers it; ``tests/test_arms.py`` runs it through a fit. It is the
whole of what a new arm with a new behaviour takes (plus a YAML under experiments/configs/<task>/arms/).
"""
from __future__ import annotations

from torch import Tensor

from lightning_latent.model.arms import Arm, register_arm
from lightning_latent.model.perturb import hash_uniform

UNIFORM_SITE = 101  # a hash key of its own, so its noise is independent of every built-in arm's


def uniform_thought(perturber, h: Tensor, step: Tensor) -> Tensor:
    """h + noise_scale * RMS(h) * U(-1, 1), fresh per latent step, a pure function of (seed, step)."""
    u = hash_uniform(perturber.seeds(h.device), (UNIFORM_SITE, step.to(h.device)), h.shape[-1]).to(h.dtype)
    rms = h.detach().pow(2).mean(-1, keepdim=True).sqrt()
    return h + perturber.cfg.noise_scale * rms * (2 * u - 1)


TOY_ARM = register_arm(Arm("uniform_thought", thought=uniform_thought, in_study=False,
                           help="toy: uniform noise on each fed-back thought"))
