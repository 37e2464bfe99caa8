"""Compare runs side by side from their TensorBoard event files.

    python -m lightning_latent.experiments.compare LOGDIR [--out DIR] [--metrics val/pass@1 test/pass@1 ...]
        [--scalars val/pass@1 grpo/reward_mean ...] [--hparams perturb.p grpo.group_size ...]

A run is a folder holding ``events.out.tfevents.*`` (a Lightning version directory, a sweep trial).
Writes ``DIR/runs.csv`` and ``DIR/runs.md`` (one row per run: its hyperparameters, then the final and
best value of each metric) and one overlay plot per scalar (``DIR/<tag>.png``, ``/`` -> ``_``).
Hyperparameters: the defining settings under short names (``arm``, ``p``, ``K`` ...) from the HParams
plugin data (``lightning_latent.experiments.hparams.HParamsSummary``), plus the full configuration from
``hparams.yaml`` (dotted keys: ``perturb.p``, ``grpo.group_size`` ...); by default the table shows the
short-named settings that differ between runs (runs without them: the dotted keys that differ).
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import yaml

from .reporting import (find_runs, flatten_hparams, hparams_from_plugin, markdown_table, read_events, scalars,
                        write_csv)

DEFAULT_METRICS = ["result/test_pass@1", "result/val_pass@1", "val/pass@1", "test/pass@1", "grpo/reward_mean",
                   "grpo/frac_zero_std"]
DEFAULT_SCALARS = ["val/pass@1", "grpo/reward_mean", "grpo/frac_zero_std", "train/loss"]
_MINIMISE = re.compile(r"loss|kl|frac_zero_std|nonfinite|_gap|seconds", re.I)


@dataclass
class Run:
    name: str  # path relative to the LOGDIR
    path: Path
    scalars: dict[str, pd.DataFrame] = field(default_factory=dict)  # tag -> DataFrame(step, value, wall_time)
    hparams: dict[str, Any] = field(default_factory=dict)

    def final(self, tag: str) -> float:
        df = self.scalars.get(tag)
        return float(df["value"].iloc[-1]) if df is not None and len(df) else math.nan

    def best(self, tag: str, mode: str | None = None) -> float:
        df = self.scalars.get(tag)
        if df is None or not len(df):
            return math.nan
        mode = mode or metric_mode(tag)
        return float(df["value"].min() if mode == "min" else df["value"].max())


def metric_mode(tag: str) -> str:
    """'min' for losses, KL and the like, else 'max'."""
    return "min" if _MINIMISE.search(tag) else "max"


class _HparamsLoader(yaml.SafeLoader):
    """``yaml.safe_load`` plus Python object tags read as plain data.

    Lightning may write a hyperparameter it cannot express in plain YAML with a tag such as
    ``!!python/object:lightning_latent.model.perturb.PerturbConfig``; this loader builds such a node as
    the dict / list / string it contains (never the object: no code from the file runs).
    """


def _plain(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_HparamsLoader.add_multi_constructor("tag:yaml.org,2002:python/", _plain)


def _hparams_from_yaml(path: Path) -> dict[str, Any]:
    f = path / "hparams.yaml"
    if not f.exists():
        return {}
    try:
        hp = yaml.load(f.read_text(), Loader=_HparamsLoader) or {}
        return flatten_hparams({k: v for k, v in hp.items() if not str(k).startswith("_")})
    except yaml.YAMLError:
        return {}


def load_run(path: str | Path, name: str | None = None, tags: Iterable[str] | None = None) -> Run:
    """Read one run's scalars (all, or only ``tags``) and hyperparameters."""
    path = Path(path)
    acc = read_events(path)
    hp = {**_hparams_from_yaml(path), **hparams_from_plugin(acc)}
    return Run(name or path.name, path, scalars(acc, tags), hp)


def load_runs(logdir: str | Path, pattern: str | None = None) -> list[Run]:
    """All runs under ``logdir`` (name = relative path), optionally those whose name matches ``pattern``."""
    logdir = Path(logdir)
    runs = []
    for d in find_runs(logdir):
        name = str(d.relative_to(logdir)) if d != logdir else d.name
        if pattern and not re.search(pattern, name):
            continue
        runs.append(load_run(d, name))
    return runs


