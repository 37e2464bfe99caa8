"""Hyperparameter sweeps on Optuna: one ``experiments/run.py fit`` process (DDP over D devices, or
``torchrun`` across nodes) per trial, pruned from inside the fit, results written as CSV, markdown
and plots.

- :mod:`.space`: the sweep YAML (base config, search space, objective, sampler, pruner) and how a
  trial's parameters become command-line overrides.
- :mod:`.report`: the callback that reports validation values from inside a fit and broadcasts the
  prune decision to every rank.
- :mod:`.runner`: the command line of one trial and the process that runs it.
- :mod:`.driver`: the worker loop (ask, run, tell; heartbeats, stale trials, budget) and results.
"""
from .pruning import ENV_METRIC, ENV_PRUNER, ENV_STORAGE, ENV_STUDY, ENV_TRIAL, SweepReporter, callbacks_from_env
from .space import SweepConfig, load_sweep_config

__all__ = ["SweepConfig", "load_sweep_config", "SweepReporter", "callbacks_from_env", "ENV_STORAGE", "ENV_STUDY",
           "ENV_TRIAL", "ENV_METRIC", "ENV_PRUNER"]
