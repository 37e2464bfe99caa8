"""The report of issue 22's study over its first N seeds, while the study still runs (its own report comes
when every seed is done): the same tables and plots (``StudyReport``), from the finished cells, into OUT; the
study's own output directory is not touched.

    python scripts/study_so_far.py --work /work/runs/paper --seeds 1 --out docs/results/paper_setting/study_seed0
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_latent.experiments.paper_setting import PaperSetting
from lightning_latent.experiments.study import ARMS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="the pipeline's work directory (scripts/paper_setting.py)")
    ap.add_argument("--task", default="p4_40")
    ap.add_argument("--seeds", type=int, required=True, help="report seeds 0 .. N-1 (each must be finished)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    ps, c = PaperSetting.reading(a.task, a.work, a.out)
    st = ps.study("study", c["p_train"]["chosen"], a.seeds, ARMS, a.out, 1, c["settings"])
    missing = [f"{k}_{arm}_s{s}" for s in range(a.seeds) for arm in ARMS for k in ("train", "test")
               if not (st.cells / f"{k}_{arm}_s{s}.json").exists()]
    if missing:
        raise SystemExit(f"{len(missing)} cell(s) not finished in {st.cells}, e.g. {missing[:3]}; report fewer seeds")
    st.report()
    print(a.out / "results.md")


if __name__ == "__main__":
    main()
