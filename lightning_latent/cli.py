"""The command line: ``python experiments/run.py fit|validate|test|predict [--config FILE ...]``.

A thin :class:`~lightning.pytorch.cli.LightningCLI`: with no config it runs the embedded default (the
synthetic task, a small GPT-2 trained from scratch on CPU, every phase). Each run logs to its own
TensorBoard version directory, where the CLI saves ``config.yaml`` and :class:`EnvironmentRecord`
saves ``env.json``; checkpoints go to ``<version dir>/checkpoints`` (``last.ckpt`` for resuming).

Where things go (Lightning's convention): ``--trainer.default_root_dir DIR`` puts the logs, checkpoints
and ``summary.json`` under ``DIR/<logger name>/version_N``; without it they go under ``./logs``; a logger
``save_dir`` given explicitly (other than the default ``logs``) wins over both.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningCLI

from . import quiet
from .callbacks import ComputeMeter, EnvironmentRecord, PhaseSummary, StepCheckpoint
from .data.datamodule import LatentDataModule
from .helptext import description_first
from .experiments.hparams import HParamsSummary
from .module import LatentReasoner
from .progress import ScheduleProgress
from .experiments.sweep.pruning import callbacks_from_env as sweep_callbacks_from_env

TRAINER_DEFAULTS = {
    "max_epochs": -1,  # the schedule decides when a fit ends
    "reload_dataloaders_every_n_epochs": 1,  # one loader per schedule segment
    "check_val_every_n_epoch": None,
    "val_check_interval": 200,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 10,
    "accelerator": "auto",
    "devices": 1,
    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
               "init_args": {"save_dir": "logs", "name": "default", "default_hp_metric": False}},
}
DEFAULT_SAVE_DIR = "logs"  # the logger's save_dir unless --trainer.default_root_dir or an explicit one

DESCRIPTION = """Train, validate, test or predict with a latent-reasoning (Coconut) model through one schedule of
phases (CoT, the latent curriculum, Dropout-GRPO); with no config: the embedded synthetic default.

Example: python experiments/run.py fit --trainer.default_root_dir runs/"""


class LatentCLI(LightningCLI):
    def init_parser(self, **kwargs):
        return description_first(super().init_parser(**kwargs))  # --help: what it does, then usage

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(StepCheckpoint, "checkpoint")
        # The schedule-aware progress display (lightning_latent/progress.py): --progress.every N, --progress.mode
        parser.add_lightning_class_args(ScheduleProgress, "progress")
        # Phase-end evaluations and phase checkpoints (callbacks.PhaseSummary): --summary.splits, ...
        parser.add_lightning_class_args(PhaseSummary, "summary")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 100,
                             "checkpoint.save_top_k": 0, "checkpoint.filename": "step{step}"})
        parser.link_arguments("data.synthetic", "model.synthetic", apply_on="instantiate")
        parser.link_arguments("data.seed", "model.seed", apply_on="instantiate")
        parser.link_arguments("data.task", "model.task", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        # Lightning 2.6 would overwrite the command line with the checkpoint's hyperparameters (so
        # `test --ckpt_path X --model.evaluation.k 8` would silently run with k=0). Here the command
        # line is the truth: give `--ckpt_path` runs the same --config the checkpoint was trained with.
        return None

    def before_instantiate_classes(self) -> None:
        # --trainer.default_root_dir DIR: the logger writes under DIR unless its save_dir was set explicitly.
        cfg = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        root = cfg.get("trainer.default_root_dir")
        logger = cfg.get("trainer.logger")
        init = getattr(logger, "init_args", None) if logger is not None and not isinstance(logger, bool) else None
        if root and init is not None and "save_dir" in init and str(init.save_dir) == DEFAULT_SAVE_DIR:
            init.save_dir = str(root)

    def _instantiate_trainer(self, config, callbacks):
        # Lightning refuses a progress-bar callback when the progress bar is off.
        if config.get("enable_progress_bar") is False:
            callbacks = [c for c in callbacks if not isinstance(c, ScheduleProgress)]
        # Always on: the environment record and the phase-end summary (configured by --summary.*, and kept
        # in this place among the callbacks). HParamsSummary: hyperparameters + final metrics for
        # TensorBoard's HParams tab; a sweep trial (LL_OPTUNA_* env set by sweeps/sweep.py) also gets the
        # Optuna reporter / pruner.
        summary = next(c for c in callbacks if isinstance(c, PhaseSummary))
        callbacks = [c for c in callbacks if not isinstance(c, PhaseSummary)]
        return super()._instantiate_trainer(config, [*callbacks, EnvironmentRecord(), ComputeMeter(), summary,
                                                     HParamsSummary(),
                                                     *sweep_callbacks_from_env()])

    def after_predict(self) -> None:
        self._write_predictions()

    def after_test(self) -> None:
        self._write_predictions()

    def _write_predictions(self) -> None:
        """Per-example predictions (JSONL) next to the run's logs."""
        trainer, module = self.trainer, self.model
        rows = module.predictions
        if self.subcommand == "predict" and self.trainer.predict_loop.predictions:
            rows = [r for batch in trainer.predict_loop.predictions for r in batch]
        log_dir = trainer.log_dir  # a collective (broadcast): every rank must call it
        if trainer.is_global_zero and log_dir and rows:
            path = Path(log_dir) / f"predictions_{self.subcommand}.jsonl"
            with open(path, "w") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
            print(f"predictions: {path}")


def main(args=None) -> LatentCLI:
    quiet.install()
    torch.set_float32_matmul_precision("high")
    cli = LatentCLI(
        LatentReasoner,
        LatentDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": False},
        parser_kwargs={"default_env": False, "description": DESCRIPTION},
        args=args,
    )
    end_process_group()
    return cli


def end_process_group() -> None:
    """Destroy the default process group of a finished DDP run, if any. Why: Lightning registers this at exit for
    NCCL only; a gloo (CPU) group left to the interpreter's finalisation can abort the process (``terminate
    called without an active exception``, SIGABRT, pytorch#190489). A rank that aborts at exit fails its torchrun
    agent even though training finished, and on a multi-node run the other nodes' agents then wait out their exit
    barrier (300 s) before returning: seen in ``test_torchrun_two_nodes_on_loopback`` on 2026-12-06. Called on
    the success path only: after an exception another rank may still be inside a collective."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
