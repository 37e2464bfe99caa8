"""Issue 22's side job: the converged ``p_train = 0`` starts of the pipeline's last step (``step_pt0``), built
early, beside the driver, on the core it leaves idle (the ``p_train`` step runs one cell at a time).

It writes the very cells ``PaperSetting.step_pt0`` reads (``<work>/pt0/cells/start_s<seed>.json``, and the
curricula and checks before them), so that step finds them done: a start depends only on the task's budget
(``converged_<task>_pt0``), not on the RL settings the grids choose (``tests/experiments/test_paper_setting.py``).
Resumable like every cell. Run it at low priority so that it yields to the driver's cells:

    PYTHONPATH=<worktree> nice -n 19 python scripts/pt0_starts.py --task p4_40 --work /work/runs/paper
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from lightning_latent.experiments.paper_setting import RECIPE_ARMS, PaperSetting


def side_study(ps: PaperSetting, seeds: int = 3):
    """The study whose starts this job builds: ``step_pt0``'s, one cell at a time and with no RL settings."""
    return ps.study("pt0", 0.0, seeds, RECIPE_ARMS, ps.study_out / "p_train_0", 1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True)
    ap.add_argument("--work", required=True, help="the driver's --work")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the driver's --threads)")
    a = ap.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(a.threads)  # as the driver's cells
    work = Path(a.work)
    ps = PaperSetting(a.task, work, work / "docs" / "paper_setting", work / "docs" / "ablation", threads=a.threads)
    st = side_study(ps, a.seeds)
    try:
        for s in range(a.seeds):
            ps.note(f"pt0 side job: seed {s}'s p_train = 0 start")
            st.start(s)
            ps.note(f"pt0 side job: seed {s}'s start: {st._done(f'start_s{s}')}")
    finally:
        st.close()


if __name__ == "__main__":
    main()
