"""The registry of arms: every way of making a prompt's K rollouts differ, and the controls.

An arm is one :class:`Arm` entry. Everything else derives from this table: config validation
(``perturb.arm``), what :class:`~lightning_latent.model.perturb.Perturber` hooks and perturbs, whether
rollout answers are sampled or greedy, which kind of schedule phase the arm trains with (``grpo``, or
``sft`` for the supervised control), and the study's list of arms and their order in tables and plots.

Adding an arm: one :func:`register_arm` call (plus a thought function if its behaviour is new) and one
YAML under ``experiments/configs/<task>/arms/``. See docs/design.md#arms for the semantics.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from .hashing import SITE_IDS, hash_normal

#: ``fn(perturber, h, step) -> h``: perturbs the fed-back thoughts ``h`` [N, D] of the active rows at
#: latent step ``step`` [N]; ``perturber.seeds(h.device)`` gives the rows' rollout seeds. It must be a
#: pure function of (seed, step, h) so that the replay rebuilds it exactly.
ThoughtFn = Callable[["object", Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Arm:
    """One arm of the study.

    name: the config value of ``perturb.arm``.
    dropout: feature masks on ``perturb.sites`` (``attn``, ``mlp``, ``embed``, ``thought``) with drop
        probability ``perturb.p`` and scope ``perturb.scope``.
    per_step: with ``dropout``, a fresh mask at every latent step instead of one per rollout.
    thought: a function applied to every fed-back thought (e.g. Gaussian noise); None: none.
    greedy_answers: rollout answers decoded greedily whatever ``grpo.answer_temperature`` says.
    phase: the schedule phase the arm trains with: ``grpo``, or ``sft`` (a supervised control).
    start: the checkpoint the study starts it from and the stage it trains at: ``latent`` (the trained
        Coconut model, fully latent stage) or ``cot`` (the CoT model at stage 0, CoT prompt layout).
    in_study: part of ``experiments/ablate.py``'s default arms.
    help: one line for tables and ``--help``.
    """

    name: str
    dropout: bool = False
    per_step: bool = False
    thought: ThoughtFn | None = None
    greedy_answers: bool = False
    phase: Literal["grpo", "sft"] = "grpo"
    start: Literal["latent", "cot"] = "latent"
    in_study: bool = True
    help: str = ""

    @property
    def uses_sites(self) -> bool:
        """Whether ``perturb.sites`` / ``perturb.scope`` / ``perturb.p`` mean anything for this arm."""
        return self.dropout


ARMS: dict[str, Arm] = {}


def register_arm(arm: Arm) -> Arm:
    """Add (or replace) an arm; returns it so a module can keep a handle."""
    if arm.per_step and not arm.dropout:
        raise ValueError(f"arm {arm.name!r}: per_step only applies to dropout arms")
    ARMS[arm.name] = arm
    return arm


def get_arm(name: str) -> Arm:
    """The arm called ``name``; an unknown name raises with the registered choices."""
    try:
        return ARMS[name]
    except KeyError:
        raise ValueError(f"perturb.arm={name!r} is unknown; choose one of {tuple(ARMS)}") from None


def study_arms() -> tuple[str, ...]:
    """The study's arms, in registry order (tables and plots follow it)."""
    return tuple(a.name for a in ARMS.values() if a.in_study)


def gaussian_thought(perturber, h: Tensor, step: Tensor) -> Tensor:
    """Additive Gaussian noise on each fed-back thought: ``noise_scale`` times the thought's RMS, fresh
    at every latent step, drawn from (seed, step) so that the replay rebuilds it."""
    z = hash_normal(perturber.seeds(h.device), (SITE_IDS["gauss"], step.to(h.device)), h.shape[-1]).to(h.dtype)
    rms = h.detach().pow(2).mean(-1, keepdim=True).sqrt()
    return h + perturber.cfg.noise_scale * rms * z


# The built-in arms, in the order the study reports them.
register_arm(Arm("none", greedy_answers=True,
                 help="no perturbation, greedy answers: every group collapses (zero variance)"))
register_arm(Arm("temperature", help="no perturbation; answers sampled at grpo.answer_temperature"))
register_arm(Arm("dropout_per_step", dropout=True, per_step=True,
                 help="a fresh dropout mask at every latent step, drawn from (seed, step)"))
register_arm(Arm("gaussian", thought=gaussian_thought,
                 help="Gaussian noise on each fed-back thought (perturb.noise_scale x its RMS), fresh per step"))
register_arm(Arm("dropout_shared", dropout=True,
                 help="the method: one dropout mask per rollout, frozen across every latent step"))
register_arm(Arm("dropout_greedy", dropout=True, greedy_answers=True,
                 help="the premise: one frozen dropout mask per rollout and greedy answers, dropout the only noise"))
register_arm(Arm("sft_continue", phase="sft",
                 help="control: the same number of supervised latent steps, no RL"))
register_arm(Arm("cot_grpo", start="cot",
                 help="reference: GRPO with sampled answers on the explicit-CoT model, CoT prompts, no latent thoughts"))
