"""The sweep YAML: base experiment config, fixed overrides, search space, objective, sampler, pruner.

Example (``sweeps/dropout_grpo.yaml``)::

    base_config: null                  # an experiments/run.py config; null: the embedded default
    init_from: logs/coconut/version_0/checkpoints/last.ckpt   # the fixed Coconut start
    args:                              # fixed overrides, any CLI key
      model.schedule: [{kind: grpo, steps: 200, name: dropout_grpo}]
      trainer.val_check_interval: 25
    space:                             # any CLI key; omitted: the three defaults below
      model.perturb.p: {type: float, low: 0.05, high: 0.5}
      model.grpo.group_size: {type: categorical, choices: [4, 8, 16]}
      model.grpo.beta: {type: float, low: 1.0e-4, high: 0.1, log: true}
    rollouts_per_step: constant        # prompts x K fixed when K is searched; an int; or null (off)
    objective: {metric: val/pass@1, direction: maximize, reduce: last, mean_over: null}
    sampler: {type: tpe, seed: 0, n_startup_trials: 5}   # or random; or grid (categorical space only)
    pruner: {type: median, n_startup_trials: 2, n_warmup_steps: 0}
    task: null                         # a synthetic task of experiments/tasks.py (its settings to every trial)

Relative paths (``base_config``, ``init_from``) are resolved against the current directory first,
then against the YAML's folder.
"""
from __future__ import annotations

import copy
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

from ..tasks import TASKS, task_overrides

DEFAULT_SPACE: dict[str, dict] = {
    "model.perturb.p": {"type": "float", "low": 0.05, "high": 0.5},
    "model.grpo.group_size": {"type": "categorical", "choices": [4, 8, 16]},
    "model.grpo.beta": {"type": "float", "low": 1e-4, "high": 0.1, "log": True},
}
GROUP_SIZE_KEY = "model.grpo.group_size"
PROMPTS_KEY = "model.grpo_prompts"
_PARAM_TYPES = ("float", "int", "categorical")
_PRUNERS = ("median", "percentile", "hyperband", "successive_halving", "threshold", "nop")


