"""Loaded by every Python process started with this folder on PYTHONPATH (``site`` imports it): when
``LL_CELL_PROFILE`` names a folder and the process is an ``experiments/run.py`` run or a study's cell
worker (``lightning_latent/experiments/cell_worker.py``), it installs
:mod:`cell_profiler` (a wall-clock profile by part, written to that folder at exit). Used by
``benchmarks/study_cell.py`` to profile the study's cells of any commit without changing its code."""
import os
import sys

# (sys.argv[0] is still "-m" while site runs; sys.orig_argv holds the module's name)
_argv = " ".join(getattr(sys, "orig_argv", sys.argv))
if os.environ.get("LL_CELL_PROFILE") and ("run.py" in _argv or "cell_worker" in _argv):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import cell_profiler

    cell_profiler.install(os.environ["LL_CELL_PROFILE"])
