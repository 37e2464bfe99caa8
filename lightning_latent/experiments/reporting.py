"""Reporting helpers shared by run comparison, sweeps and the ablation study: ONE of each.

* :func:`markdown_table` / :func:`write_csv`: how every table the project writes is formatted
  (``compare.py``'s ``runs.md`` / ``runs.csv``, the sweep's ``summary.md`` / ``trials.csv``, the study's
  ``results.md`` / ``results.csv`` / ``diversity.csv``).
* :func:`read_events` / :func:`scalars`: reading TensorBoard event files (every scalar as a DataFrame).
* :func:`flatten_hparams`: nested hyperparameters to the dotted ``{"perturb.p": 0.1}`` form, used when
  writing them to the HParams plugin and when reading them back from ``hparams.yaml``, so that both
  sources give the same values for the same run.

Heavy imports (pandas, tensorboard) happen inside the functions: the training process imports this
module (through :mod:`lightning_latent.experiments.hparams`) and needs neither.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

__all__ = ["flatten_hparams", "format_cell", "markdown_table", "read_events", "scalars", "write_csv"]


# -- tables --------------------------------------------------------------------------------------------
def _missing(v: Any) -> bool:
    """None, NaN and pandas' NA: a cell with no value."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return True
    try:
        import pandas as pd

        return v is pd.NA or v is pd.NaT
    except ImportError:  # pragma: no cover - pandas is a dependency
        return False


def format_cell(v: Any, floatfmt: str = ".4g") -> str:
    """One markdown cell: empty when missing, floats with ``floatfmt``, anything else ``str``; ``|``
    escaped so a value cannot split the row."""
    if _missing(v):
        return ""
    text = format(v, floatfmt) if isinstance(v, float) else str(v)
    return text.replace("|", "\\|")


