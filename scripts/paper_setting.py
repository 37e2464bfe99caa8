"""Issue 22's measurement after the difficulty search, every step in order, for a detached, resumable run.

    python scripts/paper_setting.py --task p4_40 --work /work/runs/paper \
        --start0 /work/runs/difficulty/tb/p4_40/v0/checkpoints/last.ckpt [--until recipe] [--grid-steps 300]

Steps (docs/results/paper_setting_plan.md; lightning_latent/experiments/paper_setting.py): diversity, ptrain,
recipe, noise, study, pt0, extend. Each choice goes to ``OUT/choices.json`` (default
docs/results/paper_setting/) by a rule fixed before it runs; the study's tables to ``--study-out`` (default
docs/results/ablation/). Rerun the same command to resume: finished steps are skipped, unfinished runs
continue. Progress: ``WORK/progress.log``. Run it from a fixed commit (a worktree), e.g.
``nohup python scripts/paper_setting.py ... > WORK/driver.out 2>&1 &``.
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
from pathlib import Path

import torch

from lightning_latent.experiments.paper_setting import STEPS, PaperSetting
from lightning_latent.experiments.tasks import TASKS

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", required=True, choices=sorted(TASKS), help="the task of docs/results/difficulty/")
    ap.add_argument("--work", type=Path, required=True, help="runs and checkpoints (outside the repository)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "paper_setting")
    ap.add_argument("--study-out", type=Path, default=REPO / "docs" / "results" / "ablation")
    ap.add_argument("--start0", help="seed 0's p_train 0.1 start: the task's difficulty probe's last.ckpt")
    ap.add_argument("--grid-steps", type=int, default=300, help="RL steps of each grid trial")
    ap.add_argument("--ptrain-lr", type=float, default=None,
                    help="GRPO lr of the p_train step's dropout_greedy cells (default: dropout_grpo.yaml's)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--max-seeds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per cell (two cells run side by side)")
    ap.add_argument("--until", choices=STEPS, default=STEPS[-1], help="stop after this step")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ps = PaperSetting(a.task, a.work, a.out, a.study_out, a.start0, a.grid_steps, a.seeds, a.max_seeds, a.threads,
                      ptrain_lr=a.ptrain_lr)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False).stdout
    ps.note(f"paper_setting {a.task} until {a.until}: commit {commit.strip() or '?'}, "
            f"CPU {torch.backends.cpu.get_cpu_capability()}, {a.threads} thread(s) per cell")
    print(json.dumps(ps.run(a.until), indent=1))


if __name__ == "__main__":
    main()
