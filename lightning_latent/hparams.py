"""TensorBoard HParams: every run's hyperparameters and final metrics, so that the HParams tab
compares sweep trials and ablation arms side by side.

:class:`HParamsSummary` (always on, added by the CLI) writes, on rank 0 at the end of ``fit`` and
``test``, the flattened hyperparameters of the module and the datamodule (dotted CLI keys: ``perturb.p``,
``grpo.group_size``, ``data.val_limit`` ...) with metrics ``final/<tag>`` (the last value of each
monitored scalar) and ``best/<tag>`` (the best value of the run), to the run's own event file.
"""
from __future__ import annotations

import math
import os
from typing import Any

import lightning as L

# Re-exported: the flattening that writes hyperparameters here is the one compare.py reads them back with.
from .reporting import flatten_hparams

__all__ = ["DEFAULT_METRICS", "HParamsSummary", "flatten_hparams"]

# metric tag -> "max" / "min" (which end is best)
DEFAULT_METRICS: dict[str, str] = {"val/pass@1": "max", "test/pass@1": "max", "train/loss": "min",
                                   "grpo/reward_mean": "max", "grpo/frac_zero_std": "min", "grpo/kl": "min"}


def _tb_experiment(trainer):
    from lightning.pytorch.loggers import TensorBoardLogger

    for lg in trainer.loggers:
        if isinstance(lg, TensorBoardLogger):
            return lg.experiment
    return None


class HParamsSummary(L.Callback):
    """Hyperparameters + final / best metrics for TensorBoard's HParams plugin (rank 0)."""

    def __init__(self, metrics: dict[str, str] | None = None):
        self.metrics = dict(DEFAULT_METRICS if metrics is None else metrics)
        self.history: dict[str, list[float]] = {}

    def _track(self, trainer) -> None:
        for tag in self.metrics:
            v = trainer.callback_metrics.get(tag)
            if v is not None:
                try:
                    f = float(v)
                except (TypeError, ValueError):
                    continue
                if math.isfinite(f):
                    self.history.setdefault(tag, []).append(f)

    def on_fit_start(self, trainer, pl_module) -> None:
        if not getattr(self, "_restored", False):
            self.history = {}
        self._restored = False

    # The history travels in checkpoints, so a resumed run's "best" and "final" cover the whole run.
    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {k: list(v) for k, v in state_dict.get("history", {}).items()}
        self._restored = True

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._track(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for tag in self.metrics:
            if tag.startswith(("train/", "grpo/")):
                v = trainer.callback_metrics.get(tag)
                if v is not None and math.isfinite(float(v)):
                    self.history.setdefault(tag, []).append(float(v))

    def on_fit_end(self, trainer, pl_module) -> None:
        self.write(trainer, pl_module)

    def on_test_end(self, trainer, pl_module) -> None:
        self._track(trainer)
        self.write(trainer, pl_module)

    def hparams(self, trainer, pl_module) -> dict[str, Any]:
        hp = flatten_hparams({k: v for k, v in dict(pl_module.hparams).items() if not k.startswith("_")})
        dm = trainer.datamodule
        if dm is not None:
            dm_hp = {k: v for k, v in dict(getattr(dm, "hparams", {}) or {}).items() if not k.startswith("_")}
            if not dm_hp:  # no save_hyperparameters(): the constructor's arguments kept as attributes
                import inspect

                dm_hp = {k: getattr(dm, k) for k in inspect.signature(type(dm).__init__).parameters
                         if k != "self" and hasattr(dm, k)}
            hp.update(flatten_hparams(dm_hp, "data."))
        if os.environ.get("LL_OPTUNA_TRIAL"):
            hp["sweep.study"] = os.environ.get("LL_OPTUNA_STUDY", "")
            hp["sweep.trial"] = int(os.environ["LL_OPTUNA_TRIAL"])
        return hp

    def final_metrics(self) -> dict[str, float]:
        out = {}
        for tag, vals in self.history.items():
            if not vals:
                continue
            mode = self.metrics.get(tag, "max")
            out[f"final/{tag}"] = vals[-1]
            out[f"best/{tag}"] = max(vals) if mode == "max" else min(vals)
        return out

    def write(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        writer = _tb_experiment(trainer)
        if writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        metrics = self.final_metrics()
        if not metrics:  # the plugin needs at least one metric to list a session
            metrics = {"final/steps": float(getattr(pl_module, "step_count", trainer.global_step))}
        else:
            metrics["final/steps"] = float(getattr(pl_module, "step_count", trainer.global_step))
        exp, ssi, sei = hparams(self.hparams(trainer, pl_module), metrics)
        fw = writer._get_file_writer()
        fw.add_summary(exp)
        fw.add_summary(ssi)
        fw.add_summary(sei)
        step = int(trainer.global_step)
        for k, v in metrics.items():
            writer.add_scalar(k, v, step)
        writer.flush()
