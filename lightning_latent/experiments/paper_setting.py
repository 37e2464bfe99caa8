"""Issue 22's measurement, end to end: every step of docs/results/paper_setting_plan.md after the difficulty,
each choice made on validation by a rule fixed here before it runs, resumable, for a detached run.

Steps (each skipped once its choice is in ``OUT/choices.json``; each one's runs resume where they stopped):

1. ``diversity``: before any cell, ``frac_zero_std`` against p under greedy answers (and the other arms)
   from the task's probe start (p_train 0.1); the study measures it again from its seed-0 start.
2. ``p_train``: a converged start at each rate of :data:`RATES` (seed 0; the 0.1 start can be the task's
   difficulty probe, the same command line), its converged check, and ``dropout_greedy`` for the RL budget
   at rollout p = ``p_train``. Chosen: the largest validation gain (:func:`rl_gain`).
3. ``recipe``: ``sweeps/paper_recipe.yaml`` (lr x dynamic sampling, each for three arms), chosen on the mean
   over the arms (:func:`choose_recipe`); a choice at the lr grid's edge extends the grid past it
   (:func:`edge_lr`).
4. ``noise``: ``sweeps/paper_noise.yaml`` for the dropout arms, and a grid of 3 for ``temperature`` (T) and
   ``gaussian`` (scale), at the recipe; each arm takes its best point (:func:`choose_noise`).
5. ``study``: every arm, :attr:`PaperSetting.seeds` seeds, at the chosen settings (seed 0's start and its
   cells adopted from step 2); its primary comparisons (:data:`PRIMARY`) written to ``choices.json``.
6. ``pt0``: ``temperature``, ``dropout_shared``, ``dropout_greedy`` from converged ``p_train = 0`` starts,
   3 seeds, the same settings.
7. ``extend``: one more seed at a time, up to ``max_seeds``, while either primary interval includes 0 and
   is wider than ±1 point (:func:`more_seeds_needed`).

Cells run at ``threads`` torch threads each, two at a time on the 2-core machine, as the probes ran.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..metrics import mean_and_ci95
from .processes import REPO_ROOT
from .study_report import PRIMARY, converged_cell
from .tasks import TASKS

log = logging.getLogger("lightning_latent.experiments.paper_setting")

RATES = (0.05, 0.1, 0.2)  # the p_train choice (issue 22, point 1)
RECIPE_ARMS = ("temperature", "dropout_shared", "dropout_greedy")  # the recipe's mean, and the pt0 arms
TEMPERATURES = (0.7, 1.0, 1.3)
SCALES = (0.05, 0.1, 0.2)
STEPS = ("diversity", "ptrain", "recipe", "noise", "study", "pt0", "extend")
# seed 0's start and its cells, computed in the p_train step (with its extensions: adopted_cells)
ADOPTED = ("coconut_s0", "start_s0", "test_coconut_s0", "converged_s0", "val_start_latent_s0")


def adopted_cells(max_extensions: int) -> tuple[str, ...]:
    """:data:`ADOPTED` and the cells of seed 0's extensions and their checks, masked and masks off (Study.start)."""
    return (*ADOPTED, converged_cell(0, 0, True),
            *(c for k in range(1, max_extensions + 1)
              for c in (converged_cell(0, k), converged_cell(0, k, True), f"extend_s0_x{k}")))


def budget_name(task: str, p_train: float) -> str:
    """The study budget of a task at ``p_train`` (study.BUDGETS): 0.1 is ``converged_<task>`` itself."""
    return f"converged_{task}" if p_train == 0.1 else f"converged_{task}_pt{p_train:g}"


def rl_gain(train_cell: dict) -> float:
    """An RL cell's validation gain: its best validation pass@1 (the checkpoint the study keeps) minus its
    start's, on the same validation problems."""
    curve = train_cell["curves"].get("val/pass@1") or []
    if not curve:
        raise ValueError("the RL cell logged no validation curve")
    return max(v for _, v in curve) - train_cell["start_val"]


#: Issue 22's headroom band for a start's fully latent greedy pass@1 (point 3: the paper's Coconut sits at 27-34%).
BAND = (0.25, 0.60)


