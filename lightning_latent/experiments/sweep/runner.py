"""One trial = one ``experiments/run.py fit`` process (Lightning's DDP launcher over D devices on one
machine, or ``torchrun`` on each of several nodes), with its own TensorBoard version directory named
after the trial, its output in a log file, and the trial's identity in environment variables.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The process side (own session, log file, group kill, error line) is shared with the ablation study.
from ..processes import REPO_ROOT, RUN_SCRIPT, error_from_log, kill_group, run_process, shell_line
from .pruning import ENV_METRIC, ENV_PRUNER, ENV_STORAGE, ENV_STUDY, ENV_TRIAL

__all__ = ["Launch", "REPO_ROOT", "RUN_SCRIPT", "command", "error_from_log", "fit_args", "kill_group", "run_process",
           "shell_line", "trial_env", "trial_version"]


@dataclass
class Launch:
    """Where a trial's processes run: D devices on each of ``nnodes`` nodes."""

    devices: int = 1
    accelerator: str | None = None  # None: the config's (auto)
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    python: str = field(default_factory=lambda: sys.executable)

    @property
    def world_size(self) -> int:
        return self.devices * self.nnodes


def trial_version(number: int) -> str:
    return f"trial_{number:04d}"


def _cli_value(v: Any) -> str:
    if isinstance(v, str):
        return v
    return json.dumps(v)


def fit_args(base_config: str | None, overrides: dict[str, Any], tb_dir: str | Path, name: str, version: str,
             launch: Launch) -> list[str]:
    """The arguments of ``run.py fit`` for one trial (without the interpreter / launcher)."""
    args = ["fit"]
    if base_config:
        args += ["--config", str(base_config)]
    for k, v in overrides.items():
        args.append(f"--{k}={_cli_value(v)}")
    args += [f"--trainer.logger.init_args.save_dir={tb_dir}", f"--trainer.logger.init_args.name={name}",
             f"--trainer.logger.init_args.version={version}", f"--trainer.devices={launch.devices}"]
    if launch.accelerator:
        args.append(f"--trainer.accelerator={launch.accelerator}")
    if launch.world_size > 1:
        args.append("--trainer.strategy=ddp")
    if launch.nnodes > 1:
        args.append(f"--trainer.num_nodes={launch.nnodes}")
    return args


def command(fit: list[str], launch: Launch) -> list[str]:
    """The full command line on this node: ``python run.py ...`` (Lightning spawns the other local
    ranks) or, across nodes, ``python -m torch.distributed.run --nnodes N --node_rank R ...``."""
    if launch.nnodes > 1:
        return [launch.python, "-m", "torch.distributed.run", f"--nnodes={launch.nnodes}",
                f"--node_rank={launch.node_rank}", f"--nproc_per_node={launch.devices}",
                f"--master_addr={launch.master_addr}", f"--master_port={launch.master_port}",
                str(RUN_SCRIPT), *fit]
    return [launch.python, str(RUN_SCRIPT), *fit]


def trial_env(storage_url: str, study_name: str, number: int, metric: str, pruner: dict,
              base: dict | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update({ENV_STORAGE: storage_url, ENV_STUDY: study_name, ENV_TRIAL: str(number), ENV_METRIC: metric,
                ENV_PRUNER: json.dumps(pruner)})
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
