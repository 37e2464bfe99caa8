"""Experiment tooling on top of the training core: the ablation study (run and report), the diversity
probe, Optuna sweeps, TensorBoard HParams and run comparisons. The core (the package root) never imports
this package, except ``cli.py`` for the two callbacks a run gets (HParams, and a sweep trial's pruning)."""
