"""The sweep's report: ``trials.csv``, ``summary.md`` (best trial, the command that reruns it, parameter
importances, every trial) and Optuna's plots, read from the study's storage. It runs nothing; the
driver (:mod:`.driver`) calls :func:`write_results` when it ends, and so can anyone holding the storage.
"""
from __future__ import annotations

import datetime as _dt
import logging
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from ..processes import shell_line
from ..reporting import markdown_table, write_csv
from .pruning import LOG_DIR_KEY
from .runner import Launch, fit_args
from .space import SweepConfig

log = logging.getLogger("lightning_latent.experiments.sweep")

SURPLUS_KEY = "ll:surplus"  # trial system attr: asked past the study's total by a racing worker


def trials_frame(study: optuna.Study):
    import pandas as pd

    rows = []
    for t in study.get_trials(deepcopy=False):
        dur = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        row = {"number": t.number, "state": t.state.name, "value": t.value,
               **{f"params_{k}": v for k, v in t.params.items()},
               "duration_s": dur, "last_step": max(t.intermediate_values) if t.intermediate_values else None,
               "log_dir": t.system_attrs.get(LOG_DIR_KEY) or t.user_attrs.get("log_dir"),
               "log_path": t.user_attrs.get("log_path"), "error": t.user_attrs.get("error"),
               "retry_of": t.system_attrs.get("failed_trial"), "surplus": bool(t.system_attrs.get(SURPLUS_KEY))}
        rows.append(row)
    df = pd.DataFrame(rows)
    for col in ("last_step", "retry_of"):
        if col in df.columns:
            df[col] = df[col].astype("Int64")
    return df


def best_by_mean_over(df, over: str, direction: str = "maximize") -> tuple[list[dict], dict | None]:
    """Each setting of the parameters other than ``over``, with its value for every value of ``over`` and
    their mean (COMPLETE trials; a setting is chosen only if it has a value for all of them), and the best
    such setting: e.g. one GRPO recipe for several arms, chosen on its mean over the arms (issue 22)."""
    col = f"params_{over}"
    done = df[df["state"] == "COMPLETE"] if len(df) else df
    if not len(done) or col not in done.columns:
        return [], None
    levels = sorted(done[col].astype(str).unique())
    others = [c for c in done.columns if c.startswith("params_") and c != col]
    rows: dict[tuple, dict] = {}
    for _, r in done.iterrows():
        key = tuple(str(r[c]) for c in others)
        row = rows.setdefault(key, {**{c[7:]: r[c] for c in others}, "values": {}})
        row["values"][str(r[col])] = float(r["value"])
    out = []
    for row in rows.values():
        vals = row["values"]
        complete = all(v in vals for v in levels)
        out.append({**row, "mean": sum(vals.values()) / len(vals), "complete": complete})
    sign = 1 if direction == "maximize" else -1
    chosen = [r for r in out if r["complete"]]
    best = max(chosen, key=lambda r: sign * r["mean"]) if chosen else None
    return sorted(out, key=lambda r: -sign * r["mean"]), best


