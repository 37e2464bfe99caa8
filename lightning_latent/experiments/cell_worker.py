"""A long-lived process that runs ``experiments/run.py`` invocations one after another, in-process.

A study cell used to be a fresh ``python experiments/run.py ...`` process: a dozen seconds of interpreter
start and imports (lightning, transformers, datasets) before the first step, fifteen times per seed. A
worker pays that once and then runs each cell's command line through the same
:func:`lightning_latent.cli.main` a fresh process would, so a cell computes exactly what its process
computed (the command line seeds everything; the only process-wide state a run changes, the skipped-row
counter, is reset before each cell). Each cell's output (file descriptors 1 and 2, so Python, Lightning
and C-level output alike) goes to its own log file, as a cell process's did.

Protocol: the parent writes one JSON object per line to the worker's stdin, ``{"argv": [...], "log": path}``,
and reads one per line back from the worker's stdout, ``{"rc": exit code}``; EOF ends the worker.
:class:`CellWorker` is the parent's handle.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def _output_to(path: str):
    """Point file descriptors 1 and 2 (and Python's streams) at ``path`` for the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab", buffering=0) as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_cell(argv: list[str], log_path: str) -> int:
    """``experiments/run.py`` with ``argv``, in this process; its output appended to ``log_path``. Returns
    the exit code the process would have had."""
    from lightning_latent.cli import main
    from lightning_latent.data.sources import SKIPS

    SKIPS._counts.clear()  # a fresh process starts with no skipped rows counted
    with _output_to(log_path):
        try:
            main(argv)
            return 0
        except SystemExit as err:  # argparse errors, --help
            return err.code if isinstance(err.code, int) else 1
        except BaseException:  # noqa: BLE001 - a failed cell is reported, the worker goes on
            traceback.print_exc()
            return 1
        finally:
            import gc

            gc.collect()


def serve() -> None:
    """The worker's loop: requests on stdin, answers on a private copy of stdout (fd 1 goes to the logs)."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # stray output between cells goes nowhere, never into the answers
    import lightning_latent.cli  # noqa: F401  (the imports a cell would pay, paid once)

    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        rc = run_cell(req["argv"], req["log"])
        try:
            answers.write(json.dumps({"rc": rc}) + "\n")
        except BrokenPipeError:  # the driver is gone (stopped or killed): nobody to answer, nothing to add
            return


class CellWorker:
    """A worker process started with ``env`` in ``cwd``; :meth:`run` runs one cell in it."""

    def __init__(self, env: dict[str, str], cwd: Path):
        self.proc = subprocess.Popen([sys.executable, "-m", "lightning_latent.experiments.cell_worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=cwd, text=True,
                                     start_new_session=True)

    def run(self, argv: list[str], log_path: Path) -> int:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the cell worker exited (code {self.proc.returncode})")
        self.proc.stdin.write(json.dumps({"argv": argv, "log": str(log_path)}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the cell worker died during a cell (code {self.proc.wait()}); see {log_path}")
        return int(json.loads(line)["rc"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


if __name__ == "__main__":
    serve()
