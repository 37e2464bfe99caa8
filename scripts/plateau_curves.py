"""Learning curves of a plateau-rule run (experiments/configs/synthetic/plateau.yaml) as CSV + PNG.

``python scripts/plateau_curves.py RUN_DIR OUT_DIR``: RUN_DIR is the run's version folder. The curves
come from its TensorBoard events (``plateau/<phase>/stage<k>/val_pass@1``, one point per evaluation), so
an unfinished run can be read too; ``summary.json``, when present, adds where each stage ended.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lightning_latent.experiments.reporting import scalars  # noqa: E402


def curves(run_dir: Path) -> list[dict]:
    rows = []
    for tag, points in scalars(run_dir).items():
        if not tag.startswith("plateau/"):
            continue
        _, phase, stage, _ = tag.split("/")
        last = None
        for step, value in zip(points["step"], points["value"]):  # Lightning repeats the last value at every
            # log step: keep the changes
            if value != last:
                rows.append({"phase": phase, "stage": int(stage.removeprefix("stage")), "step": step + 1,
                             "val_pass@1": round(value, 4)})
                last = value
    return sorted(rows, key=lambda r: r["step"])


def main(run_dir: str, out_dir: str) -> None:
    run, out = Path(run_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = curves(run)
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["phase", "stage", "step", "val_pass@1"])
        w.writeheader()
        w.writerows(rows)
    fig, ax = plt.subplots(figsize=(8, 4))
    for key in sorted({(r["phase"], r["stage"]) for r in rows}, key=lambda k: k[1]):
        pts = [r for r in rows if (r["phase"], r["stage"]) == key]
        ax.plot([r["step"] for r in pts], [r["val_pass@1"] for r in pts], marker="o", label=f"{key[0]} stage {key[1]}")
    ax.set_xlabel("schedule step")
    ax.set_ylabel("validation greedy pass@1")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    summary = run / "summary.json"
    if summary.exists():
        (out / "summary.json").write_text(summary.read_text())
    print(json.dumps(rows))


if __name__ == "__main__":
    main(*sys.argv[1:3])
