"""Run the ablation study: per seed one Coconut checkpoint, then every perturbation arm from it, tested
and compared in tables and plots.

Example: python experiments/ablate.py --out runs/ablation --seeds 5   (rerun the same command to resume)

Usage: python experiments/ablate.py --out DIR [--seeds N] [--arms a b ...] [--budget default|reduced|tiny].
Per seed: one Coconut checkpoint (experiments/configs/synthetic/coconut.yaml), then every arm from it
with the same budget; the diversity curve first. Writes DIR/results.csv, DIR/results.md,
DIR/pass1_per_arm.png, DIR/training_curves.png, DIR/diversity.csv, DIR/diversity.png; all runs log to
WORK/tb (--work, default DIR: one TensorBoard root; its HParams tab compares the runs; keep it outside the
repository, it holds the checkpoints). A rerun with the same --out / --work skips finished cells,
continues an unfinished start from its last checkpoint, and rebuilds a missing start checkpoint.
--jobs N runs N cells at once, the cores split between them. The cells run in --jobs long-lived worker
processes, one after another (no process start and imports per cell); --fresh-processes starts one
process per cell instead (the same numbers).
"""
import argparse
import json
import logging
from pathlib import Path

from lightning_latent.helptext import description_first
from lightning_latent.experiments.study import ARMS, BUDGETS, Study


def main() -> None:
    ap = description_first(argparse.ArgumentParser(description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    ap.add_argument("--out", required=True, help="output folder: tables and plots (reuse it to resume)")
    ap.add_argument("--work", help="working folder: runs, checkpoints, cells (default: --out); keep it outside the "
                                   "repository; a start checkpoint missing there is rebuilt (same seed, same run)")
    ap.add_argument("--jobs", type=int, default=1, help="cells run in parallel, the cores split between them")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--budget", default="default", choices=sorted(BUDGETS))
    ap.add_argument("--settings", metavar="JSON",
                    help='the arms\' settings chosen on validation: {"grpo": {KEY: VALUE}, "arms": {ARM: {KEY: VALUE}}} '
                         "(run.py keys; Budget.with_settings), e.g. the choices.json of scripts/paper_setting.py")
    ap.add_argument("--no-diversity", action="store_true", help="skip the diversity curve")
    ap.add_argument("--fresh-processes", action="store_true",
                    help="one `experiments/run.py` process per cell instead of long-lived workers (same numbers)")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the tables and plots")
    ap.add_argument("--diversity-from", metavar="CKPT", help="only measure the diversity curve from this checkpoint")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    budget = BUDGETS[a.budget]
    if a.settings:
        raw = json.loads(Path(a.settings).read_text())
        budget = budget.with_settings(raw.get("settings", raw))  # a choices.json holds them under "settings"
    study = Study(a.out, seeds=a.seeds, arms=tuple(a.arms), budget=budget, diversity=not a.no_diversity,
                  work=a.work, jobs=a.jobs, in_process=not a.fresh_processes)
    if a.diversity_from:
        study.run_diversity(a.diversity_from)
    elif a.report_only:
        study.report()
    else:
        study.run()


if __name__ == "__main__":
    main()
