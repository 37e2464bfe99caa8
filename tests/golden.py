"""Golden values of the GRPO update: one short fit per setting, everything it computes recorded.

``python tests/golden.py record OUT.pt`` runs two GRPO steps of a tiny model for each setting in
:data:`SETTINGS` (each aggregation, beta > 0, mu = 2, micro-batching, dynamic sampling, std
advantages) and saves, per setting, every gradient handed to the optimiser, every logged scalar after
every step and the final weights. ``python tests/golden.py compare A.pt B.pt`` says whether two
recordings are bit-identical (the refactor check) and prints the largest difference otherwise.
``tests/integration/test_golden.py`` replays the settings against the committed ``tests/fixtures/golden_grpo.pt``
with a small tolerance, so a later change that alters the update is caught.

Timings (``perf/*``) are left out: they differ from run to run.
"""
from __future__ import annotations

import inspect
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import faults  # noqa: E402,F401  (registers the text_hash reward: mixed groups, a non-zero gradient)

SETTINGS: dict[str, dict] = {
    "grpo": {},
    "dr_grpo": {"aggregation": "dr_grpo"},
    "dapo": {"aggregation": "dapo"},
    "beta": {"beta": 0.05},
    "mu2": {"mu": 2, "beta": 0.05},
    "micro": {"micro_batch_rows": 3, "mu": 2},
    "dynamic": {"dynamic_sampling": True, "max_groups": 2},
    "std": {"advantage": "std", "epsilon_high": 0.28},
}


class _Recorder(L.Callback):
    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.metrics: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters()
                           if p.grad is not None})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.metrics.append({k: float(v) for k, v in sorted(trainer.callback_metrics.items())
                             if not k.startswith("perf/")})



#: The settings of the recording that later became other defaults (the synthetic recipe: grpo_lr 5e-5,
#: beta 0.01, mu 2), pinned so that the recording stays comparable with any later default.
PINNED_GRPO = {"beta": 0.0, "mu": 1}


def _pinned_optim() -> dict:
    """The optimiser settings of the recording (grpo_lr 1e-4), passed explicitly."""
    try:
        from lightning_latent.optim import OptimConfig
    except ImportError:  # before the refactor: the module default was the recording's
        return {}
    return {"optim": OptimConfig(grpo_lr=1e-4)}


def run_setting(name: str, root: str) -> dict:
    """Two GRPO steps of a tiny model under setting ``name``: gradients, metrics, final weights."""
    from lightning_latent.data.datamodule import LatentDataModule
    from lightning_latent.data.layout import CurriculumConfig
    from lightning_latent.model.build import ModelConfig
    from lightning_latent.module import LatentReasoner
    from lightning_latent.schedule import Phase

    try:
        from lightning_latent.rl.update import GRPOConfig
    except ImportError:  # before the refactor GRPOConfig lived in module.py
        from lightning_latent.module import GRPOConfig

    L.seed_everything(0, verbose=False)
    backbone = ModelConfig(n_layer=1, n_embd=32, n_head=2)
    key = "backbone" if "backbone" in inspect.signature(LatentReasoner).parameters else "model"
    prompts = 3 if name == "dynamic" else 2
    module = LatentReasoner(**{key: backbone}, curriculum=CurriculumConfig(c_thought=1, max_latent_stage=2),
                            schedule=[Phase("grpo", steps=2)], grpo_prompts=prompts,
                            grpo=GRPOConfig(group_size=4, max_new_tokens=4, reward="text_hash",
                                            **{**PINNED_GRPO, **SETTINGS[name]}),
                            **_pinned_optim())
    rec = _Recorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=-1, reload_dataloaders_every_n_epochs=1,
                        check_val_every_n_epoch=None, val_check_interval=1000, num_sanity_val_steps=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, callbacks=[rec])
    trainer.fit(module, datamodule=LatentDataModule(val_limit=4, test_limit=4, eval_batch_size=4))
    return {"grads": rec.grads, "metrics": rec.metrics,
            "weights": {k: v.detach().clone() for k, v in module.model.state_dict().items()}}


def record(root: str) -> dict:
    torch.set_num_threads(1)
    return {name: run_setting(name, root) for name in SETTINGS}


def differences(a: dict, b: dict) -> list[str]:
    """Every place where two recordings differ, with the largest absolute difference."""
    out = []
    for name in a:
        ra, rb = a[name], b.get(name)
        if rb is None:
            out.append(f"{name}: missing")
            continue
        if len(ra["grads"]) != len(rb["grads"]):
            out.append(f"{name}: {len(ra['grads'])} vs {len(rb['grads'])} optimiser steps")
        for i, (ga, gb) in enumerate(zip(ra["grads"], rb["grads"])):
            if set(ga) != set(gb):
                out.append(f"{name}: step {i} gradient names differ")
            for k in ga:
                if k in gb and not torch.equal(ga[k], gb[k]):
                    out.append(f"{name}: step {i} grad {k} max diff {(ga[k] - gb[k]).abs().max().item():.3g}")
        for i, (ma, mb) in enumerate(zip(ra["metrics"], rb["metrics"])):
            for k in sorted(ma):  # metrics logged since the recording (new diagnostics) are not compared
                va, vb = ma.get(k), mb.get(k)
                if va != vb and not (va != va and vb != vb):  # NaN == NaN here
                    out.append(f"{name}: step {i} metric {k}: {va} vs {vb}")
        for k in ra["weights"]:
            if not torch.equal(ra["weights"][k], rb["weights"][k]):
                out.append(f"{name}: weight {k} max diff "
                           f"{(ra['weights'][k] - rb['weights'][k]).abs().max().item():.3g}")
    return out


if __name__ == "__main__":
    import tempfile

    if sys.argv[1] == "record":
        with tempfile.TemporaryDirectory() as d:
            torch.save(record(d), sys.argv[2])
        print(f"recorded {sys.argv[2]}")
    elif sys.argv[1] == "compare":
        diffs = differences(torch.load(sys.argv[2]), torch.load(sys.argv[3]))
        print("\n".join(diffs) if diffs else "bit-identical")
        sys.exit(1 if diffs else 0)
