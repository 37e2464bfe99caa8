"""A trained tiny start for GRPO tests: one-step additions, a CoT model that scores > 0.

A tiny GPT-2 trained for 150 steps on one-step additions (94% greedy pass@1 with the CoT layout, about
10 s) is the start (the session fixture ``cot_ckpt`` in ``conftest.py``): a model that scores > 0, so its
groups are mixed before anything goes wrong. Used by ``test_guards.py`` (the collapse guard) and
``test_rollout.py`` (truncated rollouts, GRPO on a CoT model).
"""
from __future__ import annotations

import lightning as L

from lightning_latent.data.datamodule import LatentDataModule
from lightning_latent.data.layout import CurriculumConfig
from lightning_latent.data.synthetic import SyntheticConfig
from lightning_latent.evaluation import EvalConfig
from lightning_latent.model.build import ModelConfig
from lightning_latent.model.perturb import PerturbConfig
from lightning_latent.module import LatentReasoner
from lightning_latent.optim import OptimConfig
from lightning_latent.rl.update import GRPOConfig
from lightning_latent.schedule import Phase

from conftest import tiny_trainer

SYN = SyntheticConfig(min_steps=1, max_steps=1, max_number=5, max_value=20, operators="+")


def tiny(schedule, **kw) -> LatentReasoner:
    kw.setdefault("evaluation", EvalConfig(max_new_tokens=16))
    return LatentReasoner(backbone=ModelConfig(n_layer=2, n_embd=64, n_head=2, n_positions=64), max_length=64,
                          synthetic=SYN, curriculum=CurriculumConfig(c_thought=1, max_latent_stage=1),
                          schedule=schedule, **kw)


def fit(module, root, steps_log: list | None = None) -> L.Trainer:
    t = tiny_trainer(root)
    t.fit(module, datamodule=LatentDataModule(synthetic=SYN, val_limit=32, test_limit=32, eval_batch_size=32))
    return t


def grpo_from(ckpt, lr=1e-4, reward="exact_match", arm="temperature", steps=6, patience=3, p=0.1) -> LatentReasoner:
    L.seed_everything(0, verbose=False)
    return tiny([Phase("grpo", steps=steps, stages=[0])], init_from=ckpt, grpo_prompts=8,
                optim=OptimConfig(grpo_lr=lr), perturb=PerturbConfig(arm=arm, p=p),
                grpo=GRPOConfig(group_size=4, max_new_tokens=16, collapse_patience=patience, reward=reward))
