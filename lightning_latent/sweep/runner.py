"""One trial = one ``experiments/run.py fit`` process (Lightning's DDP launcher over D devices on one
machine, or ``torchrun`` on each of several nodes), with its own TensorBoard version directory named
after the trial, its output in a log file, and the trial's identity in environment variables.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .report import ENV_METRIC, ENV_PRUNER, ENV_STORAGE, ENV_STUDY, ENV_TRIAL

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_SCRIPT = REPO_ROOT / "experiments" / "run.py"


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


def shell_line(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def error_from_log(path: Path, limit: int = 2000) -> str:
    """The last traceback's final line (or the log's tail) for the trial's error attribute."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    lines = [re.sub(r"^\[rank\d+\]:\s?", "", ln) for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        s = ln.strip()
        if (s.split(":", 1)[0].endswith(("Error", "Exception", "Interrupt")) or s.startswith("error:")) and \
                not s.startswith("File "):
            return s[:limit]
    return "\n".join(lines[-5:])[-limit:]


def kill_group(proc: subprocess.Popen, sig=signal.SIGTERM, wait_s: float = 10.0) -> None:
    """Signal the trial's whole process group (all ranks), then SIGKILL whatever is left."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_process(cmd: list[str], env: dict[str, str], log_path: Path, timeout_s: float | None = None,
                on_start: Callable[[subprocess.Popen], None] | None = None, cwd: str | Path = REPO_ROOT) -> int:
    """Run ``cmd`` in its own session (so every rank can be signalled together), output to
    ``log_path``; returns the exit status. Ctrl-C / SIGTERM in the caller stop the whole group."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as logf:
        logf.write(f"$ {shell_line(cmd)}\n".encode())
        logf.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, cwd=str(cwd),
                                start_new_session=True)
        if on_start is not None:
            on_start(proc)
        t0 = time.monotonic()
        try:
            while True:
                try:
                    return proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                        kill_group(proc)
                        logf.write(f"\n[sweep] trial killed after its timeout of {timeout_s:.0f} s\n".encode())
                        return -9
        except BaseException:
            kill_group(proc, signal.SIGINT)
            raise