def varying_hparams(runs: list[Run], short: bool | None = None) -> list[str]:
    """Hyperparameters whose value differs between runs (or is missing in some). ``short``: only the
    short-named defining settings (in their order); None: those if any run has them, else all keys."""
    from .hparams import DEFINING

    order = [*DEFINING, "trial"]
    if short is None:  # every HParamsSummary run has "lr" (hparams.yaml has only optim.lr)
        short = any("lr" in r.hparams for r in runs)
    keys = [k for k in order if any(k in r.hparams for r in runs)] if short else \
        sorted({k for r in runs for k in r.hparams})
    if short:  # the HParams tab's rule (hparams.write_experiment)
        from .hparams import differs

        return [k for k in keys if differs(k, [r.hparams for r in runs])]
    out = []
    for k in keys:
        vals = {repr(r.hparams.get(k, "<missing>")) for r in runs}
        if len(vals) > 1:
            out.append(k)
    return out


def table(runs: list[Run], metrics: list[str] | None = None, hparams: list[str] | None = None) -> pd.DataFrame:
    """One row per run: ``run``, the hyperparameters (default: those that vary), then for each metric
    ``<metric> final`` and ``<metric> best``."""
    metrics = list(metrics or DEFAULT_METRICS)
    metrics = [m for m in metrics if any(m in r.scalars for r in runs)] or metrics
    hparams = varying_hparams(runs) if hparams is None else list(hparams)
    rows = []
    for r in runs:
        row: dict[str, Any] = {"run": r.name}
        for h in hparams:
            row[h] = r.hparams.get(h)
        for m in metrics:
            row[f"{m} final"] = r.final(m)
            row[f"{m} best"] = r.best(m)
            df = r.scalars.get(m)
            row[f"{m} step"] = int(df["step"].iloc[-1]) if df is not None and len(df) else None
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    """The table as markdown (:func:`lightning_latent.experiments.reporting.markdown_table`): missing values empty."""
    return markdown_table(list(df.columns), df.itertuples(index=False), floatfmt)


def smooth(values: pd.Series, weight: float) -> pd.Series:
    """TensorBoard-style exponential moving average (weight 0: none)."""
    if weight <= 0:
        return values
    return values.ewm(alpha=1 - weight, adjust=False).mean()


def plot_scalars(runs: list[Run], tags: list[str], out: str | Path, smoothing: float = 0.0,
                 label: str | None = None) -> dict[str, Path]:
    """One PNG per tag with every run's curve overlaid; ``label``: a hyperparameter to name runs by."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for tag in tags:
        have = [r for r in runs if tag in r.scalars and len(r.scalars[tag])]
        if not have:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for r in have:
            df = r.scalars[tag]
            name = r.name if label is None else f"{r.name} ({label}={r.hparams.get(label)})"
            ax.plot(df["step"], smooth(df["value"], smoothing), marker="o" if len(df) < 20 else None,
                    markersize=3, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(tag)
        ax.set_title(tag)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        path = out / (re.sub(r"[^A-Za-z0-9_.@-]+", "_", tag) + ".png")
        fig.savefig(path, dpi=90, bbox_inches="tight")
        plt.close(fig)
        files[tag] = path
    return files


def compare(logdir: str | Path, out: str | Path | None = None, metrics: list[str] | None = None,
            scalars: list[str] | None = None, hparams: list[str] | None = None, pattern: str | None = None,
            smoothing: float = 0.0) -> tuple[pd.DataFrame, dict[str, Path]]:
    """Table + overlay plots for every run under ``logdir``; files under ``out`` (default LOGDIR/compare)."""
    runs = load_runs(logdir, pattern)
    if not runs:
        raise FileNotFoundError(f"no TensorBoard event files under {logdir}")
    out = Path(out) if out is not None else Path(logdir) / "compare"
    out.mkdir(parents=True, exist_ok=True)
    df = table(runs, metrics, hparams)
    files = {"runs.csv": out / "runs.csv", "runs.md": out / "runs.md"}
    write_csv(files["runs.csv"], df)
    files["runs.md"].write_text(to_markdown(df) + "\n")
    files.update(plot_scalars(runs, list(scalars or DEFAULT_SCALARS), out, smoothing))
    return df, files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lightning_latent.experiments.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("logdir")
    p.add_argument("--out", default=None, help="output folder (default: LOGDIR/compare)")
    p.add_argument("--metrics", nargs="+", default=None, help=f"table metrics (default {DEFAULT_METRICS})")
    p.add_argument("--scalars", nargs="+", default=None, help=f"plotted scalars (default {DEFAULT_SCALARS})")
    p.add_argument("--hparams", nargs="+", default=None, help="hyperparameter columns (default: those that vary)")
    p.add_argument("--pattern", default=None, help="only runs whose relative path matches this regex")
    p.add_argument("--smoothing", type=float, default=0.0, help="EMA weight for the plots (0..1)")
    a = p.parse_args(argv)
    df, files = compare(a.logdir, a.out, a.metrics, a.scalars, a.hparams, a.pattern, a.smoothing)
    print(to_markdown(df))
    print("\nwritten: " + ", ".join(str(f) for f in files.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
