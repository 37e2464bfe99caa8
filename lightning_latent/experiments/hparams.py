"""TensorBoard HParams: the settings that define a run and its per-phase results, to compare runs.

:class:`HParamsSummary` (always on, added by the CLI) writes, on rank 0 at the end of ``fit`` and
``test``, to the run's own event file:

* the defining settings under short names (:data:`DEFINING`, with the config key each comes from):
  ``task``, ``arm``, ``p``, ``sites``, ``scope``, ``K``, ``prompts``, ``lr``, ``beta``, ``mu``, ``seed``,
  ``start``. A setting that means nothing for the run is left out: the GRPO settings for a run without
  a GRPO phase, ``p`` / ``sites`` / ``scope`` for an arm that does not use dropout masks (the arm
  registry, :mod:`lightning_latent.model.arms`), ``start`` for a run trained from scratch.
* metrics (:data:`RESULT_METRICS` first): ``result/test_pass@1`` and ``result/val_pass@1`` (the last
  phase-end evaluation of a fit, or the ``test`` subcommand's pass@1), for a run whose last phase is GRPO
  ``result/reward`` and ``result/frac_zero_std`` (mean of the phase's last :data:`FINAL_WINDOW` steps);
  then per phase ``phase/<name>/val_pass@1`` and ``phase/<name>/test_pass@1`` (logged by
  :class:`~lightning_latent.callbacks.PhaseSummary`) and, for GRPO phases, ``phase/<name>/reward`` and
  ``phase/<name>/frac_zero_std``.

The full configuration stays in the run's ``hparams.yaml`` / ``config.yaml``.

TensorBoard's HParams tab takes its columns from ONE experiment description (if several runs wrote
one, it picks any). So runs write none; instead, after every run, :func:`write_experiment` rewrites the
one at the log root (the logger's ``save_dir``: ``logs/``, a study's ``OUT/tb``, a sweep's ``tb``) for
every run under it: the settings that differ between the runs (all of them if there is one run) and the
result metrics first, ``test_pass@1`` leading. By hand: ``python -m lightning_latent.experiments.hparams LOGDIR``.
TensorBoard orders setting columns by name (so ``K``, ``arm``, ``lr``, ``p``, ...) and ticks the first
five.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path
from typing import Any

import lightning as L

# Re-exported: the flattening compare.py reads hparams.yaml with.
from .reporting import EXPERIMENT_SUFFIX, find_runs, flatten_hparams, hparams_from_plugin, read_events

log = logging.getLogger("lightning_latent")

__all__ = ["DEFINING", "RESULT_METRICS", "HParamsSummary", "defining_hparams", "flatten_hparams",
           "read_hparams", "write_experiment"]

#: short name -> where it comes from (documentation; the values are computed by :func:`defining_hparams`)
DEFINING: dict[str, str] = {
    "task": "data.task", "arm": "model.perturb.arm", "p": "model.perturb.p", "sites": "model.perturb.sites",
    "scope": "model.perturb.scope", "K": "model.grpo.group_size", "prompts": "model.grpo_prompts (prompts per step)",
    "lr": "the last phase's learning rate (model.optim.lr / grpo_lr, or the phase's lr)",
    "beta": "model.grpo.beta", "mu": "model.grpo.mu", "seed": "model.seed (data.seed)",
    "start": "model.init_from (the last 3 parts of the path)",
}
RESULT_METRICS = ("result/test_pass@1", "result/val_pass@1", "result/reward", "result/frac_zero_std")
FINAL_WINDOW = 10


def _short_path(p: str) -> str:
    parts = Path(str(p)).parts
    return "/".join(parts[-3:]) if len(parts) > 3 else str(p)


def defining_hparams(pl_module, datamodule=None) -> dict[str, Any]:
    """The settings that define the run, under their short names, in :data:`DEFINING` order."""
    from ..model.arms import get_arm

    hp = dict(pl_module.hparams)
    segs = pl_module.segments
    task = getattr(datamodule, "task", None) or hp.get("task") or "synthetic"
    out: dict[str, Any] = {"task": str(task)}
    perturb = getattr(pl_module, "perturb_cfg", None)
    kinds = {s.kind for s in segs}
    arm_name = getattr(perturb, "arm", None)
    try:
        arm = get_arm(arm_name) if arm_name else None
    except ValueError:
        arm = None
    if "grpo" in kinds or (arm is not None and arm.phase == "sft" and "sft" in kinds):
        out["arm"] = str(arm_name)
    if "grpo" in kinds:
        if arm is not None and arm.uses_sites:
            out["p"] = float(perturb.p)
            out["sites"] = ",".join(perturb.sites) if not isinstance(perturb.sites, str) else perturb.sites
            out["scope"] = str(perturb.scope)
        g = pl_module.grpo_cfg
        out["K"] = int(g.group_size)
        out["prompts"] = int(next(s.batch_size for s in segs if s.kind == "grpo"))
    out["lr"] = float(segs[-1].lr)
    if "grpo" in kinds:
        out["beta"] = float(pl_module.grpo_cfg.beta)
        out["mu"] = int(pl_module.grpo_cfg.mu)
    out["seed"] = int(getattr(pl_module, "seed", hp.get("seed", 0)))
    if hp.get("init_from"):
        out["start"] = _short_path(hp["init_from"])
    if os.environ.get("LL_OPTUNA_TRIAL"):
        out["trial"] = int(os.environ["LL_OPTUNA_TRIAL"])
    return out


def _tb_experiment(trainer):
    from lightning.pytorch.loggers import TensorBoardLogger

    for lg in trainer.loggers:
        if isinstance(lg, TensorBoardLogger):
            return lg.experiment
    return None


def _finite(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class HParamsSummary(L.Callback):
    """Defining settings + per-phase results for TensorBoard's HParams plugin (rank 0)."""

    def __init__(self):
        self.grpo: dict[str, dict[str, list[float]]] = {}  # phase -> {"reward": [...], "frac_zero_std": [...]}

    def on_fit_start(self, trainer, pl_module) -> None:
        if not getattr(self, "_restored", False):
            self.grpo = {}
        self._restored = False

    # The GRPO history travels in checkpoints, so a resumed run's final values cover the whole phase.
    def state_dict(self) -> dict[str, Any]:
        return {"grpo": {p: {k: list(v) for k, v in d.items()} for p, d in self.grpo.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.grpo = {p: {k: list(v) for k, v in d.items()} for p, d in state_dict.get("grpo", {}).items()}
        self._restored = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from ..schedule import locate

        if not hasattr(pl_module, "segments") or pl_module.step_count < 1:
            return
        seg = locate(pl_module.segments, pl_module.step_count - 1)
        if seg.kind != "grpo":
            return
        d = self.grpo.setdefault(seg.name, {"reward": [], "frac_zero_std": []})
        for key, tag in (("reward", "grpo/reward_mean"), ("frac_zero_std", "grpo/frac_zero_std")):
            v = _finite(trainer.callback_metrics.get(tag))
            if v is not None:
                d[key] = (d[key] + [v])[-FINAL_WINDOW:]

    def on_fit_end(self, trainer, pl_module) -> None:
        self.write(trainer, pl_module, self.fit_metrics(trainer, pl_module))

    def on_test_end(self, trainer, pl_module) -> None:
        m = {}
        v = _finite(trainer.callback_metrics.get("test/pass@1"))
        if v is not None:
            m["result/test_pass@1"] = v
        self.write(trainer, pl_module, m)

    def fit_metrics(self, trainer, pl_module) -> dict[str, float]:
        from ..callbacks import PhaseSummary

        rows = next((c.rows for c in trainer.callbacks if isinstance(c, PhaseSummary)), [])
        out: dict[str, float] = {}
        last = rows[-1] if rows else {}
        for key in ("test", "val"):
            if f"{key}_pass@1" in last:
                out[f"result/{key}_pass@1"] = float(last[f"{key}_pass@1"])
        for r in rows:
            for key in ("val", "test"):
                if f"{key}_pass@1" in r:
                    out[f"phase/{r['phase']}/{key}_pass@1"] = float(r[f"{key}_pass@1"])
        for phase, d in self.grpo.items():
            for key, vals in d.items():
                if vals:
                    out[f"phase/{phase}/{key}"] = sum(vals) / len(vals)
        segs = getattr(pl_module, "segments", [])
        if segs and segs[-1].kind == "grpo":
            for key in ("reward", "frac_zero_std"):
                if f"phase/{segs[-1].name}/{key}" in out:
                    out[f"result/{key}"] = out[f"phase/{segs[-1].name}/{key}"]
        return out

    def write(self, trainer, pl_module, metrics: dict[str, float]) -> None:
        if not trainer.is_global_zero:
            return
        writer = _tb_experiment(trainer)
        if writer is None or not hasattr(pl_module, "segments"):
            return
        if not metrics:  # the plugin needs at least one metric to list a session
            metrics = {"result/steps": float(getattr(pl_module, "step_count", trainer.global_step))}
        hp = defining_hparams(pl_module, trainer.datamodule)
        fw = writer._get_file_writer()
        for s in hparams_summaries(hp, ordered_metrics(metrics)):
            fw.add_summary(s)
        step = int(getattr(pl_module, "step_count", trainer.global_step))
        for k, v in metrics.items():  # PhaseSummary's own phase/* logs may not reach the logger
            writer.add_scalar(k, v, step)  # at a run's last step: written here in any case
        writer.flush()
        root = next((lg.save_dir for lg in trainer.loggers if hasattr(lg, "save_dir") and lg.save_dir), None)
        if root is not None:
            try:  # the log root's experiment description, now with this run (never fails the run)
                write_experiment(root)
            except Exception as err:  # noqa: BLE001 - e.g. two trials rewriting it at once
                log.debug("HParams experiment description under %s not written: %s", root, err)


def ordered_metrics(metrics) -> list[str]:
    """Result metrics first (:data:`RESULT_METRICS` order), then per-phase ones by name."""
    names = list(metrics)
    return [m for m in RESULT_METRICS if m in names] + sorted(m for m in names if m not in RESULT_METRICS)


def _hparam_infos(hp: dict[str, Any], differs: bool):
    from tensorboard.plugins.hparams import api_pb2

    infos = []
    for k, v in hp.items():
        t = (api_pb2.DATA_TYPE_BOOL if isinstance(v, bool) else api_pb2.DATA_TYPE_FLOAT64
             if isinstance(v, (int, float)) else api_pb2.DATA_TYPE_STRING)
        infos.append(api_pb2.HParamInfo(name=k, type=t, differs=differs))
    return infos


def _experiment_summary(hparam_infos, metric_names):
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    exp = api_pb2.Experiment(hparam_infos=hparam_infos, metric_infos=[
        api_pb2.MetricInfo(name=api_pb2.MetricName(tag=m), display_name=m.split("/", 1)[-1] if m.startswith("result/")
                           else m) for m in metric_names])
    content = plugin_data_pb2.HParamsPluginData(experiment=exp, version=metadata.PLUGIN_DATA_VERSION)
    return Summary(value=[Summary.Value(tag=metadata.EXPERIMENT_TAG,
                                        metadata=metadata.create_summary_metadata(content))])


def hparams_summaries(hp: dict[str, Any], metric_names: list[str]) -> list:
    """The session start and end summaries of one run (no experiment description: see the docstring)."""
    from torch.utils.tensorboard.summary import hparams

    _exp, ssi, sei = hparams(hp, {m: 0.0 for m in metric_names})
    return [ssi, sei]


def read_hparams(run_dir: str | Path) -> dict[str, Any]:
    """The HParams plugin's session hyperparameters of one run folder (empty if none)."""
    return hparams_from_plugin(read_events(run_dir))


RL_KEYS = ("arm", "p", "sites", "scope", "K", "prompts", "beta", "mu")


def differs(key: str, runs: list[dict[str, Any]]) -> bool:
    """Whether ``key`` tells the runs apart. The RL settings are compared among runs with an arm (a
    Coconut run has none); a missing ``p`` (an arm without dropout masks) differs from a given one;
    ``sites`` / ``scope`` differ only by two given values (they refine ``p``)."""
    among = [r for r in runs if "arm" in r] if key in RL_KEYS else runs
    vals = {repr(r[key]) if key in r else "<missing>" for r in among if key in r or key not in ("sites", "scope")}
    return len(vals) > 1


def write_experiment(logdir: str | Path) -> Path | None:
    """One experiment description at ``logdir`` for every run under it: the defining settings that differ
    between the runs (those equal in every run left out) and the metrics present, results first.
    Replaces an earlier one. Returns the file written (None: no run with HParams data)."""
    from torch.utils.tensorboard import SummaryWriter

    logdir = Path(logdir)
    runs, metrics = [], set()
    for d in find_runs(logdir):
        acc = read_events(d)
        hp = hparams_from_plugin(acc)
        if not hp:
            continue
        runs.append({k: v for k, v in hp.items() if k in DEFINING or k == "trial"})
        metrics.update(t for t in acc.Tags().get("scalars", []) if t.startswith(("result/", "phase/")))
    if not runs:
        return None
    order = [*DEFINING, "trial"]
    keys = [k for k in order if any(k in r for r in runs)]
    varying = {k: next(r[k] for r in runs if k in r) for k in keys if differs(k, runs)}
    if not varying and keys:  # every run alike: keep the settings, the table needs at least one column
        varying = {k: next(r[k] for r in runs if k in r) for k in keys}
    for old in logdir.glob(f"events.out.tfevents.*{EXPERIMENT_SUFFIX}"):
        old.unlink()
    w = SummaryWriter(str(logdir), filename_suffix=EXPERIMENT_SUFFIX)
    w._get_file_writer().add_summary(_experiment_summary(_hparam_infos(varying, True), ordered_metrics(metrics)))
    w.flush()
    path = Path(w._get_file_writer().event_writer._file_name)
    w.close()
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lightning_latent.experiments.hparams",
                                 description="Write one HParams experiment description for every run under "
                                             "LOGDIR (the settings that differ, results first). Example: "
                                             "python -m lightning_latent.experiments.hparams logs/")
    ap.add_argument("logdir")
    a = ap.parse_args(argv)
    path = write_experiment(a.logdir)
    print(f"written: {path}" if path else f"no run with HParams data under {a.logdir}")
    return 0 if path else 1


if __name__ == "__main__":
    raise SystemExit(main())
