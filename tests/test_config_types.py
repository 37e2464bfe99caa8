"""lightning_latent/config_types.py: plain dicts (hand-written YAML, old checkpoints) into the config
dataclasses, and the configs allow-listed for ``torch.load(weights_only=True)`` (what ``--ckpt_path`` uses)."""
from __future__ import annotations

import pytest
import torch

from lightning_latent.config_types import coerce
from lightning_latent.data.layout import CurriculumConfig
from lightning_latent.data.synthetic import SyntheticConfig
from lightning_latent.evaluation import EvalConfig
from lightning_latent.model.build import ModelConfig
from lightning_latent.model.perturb import PerturbConfig
from lightning_latent.optim import OptimConfig
from lightning_latent.rl.update import GRPOConfig
from lightning_latent.schedule import Phase, PlateauRule


def test_coerce_turns_a_dict_into_the_dataclass_and_leaves_the_rest():
    cfg = coerce(GRPOConfig, {"group_size": 8, "beta": 0.0})
    assert isinstance(cfg, GRPOConfig) and cfg.group_size == 8 and cfg.beta == 0.0 and cfg.mu == GRPOConfig().mu
    same = OptimConfig(lr=2e-3)
    assert coerce(OptimConfig, same) is same and coerce(OptimConfig, None) is None
    syn = coerce(SyntheticConfig, {"operators": ["+", "-"], "seed": 3})  # lists from YAML: tuples, hashable
    assert syn.operators == ("+", "-") and syn == SyntheticConfig(operators=("+", "-"), seed=3)
    phase = coerce(Phase, {"kind": "coconut", "steps": [1, 2], "stages": [1, 2], "plateau": {"every": 5}})
    assert phase.plateau == PlateauRule(every=5) and phase.steps == [1, 2]
    with pytest.raises(ValueError, match="grpo.group_size=1"):  # the dataclass's own checks run
        coerce(GRPOConfig, {"group_size": 1})


def test_every_config_loads_with_weights_only(tmp_path):
    configs = {"backbone": ModelConfig(n_layer=1), "curriculum": CurriculumConfig(c_thought=2),
               "schedule": [Phase("cot", steps=3, plateau=PlateauRule(every=2))], "perturb": PerturbConfig(p=0.2),
               "grpo": GRPOConfig(mu=1), "optim": OptimConfig(lr=1e-4), "evaluation": EvalConfig(k=2),
               "synthetic": SyntheticConfig(seed=4)}
    torch.save({"hyper_parameters": configs}, tmp_path / "hp.ckpt")
    back = torch.load(tmp_path / "hp.ckpt", weights_only=True)["hyper_parameters"]
    assert back == configs
