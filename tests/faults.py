"""Fault injection for the reliability tests, loaded into a real CLI run by ``tests/faults_run.py``.

``Faults`` (a Lightning callback, given with ``--trainer.callbacks``) records every training batch's
record ids to a JSONL file (flushed per line, so it survives SIGKILL) and can kill its own process with
SIGKILL at a given step, either between steps or in the middle of writing a checkpoint.
``NaNAt`` makes the loss of chosen steps non-finite through a forward hook on the LM head.
Importing this module registers the ``text_hash`` reward: a random tiny model never answers right, so
this multi-level reward of the text gives groups with different rewards and a non-zero GRPO gradient.
"""
from __future__ import annotations

import json
import os
import signal

import lightning as L
import torch

from lightning_latent.rl.rewards import REWARDS

REWARDS["text_hash"] = lambda texts, golds: torch.tensor([float(sum(map(ord, t)) % 5) / 4 for t in texts])


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class Faults(L.Callback):
    def __init__(self, trace: str | None = None, kill_at: int | None = None, kill_in_save_at: int | None = None):
        self.trace, self.kill_at, self.kill_in_save_at = trace, kill_at, kill_in_save_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = pl_module.step_count
        if self.kill_at is not None and step == self.kill_at:
            _die()  # steps 0..kill_at-1 done and checkpointed; this batch never trains
        if self.kill_in_save_at is not None and step == self.kill_in_save_at:
            self._arm_partial_write()
        if self.trace and step < pl_module.total_steps:  # (batches past the end are drawn but not trained)
            with open(self.trace, "a") as f:
                f.write(json.dumps({"step": step, "ids": [r.idx for r in batch]}) + "\n")
                f.flush()
                os.fsync(f.fileno())

    @staticmethod
    def _arm_partial_write() -> None:
        """The next checkpoint file write puts half its bytes on disk, then the process is SIGKILLed."""
        from fsspec.implementations.local import LocalFileOpener

        def write(self, data):
            n = len(data) // 2
            self.f.write(data[:n])
            self.f.flush()
            os.fsync(self.f.fileno())
            _die()

        LocalFileOpener.write = write


class NaNAt(L.Callback):
    """Steps whose training forward gives NaN logits (so a NaN loss and NaN gradients)."""

    def __init__(self, steps: list[int]):
        self.steps = set(steps)
        self.handle = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        if pl_module.step_count in self.steps:
            head = pl_module.model.lm.get_output_embeddings()
            self.handle = head.register_forward_hook(lambda m, i, o: o * float("nan"))
