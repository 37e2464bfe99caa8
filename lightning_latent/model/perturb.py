"""Perturbations that make the K rollouts of a prompt differ: the "mask sampler".

Every random number here is a pure function of integers (a rollout's seed, the site, the layer, the
latent step, the feature index) computed with an integer hash in plain int64 tensor ops. That is what
makes replay exact: the mask of a rollout is rebuilt bit-identically for the rollout, the old policy,
the current policy and the reference, on any device or rank, whatever other rows share the batch, and
no global RNG state is read or changed.

What each arm perturbs is its entry in the arm registry (:mod:`lightning_latent.model.arms`,
docs/design.md#arms): dropout masks on the sites (one per rollout, or one per latent step), a function
of the fed-back thoughts (the ``gaussian`` arm), or nothing.

Sites are forward hooks on what each block adds to the residual stream (``attn``, ``mlp``) so any
Hugging Face causal LM has them, plus ``thought`` (the fed-back vector) and ``embed`` (input
embeddings).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from .arms import Arm, get_arm
from .hashing import SITE_IDS, hash_normal, hash_uniform  # noqa: F401  (hash_normal: re-exported)

SITES = ("attn", "mlp", "thought", "embed")
SCOPES = ("latent", "all")

#: The step index used for every position after a row's last latent thought (the end marker and the
#: answer): a per-step arm then holds one "post-latent" mask for them.
POST_LATENT_STEP = 1 << 20


@dataclass
class PerturbConfig:
    """What makes rollouts differ. ``p`` is the drop probability of the dropout arms."""

    arm: str = "dropout_shared"  # a name in the arm registry (model/arms.py)
    p: float = 0.1
    sites: list[str] = field(default_factory=lambda: ["attn", "mlp"])
    scope: Literal["latent", "all"] = "latent"
    noise_scale: float = 0.1  # arms with a thought function (gaussian): its scale; 0 turns it off
    # Supervised phases (cot, coconut, sft) train under feature masks at ``sites`` with this drop rate: one
    # mask per training sequence, the same at every position and latent step (variational dropout over the
    # recurrence), on the head (question, markers, thoughts) with scope ``latent``, everywhere with ``all``.
    # So a rollout's mask (the arm's ``p``) is one the model could have drawn in training
    # (docs/design.md#train-masks). 0: off. Rollouts, replays, references and evaluation never use it.
    p_train: float = 0.0
    # The share of supervised sequences trained with the masks off (each sequence's draw a hash of its mask
    # seed, so replayable), so that the deterministic model evaluation scores is trained too: under tied
    # feature masks alone it is not the average masked network (docs/design.md#train-masks). 0: every
    # sequence masked. Only with ``p_train`` > 0; rollouts never use it.
    unmasked_share: float = 0.0

    def __post_init__(self) -> None:
        """Fail at start-up with a message that names the bad value."""
        get_arm(self.arm)
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"perturb.p={self.p} must be in [0, 1)")
        if not 0.0 <= self.p_train < 1.0:
            raise ValueError(f"perturb.p_train={self.p_train} must be in [0, 1)")
        if not 0.0 <= self.unmasked_share < 1.0:
            raise ValueError(f"perturb.unmasked_share={self.unmasked_share} must be in [0, 1): the share of "
                             "training sequences with masks off (1 would be p_train 0)")
        for s in self.sites:
            if s not in SITES:
                raise ValueError(f"perturb.sites contains unknown site {s!r}; choose from {SITES}")
        if self.scope not in SCOPES:
            raise ValueError(f"perturb.scope={self.scope!r} must be one of {SCOPES}")
        if self.noise_scale < 0:
            raise ValueError(f"perturb.noise_scale={self.noise_scale} must be >= 0")

    @property
    def arm_entry(self) -> Arm:
        """The arm's entry in the arm registry (model/arms.py): what the arm perturbs, how it answers."""
        return get_arm(self.arm)

    @property
    def is_dropout(self) -> bool:
        return self.arm_entry.dropout and self.p > 0

    @property
    def active(self) -> bool:
        return self.is_dropout or (self.arm_entry.thought is not None and self.noise_scale > 0)

    def for_training(self) -> "PerturbConfig | None":
        """The masks supervised phases train under: one frozen feature mask per sequence at this config's
        sites and scope, rate ``p_train``, a share ``unmasked_share`` of the sequences left unmasked (None when
        ``p_train`` is 0)."""
        if self.p_train <= 0:
            return None
        return PerturbConfig(arm="dropout_shared", p=self.p_train, sites=list(self.sites), scope=self.scope,
                             unmasked_share=self.unmasked_share)


