"""The recipe search's report: per trial, the validation learning curve, the training-reward curve and
whether it "learns" (issue 13); written as CSV, Markdown and PNG.

    python scripts/recipe_report.py --sweep-out runs/recipe --out docs/results/recipe

Reads the sweep's Optuna storage (``OUT/study.db``: the validation pass@1 each trial reported, keyed by the
schedule step) and each trial's TensorBoard run (``grpo/reward_mean``, one value per GRPO step with
``trainer.log_every_n_steps: 1``). "Learns" here is the training-reward half of the criterion
(:func:`lightning_latent.metrics.reward_trend`: last 20% of the steps above the first 20% by more than
2 standard errors); the other half, greedy pass@1 above the start paired per problem, is judged on
test by the chosen recipe's runs (their ``summary.json`` checks), never during the search.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import optuna
import pandas as pd

from lightning_latent.metrics import reward_trend
from lightning_latent.experiments.reporting import markdown_table, scalars, write_csv

STEPS = (10, 20, 50, 100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep-out", required=True, help="the sweep's --out folder (study.db, trials.csv, tb/)")
    ap.add_argument("--study-name", default=None, help="default: the only study in the storage")
    ap.add_argument("--out", required=True)
    ap.add_argument("--start-val", type=float, default=None, help="validation pass@1 of the start, for the plot")
    args = ap.parse_args()
    src, out = Path(args.sweep_out), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{src / 'study.db'}"
    name = args.study_name or optuna.get_all_study_names(storage)[0]
    study = optuna.load_study(study_name=name, storage=storage)
    # trials.csv is written when the driver ends; a running sweep's trials log to OUT/tb/<study>/trial_NNNN
    trials = pd.read_csv(src / "trials.csv") if (src / "trials.csv").exists() else pd.DataFrame(
        [{"number": t.number, "log_dir": str(src / "tb" / name / f"trial_{t.number:04d}")}
         for t in study.get_trials(deepcopy=False)])

    curves, rewards, rows = [], [], []
    for t in study.get_trials(deepcopy=False):
        if not t.intermediate_values:
            continue
        for step, v in sorted(t.intermediate_values.items()):
            curves.append({"trial": t.number, "step": step, "val_pass@1": v})
        rec = trials[trials.number == t.number]
        log_dir = rec.log_dir.iloc[0] if len(rec) else None
        r = []
        if isinstance(log_dir, str) and Path(log_dir).exists():
            df = scalars(log_dir, ["grpo/reward_mean"]).get("grpo/reward_mean")
            if df is not None:
                r = list(df.sort_values("step").value)
        for i, v in enumerate(r):
            rewards.append({"trial": t.number, "step": i + 1, "reward_mean": v})
        iv = t.intermediate_values
        # the objective (mean of the validation curve) for every trial; a pruned trial's curve is shorter
        # (Optuna stores its last reported value as its value, which is not comparable)
        row = {"trial": t.number, "state": t.state.name, "steps": max(iv),
               "mean val curve": sum(iv.values()) / len(iv),
               **{k.replace("model.", ""): ("all" if k.endswith("trainable") and v is None else v)
                  for k, v in t.params.items()}}
        for s in STEPS:
            row[f"val@{s}"] = iv.get(s)
        if len(r) >= 10:
            tr = reward_trend(r)
            row.update({"reward first 20%": tr["first"], "reward last 20%": tr["last"],
                        "reward rise / SE": tr["diff"] / tr["se"] if tr["se"] > 0 else float("inf"),
                        "reward learns": tr["learns"]})
        row["error"] = t.user_attrs.get("error") or (t.system_attrs.get("ll:collapsed") or {}).get("message")
        rows.append(row)
    table = pd.DataFrame(rows)
    table["_complete"] = table.state == "COMPLETE"
    table = table.sort_values(["_complete", "mean val curve"], ascending=False).drop(columns="_complete")
    write_csv(out / "trials.csv", table)
    write_csv(out / "val_curves.csv", pd.DataFrame(curves))
    write_csv(out / "reward_curves.csv", pd.DataFrame(rewards))
    with open(out / "trials.md", "w") as f:
        cols = [c for c in table.columns if c != "error"]
        f.write(markdown_table(cols, table[cols].itertuples(index=False), floatfmt=".3g") + "\n")
    _plot(pd.DataFrame(curves), pd.DataFrame(rewards), table, out, args.start_val)
    print(json.dumps({"study": name, "trials": len(rows), "out": str(out)}))


def _plot(curves: pd.DataFrame, rewards: pd.DataFrame, table: pd.DataFrame, out: Path, start: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = list(table.trial[:3])
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for t, g in curves.groupby("trial"):
        ax[0].plot(g.step, g["val_pass@1"], lw=2 if t in best else 0.7, alpha=1 if t in best else 0.4,
                   label=f"trial {t}" if t in best else None)
    if start is not None:
        ax[0].axhline(start, color="k", ls="--", lw=1, label="start")
    ax[0].set(xlabel="GRPO step", ylabel="validation pass@1 (greedy, n=2,000)", title="validation curves")
    ax[0].legend()
    if len(rewards):
        for t, g in rewards.groupby("trial"):
            sm = g.reward_mean.rolling(5, min_periods=1).mean()
            ax[1].plot(g.step, sm, lw=2 if t in best else 0.7, alpha=1 if t in best else 0.4,
                       label=f"trial {t}" if t in best else None)
        ax[1].set(xlabel="GRPO step", ylabel="training reward (5-step mean)", title="training reward")
        ax[1].legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)


if __name__ == "__main__":
    main()