def write_results(study: optuna.Study, cfg: SweepConfig, out: str | Path, storage_url: str,
                  plots: bool = True) -> dict[str, Path]:
    """``trials.csv``, ``summary.md`` and PNG plots under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    df = trials_frame(study)
    files["trials.csv"] = out / "trials.csv"
    write_csv(files["trials.csv"], df)

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    states = {s.name: sum(1 for t in study.get_trials(deepcopy=False) if t.state == s) for s in TrialState}
    lines = [f"# Sweep `{study.study_name}`", "",
             f"- config: `{cfg.source}`; objective: {cfg.direction} `{cfg.metric}` "
             f"({cfg.objective.get('reduce', 'last')} value of the fit, on validation)",
             f"- storage: `{storage_url}` (view it with `optuna-dashboard {storage_url}`)",
             "- trials: " + ", ".join(f"{k} {v}" for k, v in states.items() if v),
             f"- written {_dt.datetime.now().isoformat(timespec='seconds')}", ""]
    importances: dict[str, float] = {}
    if complete:
        best = study.best_trial
        lines += ["## Best trial", "", f"Trial {best.number}: `{cfg.metric}` = {best.value:.4f}", "",
                  markdown_table(["parameter", "value"], [[k, v] for k, v in best.params.items()]), ""]
        if best.user_attrs.get("log_dir"):
            lines += [f"Logs: `{best.user_attrs['log_dir']}`", ""]
        launch = Launch(devices=int(best.user_attrs.get("devices", 1)))
        rerun = fit_args(cfg.base_config, cfg.overrides(best.params), "logs", f"{study.study_name}_best",
                         "best", launch)
        lines += ["Run it again (fresh log directory):", "", "```bash",
                  shell_line(["python", "experiments/run.py", *rerun]), "```", ""]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importances = optuna.importance.get_param_importances(study)
        except Exception as err:  # too few trials, or no variation
            lines += [f"Parameter importances: not available ({err}).", ""]
        if len(complete) < 2:
            importances = {}
            lines += ["Parameter importances: need at least 2 completed trials.", ""]
        if importances:
            lines += ["## Parameter importances", "",
                      markdown_table(["parameter", "importance"], [[k, v] for k, v in importances.items()]), ""]
    else:
        lines += ["No trial completed yet.", ""]
    over = cfg.objective.get("mean_over")
    if over:
        settings, best = best_by_mean_over(df, over, cfg.direction)
        levels = sorted({k for r in settings for k in r["values"]})
        names = [k for k in (settings[0] if settings else {}) if k not in ("values", "mean", "complete")]
        lines += [f"## Chosen on the mean over `{over}`", "",
                  "Chosen: " + (", ".join(f"`{k}` = {best[k]}" for k in names) + f" (mean {best['mean']:.4f})"
                                if best else "none yet (no setting has a value for every one of them)"), "",
                  markdown_table([*names, *levels, "mean", "all"],
                                 [[r[k] for k in names] + [r["values"].get(v, "") for v in levels]
                                  + [r["mean"], "yes" if r["complete"] else "no"] for r in settings]), ""]
    cols = [c for c in ("number", "state", "value", "duration_s", "last_step") if c in df.columns]
    pcols = [c for c in df.columns if c.startswith("params_")]
    if len(df):
        lines += ["## Trials", "", markdown_table(cols + [c[7:] for c in pcols] + ["error"],
                                              [[r[c] for c in cols + pcols] + [r["error"] or ""]
                                               for _, r in df.iterrows()]), ""]
    files["summary.md"] = out / "summary.md"
    files["summary.md"].write_text("\n".join(lines))
    if plots:
        files.update(write_plots(study, out, has_importances=bool(importances)))
    if (out / "tb").exists():  # TensorBoard's HParams tab: the settings that differ, results first
        from ..hparams import write_experiment

        exp = write_experiment(out / "tb")
        if exp is not None:
            files["hparams_experiment"] = exp
    return files


def write_plots(study: optuna.Study, out: Path, has_importances: bool = True) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    files = {}
    n_complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    plots = [("history", ovm.plot_optimization_history), ("intermediate", ovm.plot_intermediate_values),
             ("slice", ovm.plot_slice), ("parallel_coordinates", ovm.plot_parallel_coordinate)]
    if has_importances:
        plots.append(("importances", ovm.plot_param_importances))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fn in plots:
            if n_complete == 0 and name != "intermediate":
                continue
            try:
                ax = fn(study)
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
                fig.set_size_inches(max(fig.get_size_inches()[0], 7), max(fig.get_size_inches()[1], 4.5))
                path = out / f"{name}.png"
                fig.savefig(path, dpi=90, bbox_inches="tight")
                plt.close(fig)
                files[path.name] = path
            except Exception as err:
                log.warning("plot %s skipped: %s", name, err)
    return files