_NO_OVERRIDE = object()
_override: object = _NO_OVERRIDE


@contextlib.contextmanager
def only_factors(perturber: "Perturber | None", factors: dict | None = None):
    """Within the block, ``perturber``'s hooks use ``factors`` and every other Perturber's hooks do nothing.

    ``LatentLM`` runs an unperturbed forward under ``only_factors(None)``, so a perturber left active by
    the caller (inside its ``rows``) cannot leak into it. A checkpointed pass is recomputed in backward
    under the factors captured at forward time, whatever the perturbers hold by then.
    """
    global _override
    prev = _override
    _override = (perturber, factors or {})
    try:
        yield
    finally:
        _override = prev


def residual_sites(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The attention and MLP submodules of every block, found by name, for any HF causal LM.

    GPT-2 blocks hold ``attn`` and ``mlp``; Llama, Qwen and Mistral hold ``self_attn`` and ``mlp``.
    """
    base = getattr(model, "base_model", model)
    blocks = None
    for name in ("h", "layers", "blocks"):
        blocks = getattr(base, name, None)
        if isinstance(blocks, nn.ModuleList):
            break
    if blocks is None or not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__} (looked for h/layers/blocks)")
    out: dict[str, list[nn.Module]] = {"attn": [], "mlp": []}
    for i, blk in enumerate(blocks):
        attn = getattr(blk, "attn", None) or getattr(blk, "self_attn", None) or getattr(blk, "attention", None)
        mlp = getattr(blk, "mlp", None) or getattr(blk, "feed_forward", None)
        if attn is None or mlp is None:
            raise ValueError(f"block {i} of {type(model).__name__} has no attention or MLP submodule to hook")
        out["attn"].append(attn)
        out["mlp"].append(mlp)
    return out


class Perturber:
    """Holds the hooks; a rollout batch activates them with :meth:`rows` and per-pass state.

    Usage (the latent LM does the pass calls)::

        with perturber.rows(seeds):          # seeds: [N] int64, one per row
            model(...)                       # each pass calls perturber.begin_pass(...)

    Outside ``rows`` the hooks do nothing, so supervised training and greedy evaluation are untouched.
    """

    def __init__(self, model: nn.Module, cfg: PerturbConfig):
        self.cfg = cfg
        self._seeds: Tensor | None = None
        self._on: Tensor | None = None  # [N] bool: the rows that carry a mask (None: all of them)
        self._factors: dict[tuple[str, int], Tensor] = {}
        self._masks: dict[tuple, Tensor] = {}  # step-independent masks of the active rows (see ``mask``)
        self._handles = []
        sites = residual_sites(model)  # also checks that the model has the hookable sites
        self.n_layers = len(sites["attn"])
        if cfg.active and cfg.is_dropout:
            for site in ("attn", "mlp"):
                if site in cfg.sites:
                    for layer, mod in enumerate(sites[site]):
                        self._handles.append(mod.register_forward_hook(self._make_hook(site, layer)))

    # -- activation ---------------------------------------------------------------------------
    class _Rows:
        def __init__(self, outer: "Perturber", seeds: Tensor, on: Tensor | None):
            self.outer, self.seeds, self.on = outer, seeds, on

        def __enter__(self):
            self.outer._seeds, self.outer._on = self.seeds, self.on
            self.outer._masks = {}
            return self.outer

        def __exit__(self, *exc):
            self.outer._seeds = self.outer._on = None
            self.outer._factors = {}
            self.outer._masks = {}
            return False

    def rows(self, seeds: Tensor, on: Tensor | None = None) -> "Perturber._Rows":
        """Activate per-row perturbations for the rows whose rollout seeds are given; with ``on`` ([N] bool),
        only the rows where it is True carry a mask, the others none (supervised ``unmasked_share``)."""
        return Perturber._Rows(self, seeds.to(torch.int64), None if on is None else on.to(torch.bool))

    @property
    def enabled(self) -> bool:
        return self._seeds is not None and self.cfg.active

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- masks --------------------------------------------------------------------------------
    def mask(self, site: str, layer: int, step: Tensor, dim: int, device, dtype) -> Tensor:
        """The [N, dim] dropout mask of one site for the active rows, values in {0, 1/(1-p)}."""
        assert self._seeds is not None
        seeds = self._seeds.to(device)
        keys: tuple = (SITE_IDS[site], layer)
        if self.cfg.arm_entry.per_step:
            keys = keys + (step.to(device),)
        else:
            # A shared mask does not depend on the step: build it once per ``rows`` activation instead of
            # once per forward pass (the same tensor, bit for bit; callers never modify it in place).
            ck = (site, layer, dim, str(device), dtype)
            m = self._masks.get(ck)
            if m is None:
                m = self._masks[ck] = self._rows_on(hash_uniform(seeds, keys, dim) >= self.cfg.p, dtype)
            return m
        return self._rows_on(hash_uniform(seeds, keys, dim) >= self.cfg.p, dtype)

    def _rows_on(self, keep: Tensor, dtype) -> Tensor:
        """The mask {0, 1/(1-p)} of ``keep`` [N, dim], and all ones in the rows that carry none."""
        m = keep.to(dtype) / (1.0 - self.cfg.p)
        if self._on is None:
            return m
        return torch.where(self._on.to(m.device)[:, None], m, torch.ones((), device=m.device, dtype=dtype))

    def begin_pass(self, step: Tensor, n_cols: int, answer_from: int | Tensor | None, dim: int, device,
                   dtype) -> None:
        """Prepare the factors of one forward pass over ``n_cols`` columns.

        ``step`` [N] is each row's latent step for this pass (constant within a pass by construction
        of the latent LM). ``answer_from`` is the first column of the pass that belongs to the answer,
        relative to the pass (None: none does; an [N] tensor: one per row); with scope ``latent`` the answer
        columns are left unperturbed.
        """
        self._factors = {}
        if not self.enabled or not self.cfg.is_dropout:
            return
        latent_scope = answer_from is not None and self.cfg.scope == "latent"
        per_row = isinstance(answer_from, Tensor)
        if latent_scope and not per_row and answer_from <= 0:
            return  # the whole pass is answer: off
        for site in self.cfg.sites:
            if site not in ("attn", "mlp", "embed"):
                continue
            for layer in range(self.n_layers if site != "embed" else 1):
                m = self.mask(site, layer, step, dim, device, dtype)[:, None, :]  # [N, 1, D]
                if latent_scope and (per_row or answer_from < n_cols):
                    cols = torch.arange(n_cols, device=device)
                    on = (cols[None, :] < answer_from.to(device)[:, None]) if per_row else (cols < answer_from)[None, :]
                    m = torch.where(on[:, :, None], m, torch.ones((), device=device, dtype=dtype))
                self._factors[(site, layer)] = m

    def embed(self, x: Tensor) -> Tensor:
        f = self._factors.get(("embed", 0))
        return x if f is None else x * f

    def seeds(self, device) -> Tensor:
        """The active rows' rollout seeds [N] (inside :meth:`rows`)."""
        assert self._seeds is not None, "seeds() outside Perturber.rows"
        return self._seeds.to(device)

    def thought(self, h: Tensor, step: Tensor) -> Tensor:
        """Perturb fed-back thoughts h [N, D] at latent step ``step`` [N]: the arm's thought function
        (e.g. gaussian), or the dropout mask of the ``thought`` site."""
        if not self.enabled:
            return h
        fn = self.cfg.arm_entry.thought
        if fn is not None:
            return fn(self, h, step)
        if self.cfg.is_dropout and "thought" in self.cfg.sites:
            return h * self.mask("thought", 0, step, h.shape[-1], h.device, h.dtype)
        return h

    def _make_hook(self, site: str, layer: int):
        def hook(module, inputs, output):
            ov = _override
            if ov is _NO_OVERRIDE:
                f = self._factors.get((site, layer))
            else:
                f = ov[1].get((site, layer)) if ov[0] is self else None
            if f is None:
                return output
            if isinstance(output, tuple):
                return (output[0] * f.to(output[0].dtype),) + tuple(output[1:])
            return output * f.to(output.dtype)

        return hook


def answer_uniforms(seeds: Tensor, t: int) -> Tensor:
    """One uniform per row for sampling answer token ``t``: a per-row generator in all but name."""
    return hash_uniform(seeds, (SITE_IDS["answer"], t), 1)[:, 0]
