"""The config dataclasses as a whole: turning plain dicts into them, and allow-listing them for loading.

Each config class lives beside the code it configures, with its defaults and its ``__post_init__``
validation (docs/design.md#settings lists them all). Every checkpoint's hyperparameters hold these
dataclasses; torch >= 2.6 loads with ``weights_only=True`` by default (so does ``--ckpt_path``), which
refuses any class not allow-listed: they are registered here.
"""
from __future__ import annotations

import torch

from .data.layout import CurriculumConfig
from .data.synthetic import SyntheticConfig
from .evaluation import EvalConfig
from .model.build import ModelConfig
from .model.perturb import PerturbConfig
from .optim import OptimConfig
from .rl.update import GRPOConfig
from .schedule import Decay, Phase, PlateauRule


def coerce(cls, value):
    """A plain dict (hand-written YAML, an old checkpoint) -> the config dataclass ``cls``."""
    if isinstance(value, dict):
        kw = {k: tuple(v) if isinstance(v, list) and cls is SyntheticConfig else v for k, v in value.items()}
        return cls(**kw)
    return value


# Checkpoints written before the configs moved out of module.py name them ``lightning_latent.module.*``.
torch.serialization.add_safe_globals(
    [ModelConfig, CurriculumConfig, Phase, PlateauRule, Decay, PerturbConfig, GRPOConfig, OptimConfig, EvalConfig,
     SyntheticConfig, *((cls, f"lightning_latent.module.{cls.__name__}") for cls in (GRPOConfig, OptimConfig, EvalConfig))]
)
