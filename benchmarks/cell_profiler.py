"""Where a run's wall time goes: an exclusive-time profile by named part, for any commit of the package.

:func:`install` imports the package, wraps a fixed list of functions (by dotted path; a path that does
not exist in the commit being profiled is skipped, so old and new code are profiled by one definition)
and, at exit, writes ``<folder>/<pid>.json``: seconds per part path (``train step/rollouts``: the time
inside ``rollout`` called from the training step, minus the parts nested in it), the time before the
profile started (interpreter start and imports) and the total. Parts are attributed to the innermost
wrapped function running, so the parts add up to the total (the rest is ``other``).
"""
from __future__ import annotations

import atexit
import functools
import importlib
import json
import os
import sys
import time

# (dotted path, label); "module:Class.method" or "module:function"
PARTS = [
    ("lightning_latent.model.build:build_latent_model", "build model"),
    ("lightning_latent.model.build:read_checkpoint", "checkpoint read"),
    ("lightning.pytorch.trainer.connectors.checkpoint_connector:_CheckpointConnector.restore", "checkpoint read"),
    ("lightning.pytorch.trainer.trainer:Trainer.save_checkpoint", "checkpoint write"),
    ("torch.utils.data.dataloader:_BaseDataLoaderIter.__next__", "data"),
    ("lightning_latent.data.datamodule:LatentDataModule.eval_records", "data"),
    ("lightning_latent.module:LatentReasoner.training_step", "train step"),
    ("lightning_latent.module:LatentReasoner._sft_step", "supervised step"),
    ("lightning_latent.rl.rollout:rollout", "rollouts"),
    ("lightning_latent.rl.update:backward_micro_batches", "replay, loss and backward"),
    ("lightning_latent.rl.reference:Reference.logprobs", "reference"),
    ("lightning_latent.optim:guarded_step", "optimiser"),  # before issue 20
    ("lightning_latent.optim:GuardedOptimizer.step", "optimiser"),
    ("lightning_latent.module:LatentReasoner._plateau_check", "plateau evaluation"),
    ("lightning_latent.module:LatentReasoner.validation_step", "validation"),
    ("lightning_latent.module:LatentReasoner.test_step", "test"),
    ("lightning_latent.callbacks:PhaseSummary._evaluate", "phase-end evaluation"),
    ("lightning_latent.evaluation:Evaluator.answer", "greedy"),
    ("lightning_latent.evaluation:Evaluator.sample", "sampled"),
]

_stack: list[str] = []
_seconds: dict[str, float] = {}
_last = [0.0]


def _switch() -> None:
    now = time.perf_counter()
    if _stack:
        key = "/".join(_stack)
        _seconds[key] = _seconds.get(key, 0.0) + now - _last[0]
    _last[0] = now


def _wrap(fn, label: str):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _switch()
        _stack.append(label)
        try:
            return fn(*args, **kwargs)
        finally:
            _switch()
            _stack.pop()

    wrapper.__cell_profiled__ = True
    return wrapper


def _resolve(path: str):
    mod_name, _, attr = path.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError:
        return None
    owner, name = mod, attr
    if "." in attr:
        cls_name, name = attr.split(".", 1)
        owner = getattr(mod, cls_name, None)
    if owner is None or not hasattr(owner, name):
        return None
    return owner, name


def _process_start() -> float:
    """This process's start, on the ``time.time()`` clock (Linux: /proc; elsewhere: now)."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        start = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19]) / ticks
        uptime = float(open("/proc/uptime").read().split()[0])
        return time.time() - (uptime - start)
    except (OSError, ValueError, IndexError):
        return time.time()


def install(folder: str) -> None:
    t_process = _process_start()
    t_site = time.time()
    importlib.import_module("lightning_latent.cli")  # what the run imports anyway, counted as imports
    wrapped = []
    for path, label in PARTS:
        got = _resolve(path)
        if got is None:
            continue
        owner, name = got
        orig = getattr(owner, name)
        if getattr(orig, "__cell_profiled__", False):
            continue
        new = _wrap(orig, label)
        setattr(owner, name, new)
        # `from x import f` copies: replace them in every loaded module of the package
        for mname, m in list(sys.modules.items()):
            if mname.startswith("lightning_latent") and m is not None:
                for k, v in list(vars(m).items()):
                    if v is orig:
                        setattr(m, k, new)
        wrapped.append(path)
    t0 = time.time()
    _last[0] = time.perf_counter()
    p0 = _last[0]

    def write() -> None:
        _switch()
        total = time.perf_counter() - p0
        parts = dict(sorted(_seconds.items(), key=lambda kv: -kv[1]))
        os.makedirs(folder, exist_ok=True)
        out = {"argv": sys.argv[1:], "process_start_to_site": round(t_site - t_process, 3),
               "imports": round(t0 - t_site, 3), "profiled_total": round(total, 3),
               "other": round(total - sum(parts.values()), 3),
               "parts": {k: round(v, 3) for k, v in parts.items()}, "wrapped": wrapped,
               "wall": round(time.time() - t_process, 3)}
        with open(os.path.join(folder, f"{os.getpid()}.json"), "w") as f:
            json.dump(out, f, indent=1)

    atexit.register(write)