def band_distance(v: float, band: tuple[float, float] = BAND) -> float:
    """How far ``v`` lies outside ``band`` (0 inside)."""
    return max(band[0] - v, 0.0, v - band[1])


def choose_p_train(gains: dict[float, float], start_vals: dict[float, float] | None = None,
                   band: tuple[float, float] = BAND) -> float:
    """The rate with the largest gain; a tie goes to the lower rate (the smaller change to the model). With
    ``start_vals`` (each rate's start, validation), only the rates whose start sits in ``band`` compete; if none
    does, the ones nearest it (added 2026-12-06 05:15 UTC, when the new form's starts were in and no gain was:
    the 0.1 start sat at 84%, far above the band the task was chosen for)."""
    if not gains:
        raise ValueError("no p_train rate has a result")
    if start_vals is not None:
        near = min(band_distance(start_vals[p], band) for p in gains)
        gains = {p: g for p, g in gains.items() if band_distance(start_vals[p], band) == near}
    return min(gains, key=lambda p: (-gains[p], p))


def choose_recipe(df) -> dict:
    """The recipe of ``sweeps/paper_recipe.yaml``: the lr x dynamic-sampling point with the best mean over the
    arms of their mean validation curves (every arm must have completed it)."""
    from .sweep.results import best_by_mean_over

    _, best = best_by_mean_over(df, "model.perturb.arm")
    if best is None:
        raise ValueError("no recipe point has a completed trial for every arm")
    return {"model.optim.grpo_lr": float(best["model.optim.grpo_lr"]),
            "model.grpo.dynamic_sampling": _bool(best["model.grpo.dynamic_sampling"])}


#: sweeps/paper_recipe.yaml's learning rates, and how often the grid may be extended past an edge (:func:`edge_lr`)
RECIPE_LRS = (5.0e-6, 1.0e-5, 2.0e-5)
MAX_LR_EXTENSIONS = 2


def edge_lr(chosen: float, tried: list[float] | tuple[float, ...], extensions: int,
            max_extensions: int = MAX_LR_EXTENSIONS) -> float | None:
    """The next lr of the recipe grid when ``chosen`` lies on its edge: half the lowest lr tried, or twice the
    highest, until ``max_extensions`` extensions have run; None when the choice is interior (or the budget is
    spent). Why (decided 2026-12-06 at 07:50 UTC, with 4 of the 18 trials in): from a converged start every
    trial so far lost ground at once, the most at the largest lr, and a grid whose best point is its edge has
    not found the recipe, only a side of it."""
    lo, hi = min(tried), max(tried)
    if extensions >= max_extensions or lo == hi:
        return None
    if math.isclose(chosen, lo):
        return lo / 2
    if math.isclose(chosen, hi):
        return hi * 2
    return None


def choose_noise(df, key: str, arm: str | None = None) -> dict[str, float]:
    """Per arm, the value of ``key`` whose completed trial has the best objective (a tie: the lower value).
    ``arm``: the arm of a sweep that does not search ``model.perturb.arm``."""
    done = df[df["state"] == "COMPLETE"]
    if not len(done):
        raise ValueError(f"no completed trial for {key}")
    arms = done["params_model.perturb.arm"] if "params_model.perturb.arm" in done.columns else [arm] * len(done)
    best: dict[str, tuple[float, float]] = {}
    for a, v, x in zip(arms, done["value"], done[f"params_{key}"]):
        if a not in best or (-v, x) < (-best[a][0], best[a][1]):
            best[a] = (float(v), float(x))
    return {a: x for a, (_, x) in best.items()}


def missing_grid_points(df, n_points: int) -> int:
    """How many of a grid sweep's ``n_points`` points have no COMPLETE trial (its parameter settings counted
    once each). Why: at 09:12 UTC on 2026-12-06 a resumed sweep stopped with two requeued points never run,
    and the step chose over the rest; a grid step now refuses to choose until this is 0."""
    done = df[df["state"] == "COMPLETE"] if len(df) else df
    cols = [c for c in done.columns if c.startswith("params_")]
    have = len(done[cols].astype(str).drop_duplicates()) if len(done) and cols else 0
    return max(n_points - have, 0)


