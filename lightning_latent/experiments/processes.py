"""Running ``experiments/run.py`` as a child process: the one launcher for sweep trials and study cells.

Both the Optuna sweep (:mod:`lightning_latent.experiments.sweep.driver`) and the ablation study
(:mod:`lightning_latent.experiments.study`) run every training / evaluation as an ordinary ``experiments/run.py``
process, so any number they report can be rerun by hand. They share this module rather than the study
importing from ``sweep/``: a study cell is not a sweep trial, but the process handling is the same —
its own session (so DDP ranks are signalled together), output appended to a log file that starts with
the command line, the whole group stopped on Ctrl-C / SIGTERM or timeout, and the error read back
from the log.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

__all__ = ["REPO_ROOT", "RUN_SCRIPT", "error_from_log", "kill_group", "run_process", "shell_line"]

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_SCRIPT = REPO_ROOT / "experiments" / "run.py"


def shell_line(cmd: list[str]) -> str:
    """``cmd`` quoted so that it can be pasted into a shell (logs, the sweep's "run it again" line)."""
    return " ".join(shlex.quote(c) for c in cmd)


def error_from_log(path: Path, limit: int = 2000) -> str:
    """The last traceback's final line (or the log's tail): a one-line reason for a failed process."""
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


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait_s: float = 10.0) -> None:
    """Signal the process's whole group (all ranks), then SIGKILL whatever is left after ``wait_s``."""
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
    """Run ``cmd`` in its own session (so every rank can be signalled together), output appended to
    ``log_path`` after a ``$ command`` line; returns the exit status (-9 after ``timeout_s``).
    Ctrl-C / SIGTERM in the caller stop the whole group before the exception propagates."""
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
                        logf.write(f"\n[run_process] killed after its timeout of {timeout_s:.0f} s\n".encode())
                        return -9
        except BaseException:
            kill_group(proc, signal.SIGINT)
            raise