def markdown_table(header: Sequence[Any], rows: Iterable[Sequence[Any]], floatfmt: str = ".4g") -> str:
    """A GitHub markdown table (no trailing newline): header row, ``|---|`` separator, one line per row.

    Cells go through :func:`format_cell`, so a pre-formatted string (``"12.5 ± 1.0"``) is written as
    it is and a raw float gets ``floatfmt``.
    """
    lines = ["| " + " | ".join(format_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(format_cell(v, floatfmt) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: str | Path, table: pd.DataFrame | Sequence[Mapping[str, Any]]) -> Path:
    """Write ``table`` (a DataFrame, or rows as dicts whose keys are the columns) as CSV without an
    index: pandas' format (``\\n`` line ends, a missing value as an empty cell). No rows: an empty file."""
    import pandas as pd

    path = Path(path)
    df = table if isinstance(table, pd.DataFrame) else pd.DataFrame(list(table))
    if df.empty and not len(df.columns):
        path.write_text("")
    else:
        df.to_csv(path, index=False)
    return path


def emit_rows(rows: list[dict], out: str | Path | None = None) -> int:
    """A probe's result (``diversity``, ``grad_signal``): one JSON line per row on stdout, and a CSV at ``out``
    when given. Returns the exit status, 0."""
    if out:
        write_csv(out, rows)
    for r in rows:
        print(json.dumps(r))
    return 0


# -- TensorBoard event files ---------------------------------------------------------------------------
def read_events(logdir: str | Path) -> EventAccumulator:
    """All events under one run directory, nothing subsampled (TensorBoard keeps only some by default).

    TensorBoard's reader logs a line per event file at INFO; a study's driver logs at INFO and reads hundreds
    of files, so that logger is quieted (:func:`~lightning_latent.quiet.quiet_chatty_loggers`)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ..quiet import quiet_chatty_loggers

    quiet_chatty_loggers()
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator | str | Path, tags: Iterable[str] | None = None) -> dict[str, pd.DataFrame]:
    """``{tag: DataFrame(step, value, wall_time)}`` for every scalar tag (or those in ``tags`` present),
    sorted by step then wall time (a stable sort: a resumed run's repeated steps keep their order)."""
    import pandas as pd

    if not hasattr(acc, "Scalars"):
        acc = read_events(acc)
    wanted = set(tags) if tags is not None else None
    out = {}
    for tag in acc.Tags().get("scalars", []):
        if wanted is not None and tag not in wanted:
            continue
        ev = acc.Scalars(tag)
        df = pd.DataFrame({"step": [e.step for e in ev], "value": [e.value for e in ev],
                           "wall_time": [e.wall_time for e in ev]})
        out[tag] = df.sort_values(["step", "wall_time"], kind="stable").reset_index(drop=True)
    return out


def attempt_scalars(logdir: str | Path, tags: Iterable[str] | None = None) -> dict[str, pd.DataFrame]:
    """:func:`scalars` of a run directory that several attempts wrote: a killed run resumed from its
    checkpoint into the same directory writes a new events file, and logs again the steps between that
    checkpoint and the kill. Each later attempt's values of a tag replace the earlier attempts' from its first
    step of that tag on, so the curve (and a sum over it) is the uninterrupted run's. TensorBoard's own purge
    does not do it: for version-2 event files it waits for a ``SessionLog.START`` that Lightning never writes."""
    import pandas as pd

    files = sorted(Path(logdir).glob("events.out.tfevents.*"))
    if len(files) <= 1:
        return scalars(logdir, tags)
    per_file = [s for s in (scalars(str(f), tags) for f in files) if s]
    per_file.sort(key=lambda s: min(df["wall_time"].min() for df in s.values()))  # the attempts in order
    out = {}
    for tag in {t for s in per_file for t in s}:
        frames = [s[tag] for s in per_file if tag in s]
        kept = []
        for i, df in enumerate(frames):
            later = [f["step"].min() for f in frames[i + 1:]]
            kept.append(df[df["step"] < min(later)] if later else df)
        out[tag] = pd.concat(kept).sort_values(["step", "wall_time"], kind="stable").reset_index(drop=True)
    return out


# -- hyperparameters -----------------------------------------------------------------------------------
def flatten_hparams(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts / dataclasses -> ``{"a.b": scalar}``; None becomes ``"None"`` and lists and other
    objects JSON (else ``str``), because the HParams plugin accepts only bool / number / string values."""
    if is_dataclass(obj) and not isinstance(obj, type):
        obj = asdict(obj)
    if hasattr(obj, "items") and not isinstance(obj, str):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten_hparams(v, f"{prefix}{k}."))
        return out
    key = prefix[:-1]
    if obj is None:
        return {key: "None"}
    if isinstance(obj, (bool, int, float, str)):
        return {key: obj}
    try:
        return {key: json.dumps(obj, default=lambda o: asdict(o) if is_dataclass(o) else str(o))}
    except (TypeError, ValueError):
        return {key: str(obj)}


#: The file suffix of the experiment description at a log root (hparams.write_experiment): not a run.
EXPERIMENT_SUFFIX = ".hparams-experiment"


def find_runs(logdir: str | Path) -> list[Path]:
    """Every folder under ``logdir`` (itself included) holding an event file, sorted."""
    logdir = Path(logdir)
    # the experiment description written at a log root (lightning_latent.experiments.hparams.write_experiment) is no run
    dirs = {p.parent for p in logdir.rglob("events.out.tfevents.*") if not p.name.endswith(EXPERIMENT_SUFFIX)}
    return sorted(dirs)


def hparams_from_plugin(acc) -> dict[str, Any]:
    """The HParams plugin's session hyperparameters in an event accumulator (empty if none)."""
    try:
        from tensorboard.plugins.hparams import plugin_data_pb2

        content = acc.PluginTagToContent("hparams")
    except (KeyError, ImportError):
        return {}
    out: dict[str, Any] = {}
    for tag, raw in content.items():
        if not tag.endswith("session_start_info"):
            continue
        data = plugin_data_pb2.HParamsPluginData.FromString(raw)
        for k, v in data.session_start_info.hparams.items():
            kind = v.WhichOneof("kind")
            out[k] = getattr(v, kind) if kind else None
            if kind == "number_value" and float(out[k]).is_integer():
                out[k] = int(out[k])
    return out