def _yaml(v) -> str:
    """A value as the sweep's ``--set`` parses it back (YAML: ``2e-05`` would be a string, ``2.0e-05`` a float)."""
    import yaml

    return yaml.safe_dump(v).splitlines()[0]


def _bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("true", "1")


def primary_intervals(pass1: dict[tuple[str, int], float]) -> dict[str, dict]:
    """The primary comparisons as paired differences of test greedy pass@1 over the seeds both arms have:
    ``{"a - b": {"mean", "ci95", "seeds"}}`` (points are fractions)."""
    out = {}
    for a, b in PRIMARY:
        seeds = sorted(s for (arm, s) in pass1 if arm == a and (b, s) in pass1)
        if seeds:
            m, h = mean_and_ci95([pass1[(a, s)] - pass1[(b, s)] for s in seeds])
            out[f"{a} - {b}"] = {"mean": m, "ci95": h, "seeds": len(seeds)}
    return out


def more_seeds_needed(intervals: dict[str, dict], seeds: int, max_seeds: int = 10, width: float = 0.01) -> bool:
    """Issue 22's rule: another seed, up to ``max_seeds``, while either primary interval includes 0 and is
    wider than ±``width`` (or has no width yet: one seed)."""
    def open_(r: dict) -> bool:
        h = r["ci95"]
        return math.isnan(h) or (h > width and abs(r["mean"]) <= h)

    return seeds < max_seeds and any(open_(r) for r in intervals.values())


