"""Issue 22's p_train = 0 comparison: ``temperature``, ``dropout_shared`` and ``dropout_greedy`` from the study's
starts (trained with the arms' masks at the chosen ``p_train``) against the same arms from ``p_train = 0`` starts
(``PaperSetting.step_pt0``), seed by seed on the same test problems
(:mod:`lightning_latent.experiments.training_with_dropout`). It reads the finished cells of both studies and runs
nothing; seeds not finished in both are left out of the figures, so it can run while the pipeline does.

    python scripts/training_with_dropout.py --work /work/runs/paper --out docs/results/ablation
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_latent.experiments.paper_setting import PaperSetting
from lightning_latent.experiments.training_with_dropout import ARMS, write_comparison


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="the pipeline's work directory (scripts/paper_setting.py)")
    ap.add_argument("--task", default="p4_40")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 (step_pt0 runs 3)")
    ap.add_argument("--out", type=Path, required=True, help="writes OUT/training_with_dropout.md")
    a = ap.parse_args()
    ps, c = PaperSetting.reading(a.task, a.work, a.out)
    p = c["p_train"]["chosen"]
    with_ = ps.study("study", p, a.seeds, ARMS, a.out, 1, c["settings"]).cells
    without = ps.study("pt0", 0.0, a.seeds, ARMS, a.out, 1, c["settings"]).cells
    print(write_comparison(with_, without, p, a.seeds, a.out))


if __name__ == "__main__":
    main()
