"""The frozen GRPO reference: the policy as it was when its GRPO phase started.

It is a deep copy of the latent LM with gradients off, kept out of the module's ``state_dict`` (its
weights travel in checkpoints as ``grpo_reference``, so a resumed run compares against the same
reference), with its own perturber so that its log-probs can be taken under the rollouts' masks.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor

from ..model.latent_lm import LatentLM
from ..model.perturb import PerturbConfig, Perturber
from .rollout import RolloutBatch, replay_logprobs


class Reference:
    """A frozen copy of ``policy``, or of the weights in ``state`` when given (a resumed run)."""

    def __init__(self, policy: LatentLM, perturb: PerturbConfig, state: dict[str, Tensor] | None = None):
        self.model = copy.deepcopy(policy)
        self.model.positions_run = 0  # its own compute from here (callbacks.ComputeMeter)
        if state is not None:
            self.model.load_state_dict(state)
        else:
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.state = state
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.perturber = Perturber(self.model.lm, perturb)

    def to(self, device) -> "Reference":
        self.model.to(device)
        return self

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch, temperature: float, perturbed: bool) -> Tensor:
        """Log-probs [N, L] of the batch's answer tokens, under the rows' own perturbations when
        ``perturbed`` (the default: the reference sees the same masks as the policy)."""
        logp, _ = replay_logprobs(self.model, self.perturber if perturbed else None, batch, temperature)
        return logp
