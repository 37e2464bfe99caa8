"""Reporting validation values to Optuna from inside a fit (one process or many ranks).

The trial runs in its own ``experiments/run.py fit`` process; the sweep driver hands it the trial's
identity through environment variables and the CLI adds :class:`SweepReporter` when they are set
(:func:`callbacks_from_env`). After every validation, rank 0 reports the monitored value at the
schedule's step counter (``step_count``: training batches done, what the pruner compares between
trials; it equals ``trainer.global_step`` with ``grpo.mu=1`` when no update is skipped, but
``global_step`` counts optimiser steps, which a GRPO step may make ``mu`` or zero of), asks the
pruner, and broadcasts the decision so that every rank stops together. This is what
``optuna_integration.PyTorchLightningPruningCallback`` does for DDP (RDB storage, decision kept in the
storage, ``check_pruned()`` after fit), except that it reports at the epoch, which here is a whole
schedule segment. The driver reads the outcome from the storage (``ll:pruned``) after the process ends.
"""
from __future__ import annotations

import json
import logging
import math
import os

import lightning as L
import optuna

from ...guards import CollapseError

log = logging.getLogger("lightning_latent.experiments.sweep")

ENV_STORAGE = "LL_OPTUNA_STORAGE"
ENV_STUDY = "LL_OPTUNA_STUDY"
ENV_TRIAL = "LL_OPTUNA_TRIAL"  # the trial number
ENV_METRIC = "LL_OPTUNA_METRIC"
ENV_PRUNER = "LL_OPTUNA_PRUNER"  # JSON of the sweep's pruner spec ({"type": "median", ...})
PRUNED_KEY = "ll:pruned"  # trial system attr: {"step": N, "value": v}
COLLAPSED_KEY = "ll:collapsed"  # trial system attr: {"step": N, "value": v, "message": ...} (guards.CollapseGuard)
LOG_DIR_KEY = "ll:log_dir"


def open_trial(storage_url: str, study_name: str, number: int, pruner: optuna.pruners.BasePruner | None = None
               ) -> optuna.trial.Trial:
    """A live handle on a RUNNING trial owned by another process (the sweep driver)."""
    storage = optuna.storages.RDBStorage(storage_url)
    study = optuna.load_study(study_name=study_name, storage=storage, pruner=pruner)
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    return optuna.trial.Trial(study, trial_id)


class SweepReporter(L.Callback):
    """Reports ``monitor`` after every validation on rank 0; the prune decision is broadcast."""

    def __init__(self, storage_url: str, study_name: str, trial_number: int, monitor: str = "val/pass@1",
                 pruner_spec: dict | None = None):
        self.storage_url, self.study_name, self.number = storage_url, study_name, int(trial_number)
        self.monitor = monitor
        self.pruner_spec = pruner_spec or {"type": "nop"}
        self._trial: optuna.trial.Trial | None = None
        self.pruned_at: int | None = None

    def _open(self) -> optuna.trial.Trial:
        if self._trial is None:
            from .space import make_pruner

            self._trial = open_trial(self.storage_url, self.study_name, self.number, make_pruner(self.pruner_spec))
        return self._trial

    def setup(self, trainer, pl_module, stage: str) -> None:
        log_dir = trainer.log_dir  # a collective (broadcast): every rank calls it
        if trainer.is_global_zero:
            trial = self._open()
            if log_dir:
                trial.storage.set_trial_system_attr(trial._trial_id, LOG_DIR_KEY, str(log_dir))

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        step = int(getattr(pl_module, "step_count", trainer.global_step))
        prune = False
        if trainer.is_global_zero:
            value = trainer.callback_metrics.get(self.monitor)
            if value is None:
                log.warning("sweep: %r is not among the logged metrics; nothing reported", self.monitor)
            elif not math.isfinite(float(value)):
                log.warning("sweep: %r is not finite at step %d; nothing reported", self.monitor, step)
            else:
                trial = self._open()
                if step not in trial._cached_frozen_trial.intermediate_values:
                    trial.report(float(value), step)
                prune = trial.should_prune()
                if prune:
                    trial.storage.set_trial_system_attr(trial._trial_id, PRUNED_KEY,
                                                        {"step": step, "value": float(value)})
                    log.info("sweep: trial %d pruned at step %d (%s=%.4f)", self.number, step, self.monitor,
                             float(value))
        prune = bool(trainer.strategy.broadcast(prune, src=0))
        if prune:
            self.pruned_at = step
            trainer.should_stop = True

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A run stopped by the collapse guard is a bad trial, not a crash: leave its value (the training
        reward it collapsed to) in the storage, so that the driver tells it and the sampler learns."""
        if isinstance(exception, CollapseError) and trainer.is_global_zero:
            trial = self._open()
            step = int(getattr(pl_module, "step_count", trainer.global_step))
            trial.storage.set_trial_system_attr(trial._trial_id, COLLAPSED_KEY, {
                "step": step, "value": exception.value, "message": str(exception)[:2000]})


def callbacks_from_env(environ=None) -> list[L.Callback]:
    """The sweep reporter when this fit is a sweep trial (the driver sets the variables), else []."""
    env = os.environ if environ is None else environ
    if not (env.get(ENV_STORAGE) and env.get(ENV_STUDY) and env.get(ENV_TRIAL)):
        return []
    pruner = json.loads(env[ENV_PRUNER]) if env.get(ENV_PRUNER) else None
    return [SweepReporter(env[ENV_STORAGE], env[ENV_STUDY], int(env[ENV_TRIAL]),
                          env.get(ENV_METRIC) or "val/pass@1", pruner)]