@dataclass
class SweepConfig:
    base_config: str | None = None
    init_from: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    space: dict[str, dict] = field(default_factory=lambda: copy.deepcopy(DEFAULT_SPACE))
    rollouts_per_step: int | str | None = "constant"
    objective: dict[str, Any] = field(default_factory=lambda: {"metric": "val/pass@1", "direction": "maximize",
                                                               "reduce": "last"})
    sampler: dict[str, Any] = field(default_factory=lambda: {"type": "tpe", "seed": 0})
    pruner: dict[str, Any] = field(default_factory=lambda: {"type": "median"})
    # A synthetic task of experiments/tasks.py (issue 22): its settings and curriculum length go to every
    # trial (``data.synthetic``, ``model.curriculum.max_latent_stage``), so a trial cannot run a start of
    # one task on another; keys in ``args`` win.
    task: str | None = None
    source: str | None = None  # the YAML file this came from

    # -- validation ----------------------------------------------------------------------------------
    def validate(self) -> None:
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"sweep task={self.task!r} is not a task of experiments/tasks.py; choose from {sorted(TASKS)}")
        if not self.space:
            raise ValueError("sweep: the search space is empty")
        for name, spec in self.space.items():
            t = spec.get("type")
            if t not in _PARAM_TYPES:
                raise ValueError(f"sweep space {name!r}: type={t!r} must be one of {_PARAM_TYPES}")
            if t == "categorical":
                if not spec.get("choices"):
                    raise ValueError(f"sweep space {name!r}: categorical needs a non-empty 'choices' list")
            else:
                if "low" not in spec or "high" not in spec:
                    raise ValueError(f"sweep space {name!r}: {t} needs 'low' and 'high'")
                if float(spec["low"]) > float(spec["high"]):
                    raise ValueError(f"sweep space {name!r}: low > high")
                if spec.get("log") and float(spec["low"]) <= 0:
                    raise ValueError(f"sweep space {name!r}: a log scale needs low > 0")
            if name in self.args:
                raise ValueError(f"sweep: {name!r} is both searched and fixed in 'args'")
        direction = self.objective.get("direction", "maximize")
        if direction not in ("maximize", "minimize"):
            raise ValueError(f"sweep objective.direction={direction!r} must be maximize or minimize")
        if self.objective.get("reduce", "last") not in ("last", "best", "mean"):
            raise ValueError("sweep objective.reduce must be 'last' (value at the end of the fit), 'best' or "
                             "'mean' (mean over the validations: the area under the learning curve)")
        over = self.objective.get("mean_over")
        if over is not None and self.space.get(over, {}).get("type") != "categorical":
            raise ValueError(f"sweep objective.mean_over={over!r} must name a categorical parameter of the space "
                             "(the setting of the others is chosen on its mean over that parameter's values)")
        if self.pruner.get("type", "median") not in _PRUNERS:
            raise ValueError(f"sweep pruner.type={self.pruner.get('type')!r} must be one of {_PRUNERS}")
        kind = self.sampler_kind
        if kind not in ("tpe", "random", "grid"):
            raise ValueError(f"sweep sampler.type={kind!r} must be tpe, random or grid")
        if self.is_grid:  # a grid needs every point named: only categorical parameters have them
            loose = [n for n, spec in self.space.items() if spec["type"] != "categorical"]
            if loose:
                raise ValueError(f"sweep sampler.type=grid needs categorical parameters; {loose} are not "
                                 "(list their values as choices)")
        rollouts = self.constant_rollouts()
        if rollouts is not None and GROUP_SIZE_KEY in self.space:
            spec = self.space[GROUP_SIZE_KEY]
            ks = spec["choices"] if spec["type"] == "categorical" else range(int(spec["low"]), int(spec["high"]) + 1)
            bad = [k for k in ks if rollouts % int(k)]
            if bad:
                raise ValueError(f"sweep: rollouts per step {rollouts} (prompts x K) is not divisible by group "
                                 f"sizes {bad}; change the choices or set rollouts_per_step")
            if PROMPTS_KEY in self.space:
                raise ValueError(f"sweep: {PROMPTS_KEY} cannot be searched while rollouts per step are constant")
            for ph in self._schedule():
                if ph.get("kind") == "grpo" and ph.get("batch_size") is not None:
                    raise ValueError("sweep: a grpo phase sets batch_size, which would override grpo_prompts; "
                                     "remove it or set rollouts_per_step: null")

    # -- resolved values -------------------------------------------------------------------------------
    def _schedule(self) -> list[dict]:
        s = self.args.get("model.schedule")
        if isinstance(s, str):
            try:
                s = json.loads(s)
            except json.JSONDecodeError:
                s = yaml.safe_load(s)
        return list(s or [])

    def base_values(self) -> dict:
        """The base experiment config (YAML) as a nested dict ({} when none)."""
        if not self.base_config:
            return {}
        with open(self.base_config) as f:
            return yaml.safe_load(f) or {}

    def base_value(self, key: str, default: Any = None) -> Any:
        """A dotted key's value: the fixed args first, then the base config, else ``default``."""
        if key in self.args:
            return self.args[key]
        node: Any = self.base_values()
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def constant_rollouts(self) -> int | None:
        """Rollouts per step (prompts x K) held constant when K is searched; None when off."""
        r = self.rollouts_per_step
        if r is None or r is False or GROUP_SIZE_KEY not in self.space:
            return None
        if isinstance(r, int) and not isinstance(r, bool):
            return r
        if r != "constant":
            raise ValueError(f"sweep rollouts_per_step={r!r} must be 'constant', an integer or null")
        from ...module import LatentReasoner

        defaults = inspect.signature(LatentReasoner).parameters  # the run's defaults: one source for both
        prompts = self.base_value(PROMPTS_KEY, defaults["grpo_prompts"].default)
        k = self.base_value(GROUP_SIZE_KEY, defaults["grpo"].default.group_size)
        return int(prompts) * int(k)

    @property
    def direction(self) -> str:
        return self.objective.get("direction", "maximize")

    @property
    def metric(self) -> str:
        return self.objective.get("metric", "val/pass@1")

    # -- Optuna objects ------------------------------------------------------------------------------------
    def suggest(self, trial: optuna.trial.Trial) -> dict[str, Any]:
        """Sample the trial's parameters (param names are the CLI keys)."""
        out = {}
        for name, spec in self.space.items():
            t = spec["type"]
            if t == "float":
                out[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]),
                                                log=bool(spec.get("log", False)), step=spec.get("step"))
            elif t == "int":
                out[name] = trial.suggest_int(name, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log", False)),
                                              step=int(spec.get("step", 1)))
            else:
                out[name] = trial.suggest_categorical(name, list(spec["choices"]))
        return out

    def overrides(self, params: dict[str, Any]) -> dict[str, Any]:
        """Every CLI override of a trial: fixed args, then the sampled params, then derived keys."""
        task = {} if self.task is None else task_overrides(self.task)
        ov = {**task, **self.args, **params}
        rollouts = self.constant_rollouts()
        if rollouts is not None and GROUP_SIZE_KEY in params:
            ov[PROMPTS_KEY] = rollouts // int(params[GROUP_SIZE_KEY])
        if self.init_from:
            ov["model.init_from"] = self.init_from
        return ov

    @property
    def sampler_kind(self) -> str:
        """The sampler's ``type`` (``tpe`` when unset): one place that knows the default."""
        return self.sampler.get("type", "tpe")

    @property
    def is_grid(self) -> bool:
        """A grid sweep: categorical space, every point once, the driver stops when all are asked."""
        return self.sampler_kind == "grid"

    def make_sampler(self, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
        spec = dict(self.sampler)
        kind = spec.pop("type", "tpe")
        seed = spec.pop("seed", 0)
        seed = None if seed is None else int(seed) + seed_offset
        if kind == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if kind == "grid":  # every combination once, in a seeded order; the study stops when the grid is done
            return _AskTellGridSampler({n: list(sp["choices"]) for n, sp in self.space.items()}, seed=seed)
        spec.setdefault("constant_liar", True)  # parallel workers do not all sample the same point
        return optuna.samplers.TPESampler(seed=seed, **spec)

    def make_pruner(self) -> optuna.pruners.BasePruner:
        return make_pruner(self.pruner)

    def grid_exhausted(self, study: optuna.Study) -> bool:
        """True when a grid sweep has asked for every point (a further ask would repeat one)."""
        if not self.is_grid:
            return False
        points = 1
        for spec in self.space.values():
            points *= len(spec["choices"])
        # a failed trial's point, enqueued again (WAITING), is not asked yet: the driver must run it, not stop
        # (issue 22's recipe grid, 2026-12-06: a resumed driver stopped with 2 requeued points never run)
        asked = {json.dumps(t.params, sort_keys=True) for t in study.get_trials(deepcopy=False)
                 if t.state not in (optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING) and t.params}
        return len(asked) >= points


class _AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, for the driver's ask / tell loop: the stock one calls ``study.stop()`` after the
    last point, which raises outside ``study.optimize``; the driver stops on ``grid_exhausted`` instead."""

    def after_trial(self, study, trial, state, values) -> None:  # noqa: D102 (see the class docstring)
        return None


def make_pruner(spec: dict) -> optuna.pruners.BasePruner:
    spec = dict(spec or {})
    kind = spec.pop("type", "median")
    if kind == "median":
        return optuna.pruners.MedianPruner(**spec)
    if kind == "percentile":
        return optuna.pruners.PercentilePruner(**spec)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(**spec)
    if kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(**spec)
    if kind == "threshold":
        return optuna.pruners.ThresholdPruner(**spec)
    if kind == "nop":
        return optuna.pruners.NopPruner()
    raise ValueError(f"pruner type {kind!r} is unknown; choose one of {_PRUNERS}")


def _resolve(path: str | None, here: Path) -> str | None:
    if not path:
        return None
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return str(p.resolve()) if p.exists() else str(p)
    q = here / p
    return str(q.resolve()) if q.exists() else str(p)


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = d
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def load_sweep_config(path: str | Path, sets: list[str] | None = None, init_from: str | None = None) -> SweepConfig:
    """Read a sweep YAML; ``sets`` are ``KEY=VALUE`` overrides of the YAML itself (value parsed as YAML,
    e.g. ``pruner.type=threshold`` or ``args.trainer.val_check_interval=5``: the first dot after
    ``args.`` / ``space.`` is part of the CLI key, so use ``args.KEY=...`` with the whole CLI key)."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    for s in sets or []:
        if "=" not in s:
            raise ValueError(f"--set {s!r}: expected KEY=VALUE")
        key, value = s.split("=", 1)
        value = yaml.safe_load(value)
        top, _, rest = key.partition(".")
        if top in ("args", "space") and rest:
            raw.setdefault(top, {})
            raw[top][rest] = value
        else:
            _set_dotted(raw, key, value)
    known = {f for f in SweepConfig.__dataclass_fields__} - {"source"}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"sweep config {path}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    cfg = SweepConfig(**{k: v for k, v in raw.items() if v is not None or k in ("base_config", "init_from",
                                                                                  "rollouts_per_step")})
    if "space" not in raw or raw["space"] is None:
        cfg.space = copy.deepcopy(DEFAULT_SPACE)
    cfg.objective = {"metric": "val/pass@1", "direction": "maximize", "reduce": "last", **(cfg.objective or {})}
    here = path.resolve().parent
    cfg.base_config = _resolve(cfg.base_config, here)
    cfg.init_from = _resolve(init_from or cfg.init_from, here)
    cfg.source = str(path)
    cfg.validate()
    return cfg
