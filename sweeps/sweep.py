"""Run an Optuna hyperparameter sweep over Dropout-GRPO trials (one DDP fit per trial) and write its report.

Example: python sweeps/sweep.py --config sweeps/tiny.yaml --n-trials 4 --out sweeps/out/tiny

    python sweeps/sweep.py --config sweeps/dropout_grpo.yaml --n-trials 20 --out sweeps/out/dropout_grpo \
        [--storage postgresql://user:pw@host/db] [--study-name NAME] [--devices 2] [--init-from PATH.ckpt]

Start the same command on several machines (same --storage and --study-name) to share the study.
See lightning_latent/experiments/sweep/driver.py for the details; `optuna-dashboard <storage>` shows the study.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_latent.experiments.sweep.driver import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