class PaperSetting:
    """The pipeline of one task. ``work``: runs and checkpoints (outside the repository); ``out``: choices,
    sweep summaries and the p_train studies' tables; ``study_out``: the study's tables (docs/results/ablation)."""

    def __init__(self, task: str, work: str | Path, out: str | Path, study_out: str | Path,
                 start0: str | None = None, grid_steps: int = 300, seeds: int = 5, max_seeds: int = 10,
                 threads: int = 1, budgets: dict | None = None, sweep_sets: tuple[str, ...] = (),
                 ptrain_lr: float | None = None):
        from .study import BUDGETS

        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
        if grid_steps < 25 or grid_steps % 25:
            raise ValueError(f"grid_steps {grid_steps} must be a positive multiple of 25 (the validation interval)")
        self.task, self.seeds, self.max_seeds, self.threads = task, seeds, max_seeds, threads
        self.work, self.out, self.study_out = Path(work).resolve(), Path(out).resolve(), Path(study_out).resolve()
        self.start0, self.grid_steps = start0, grid_steps
        self.budgets = budgets if budgets is not None else BUDGETS  # (tests pass tiny ones)
        if budget_name(task, 0.1) not in self.budgets:
            raise ValueError(f"task {task!r} has no study budget (study.BUDGETS: converged_<task>)")
        self.sweep_sets = sweep_sets  # extra --set of every sweep (tests: a tiny model)
        # the GRPO lr of the p_train step's dropout_greedy cells (None: dropout_grpo.yaml's), before the recipe exists
        self.ptrain_lr = ptrain_lr
        self.work.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)

    @classmethod
    def reading(cls, task: str, work: Path, study_out: Path) -> tuple[PaperSetting, dict]:
        """The pipeline in ``work`` (choices in ``work/docs/paper_setting``, as the README's command writes them)
        and its choices, for a script that reports on it while it runs; exits, naming the file, while the
        study's settings are not chosen (no study cell can exist yet)."""
        ps = cls(task, work, work / "docs" / "paper_setting", study_out)
        c = ps.choices()
        if "settings" not in c:
            raise SystemExit(f"{ps.choices_file}: no settings chosen yet; the study has not started")
        return ps, c

    # -- bookkeeping ----------------------------------------------------------------------------------
    def note(self, msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        log.info(msg)
        with open(self.work / "progress.log", "a") as f:
            f.write(line + "\n")

    @property
    def choices_file(self) -> Path:
        return self.out / "choices.json"

    def choices(self) -> dict:
        return json.loads(self.choices_file.read_text()) if self.choices_file.exists() else {"task": self.task}

    def choose(self, key: str, value) -> None:
        c = self.choices()
        if c.get("task", self.task) != self.task:
            raise SystemExit(f"{self.choices_file} is for task {c['task']!r}, not {self.task!r}")
        c[key] = value
        self.choices_file.write_text(json.dumps(c, indent=1))
        self.note(f"chosen {key}: {json.dumps(value)}")

    def study(self, name: str, p_train: float, seeds: int, arms: tuple[str, ...], out: Path, jobs: int,
              settings: dict | None = None, diversity: bool = False):
        from .study import Study

        b = self.budgets[budget_name(self.task, p_train)]
        if settings:
            b = b.with_settings(settings)
        return Study(out, seeds=seeds, arms=arms, budget=b, diversity=diversity, work=self.work / name, jobs=jobs)

    # -- the steps ------------------------------------------------------------------------------------
    def run(self, until: str = STEPS[-1]) -> dict:
        os.environ["OMP_NUM_THREADS"] = str(self.threads)  # every cell and trial process: as the probes ran
        for step in STEPS[:STEPS.index(until) + 1]:
            getattr(self, f"step_{step}")()
        return self.choices()

    def _ptrain_study(self, p: float):
        lr = {"grpo": {"model.optim.grpo_lr": self.ptrain_lr}} if self.ptrain_lr else None
        return self.study(f"p_train/pt{p:g}", p, 1, ("dropout_greedy",), self.out / "p_train" / f"pt{p:g}", 1, lr)

    def step_ptrain(self) -> None:
        if "p_train" in self.choices():
            return
        if self.start0:  # the 0.1 start at seed 0 is the difficulty probe's run (the same command line)
            cell = self.work / "p_train" / "pt0.1" / "cells" / "coconut_s0.json"
            if not cell.exists():
                cell.parent.mkdir(parents=True, exist_ok=True)
                cell.write_text(json.dumps({"ckpt": str(Path(self.start0).resolve()), "seconds": None,
                                            "adopted": "the task's difficulty probe (scripts/difficulty.py)"}))
        self.note(f"p_train: a start, its converged check and dropout_greedy at each of {RATES}")
        with ThreadPoolExecutor(2) as pool:  # the 0.1 cells first (its start exists), beside the 0.05 start
            list(pool.map(lambda p: self._ptrain_study(p).run(), (0.1, 0.05, 0.2)))
        rows = {}
        for p in RATES:
            st = self._ptrain_study(p)
            tr = st._done("train_dropout_greedy_s0")
            start = st._done("start_s0")
            rows[p] = {"gain": rl_gain(tr), "start_val": tr["start_val"],
                       "best_val": rl_gain(tr) + tr["start_val"], "extensions": start["extensions"],
                       "converged": start["converged"], "start": start["ckpt"]}
        chosen = choose_p_train({p: r["gain"] for p, r in rows.items()}, {p: r["start_val"] for p, r in rows.items()})
        self.flag_unconverged(self._ptrain_study(chosen), 1)
        self.choose("p_train", {"chosen": chosen, "rule": "largest dropout_greedy validation gain (best - start) "
                                f"among the rates whose start's validation is in {BAND} (else the nearest)",
                                "grpo_lr": self.ptrain_lr,
                                "rates": {f"{p:g}": r for p, r in rows.items()}})

    def start(self) -> str:
        c = self.choices()["p_train"]
        return c["rates"][f"{c['chosen']:g}"]["start"]

    def step_diversity(self) -> None:
        """Before any cell: frac_zero_std against p under greedy answers (and the other arms' noise) from the
        task's p_train 0.1 start (``start0``, the probe). The study measures it again from its own seed-0 start."""
        out = self.out / "diversity"
        if not self.start0 or (out / "diversity.csv").exists():
            return
        self.note(f"diversity: frac_zero_std against p under greedy answers, from {self.start0}")
        self.study("diversity", 0.1, 1, ("none",), out, 1, diversity=True).run_diversity(str(Path(self.start0).resolve()))

    def sweep_args(self, name: str, config: str, sets: list[str], n_trials: int) -> list[str]:
        """``sweeps/sweep.py`` arguments of one grid: the task, the chosen start and ``p_train``, the grid's
        RL steps, and ``sets`` (the grid's own keys)."""
        p = self.choices()["p_train"]["chosen"]
        steps = f"[{{kind: grpo, steps: {self.grid_steps}, name: {name}}}]"
        return ["--config", str(REPO_ROOT / "sweeps" / config), "--n-trials", str(n_trials),
                "--out", str(self.work / name), "--study-name", name, "--init-from", self.start(), "--max-retry", "3",
                "--no-plots", "--set", f"task={self.task}", "--set", f"args.model.schedule={steps}",
                "--set", f"args.model.perturb.p_train={p}",
                *[a for s in (*sets, *self.sweep_sets) for a in ("--set", s)]]

    def sweep(self, name: str, config: str, sets: list[str], n_trials: int, workers: int):
        """Run ``workers`` drivers of one sweep side by side (they share its sqlite study) and load its trials.
        A driver killed with the session leaves its trial to the next one's stale check, which runs it again."""
        import optuna

        from .sweep.results import trials_frame

        out = self.work / name
        cmd = [sys.executable, str(REPO_ROOT / "sweeps" / "sweep.py"), *self.sweep_args(name, config, sets, n_trials)]
        self.note(f"{name}: {n_trials} trials, {workers} worker(s)")
        out.mkdir(parents=True, exist_ok=True)
        procs = []
        for w in range(workers):
            f = open(out / f"driver{w}.log", "a")
            procs.append((subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=self.work), f))
            time.sleep(2)  # the first creates the study
        for proc, f in procs:
            proc.wait()
            f.close()
        if any(proc.returncode for proc, _ in procs):
            raise SystemExit(f"sweep {name} failed; see {out}/driver*.log")
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")
        df = trials_frame(study)
        if missing := missing_grid_points(df, n_trials):
            raise SystemExit(f"sweep {name}: {missing} of its {n_trials} grid points have no completed trial; "
                             f"no choice is made over it (rerun to finish it; see {out}/driver*.log)")
        for fname in ("summary.md", "trials.csv"):
            if (out / fname).exists():
                (self.out / name).mkdir(parents=True, exist_ok=True)
                shutil.copy(out / fname, self.out / name / fname)
        return df

    def noise_sets(self) -> dict[str, tuple[list[str], int, int]]:
        """The noise grids at the recipe: name -> (--set values, trials, workers)."""
        p = self.choices()["p_train"]["chosen"]
        rset = [f"args.{k}={_yaml(v)}" for k, v in self.choices()["recipe"].items()]
        ps = [round(p / 2, 4), p, round(2 * p, 4)]
        return {"noise_dropout": ([*rset, f"space.model.perturb.p={{type: categorical, choices: {ps}}}"], 9, 2),
                "noise_temperature": ([*rset, "args.model.perturb.arm=temperature",
                                       (f"space={{model.grpo.answer_temperature: {{type: categorical, choices: "
                                        f"{list(TEMPERATURES)}}}}}")], 3, 1),
                "noise_gaussian": ([*rset, "args.model.perturb.arm=gaussian",
                                    f"space={{model.perturb.noise_scale: {{type: categorical, choices: {list(SCALES)}}}}}"],
                                   3, 1)}

    def step_recipe(self) -> None:
        if "recipe" in self.choices():
            return
        import pandas as pd

        p = self.choices()["p_train"]["chosen"]
        frames = [self.sweep("recipe", "paper_recipe.yaml", [f"args.model.perturb.p={p}"], 18, 2)]
        tried, rec = list(RECIPE_LRS), choose_recipe(frames[0])
        while (lr := edge_lr(rec["model.optim.grpo_lr"], tried, len(tried) - len(RECIPE_LRS))) is not None:
            # the same 6 points (3 arms x dynamic sampling off / on) at the lr past the edge
            self.note(f"recipe: lr {rec['model.optim.grpo_lr']:g} is the grid's edge; the grid extends to {lr:g}")
            space = f"space.model.optim.grpo_lr={{type: categorical, choices: [{_yaml(lr)}]}}"
            frames.append(self.sweep(f"recipe_lr{lr:g}", "paper_recipe.yaml", [f"args.model.perturb.p={p}", space],
                                     6, 2))
            tried.append(lr)
            rec = choose_recipe(pd.concat(frames, ignore_index=True))
        self.choose("recipe_grid", {"lrs": sorted(tried), "extensions": len(tried) - len(RECIPE_LRS),
                                    "rule": "an lr at the grid's edge extends it (half the lowest / twice the "
                                            f"highest), at most {MAX_LR_EXTENSIONS} times"})
        self.choose("recipe", rec)

    def step_noise(self) -> None:
        if "settings" in self.choices():
            return
        grids = self.noise_sets()
        run = lambda name: self.sweep(name, "paper_noise.yaml", *grids[name])
        drop = run("noise_dropout")  # two workers; then the two small grids side by side
        with ThreadPoolExecutor(2) as pool:
            temp, gauss = pool.map(run, ("noise_temperature", "noise_gaussian"))
        arms = {a: {"model.perturb.p": v} for a, v in choose_noise(drop, "model.perturb.p").items()}
        arms["temperature"] = {"model.grpo.answer_temperature":
                               choose_noise(temp, "model.grpo.answer_temperature", "temperature")["temperature"]}
        arms["gaussian"] = {"model.perturb.noise_scale": choose_noise(gauss, "model.perturb.noise_scale",
                                                                      "gaussian")["gaussian"]}
        self.choose("settings", {"grpo": self.choices()["recipe"], "arms": arms})

    def _main_study(self, seeds: int):
        from .study import ARMS

        c = self.choices()
        st = self.study("study", c["p_train"]["chosen"], seeds, ARMS, self.study_out, 2, c["settings"], diversity=True)
        src = self._ptrain_study(c["p_train"]["chosen"]).cells
        for cell in adopted_cells(st.budget.max_extensions):  # computed in the p_train step
            if (src / f"{cell}.json").exists() and not (st.cells / f"{cell}.json").exists():
                shutil.copy(src / f"{cell}.json", st.cells / f"{cell}.json")
        return st

    def flag_unconverged(self, st, seeds: int) -> None:
        """A start still failing its converged check after its extensions (Study.start) is reported."""
        for s in range(seeds):
            c = st._done(f"start_s{s}")
            if c and not c["converged"]:
                self.note(f"WARNING: seed {s}'s start ({st.work}) still fails its converged check after "
                          f"{c['extensions']} extension(s)")

    def _intervals(self, st) -> dict:
        pass1 = {}
        for s in range(st.seeds):
            for arm in st.arms:
                r = st._done(f"test_{arm}_s{s}")
                if r:
                    pass1[(arm, s)] = r["pass@1"]
        return primary_intervals(pass1)

    def step_study(self) -> None:
        if "study_5" in self.choices():
            return
        st = self._main_study(self.seeds)
        self.note(f"study: every arm, {self.seeds} seeds")
        st.run()
        self.flag_unconverged(st, self.seeds)
        shutil.copy(self.study_out / "results.md", self.study_out / f"results_{self.seeds}_seeds.md")
        self.choose("study_5", {"seeds": self.seeds, "primary": self._intervals(st)})

    def step_pt0(self) -> None:
        if "pt0" in self.choices():
            return
        c = self.choices()
        st = self.study("pt0", 0.0, 3, RECIPE_ARMS, self.study_out / "p_train_0", 2, c["settings"])
        self.note("pt0: temperature, dropout_shared, dropout_greedy from converged p_train = 0 starts, 3 seeds")
        st.run()
        self.flag_unconverged(st, 3)
        self.choose("pt0", {"seeds": 3, "done": True})

    def step_extend(self) -> None:
        n = self.choices().get("study_final", {}).get("seeds", self.seeds)
        while True:
            st = self._main_study(n)
            if not all(st._done(f"test_{a}_s{s}") for a in st.arms for s in range(n)):
                st.run()
            iv = self._intervals(st)
            self.choose("study_final", {"seeds": n, "primary": iv})
            if not more_seeds_needed(iv, n, self.max_seeds):
                return
            n += 1
            self.note(f"extend: a primary interval includes 0 and is wider than ±1 point; seed {n - 1}")
