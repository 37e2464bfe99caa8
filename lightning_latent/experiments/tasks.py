"""Settings of the synthetic task for the paper's-setting study (issue 22), and the converged start's schedule.

The embedded task (3 steps, numbers to 20, values to 60) is too easy for the question the study asks: its
fully latent model reached 58-87% after a constant-lr plateau run and about 20 points more with more
training (docs/results/ablation_2026-12-01_unconverged_start/). More steps and a wider value range make the
latent model carry more in its thoughts. ``scripts/difficulty.py`` probes these settings and
``docs/results/difficulty/`` records which one the study uses; the study's ``converged_<task>`` budgets
start from the same command line as the probe of that task (:func:`probe_args`), so seed 0's start is the
probe's run when the thread count is the same too (the probe's ``--threads``; the study's ``--jobs``: 1
thread per cell at ``--jobs 2`` on 2 cores, as the probes ran).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from .processes import REPO_ROOT

CONVERGED_CONFIG = REPO_ROOT / "experiments" / "configs" / "synthetic" / "converged.yaml"


@dataclass(frozen=True)
class Task:
    """One setting of the synthetic task (``--data.synthetic``) and its latent curriculum's length."""

    min_steps: int
    max_steps: int
    max_number: int
    max_value: int
    operators: str = "+-*"

    @property
    def stages(self) -> int:
        """Latent stages: one thought per reasoning step (``c_thought`` 1), the last stage fully latent."""
        return self.max_steps

    def synthetic(self) -> dict:
        return {"seed": 0, "min_steps": self.min_steps, "max_steps": self.max_steps,
                "max_number": self.max_number, "max_value": self.max_value, "operators": self.operators}


TASKS: dict[str, Task] = {
    "p3_20": Task(3, 3, 20, 60),  # the embedded task
    "p4_20": Task(4, 4, 20, 60),
    "p4_40": Task(4, 4, 40, 99),
    "p5_20": Task(5, 5, 20, 60),
}

#: The plateau rule of a converged start: 2,000 validation problems (converged.yaml) every 250 steps, three
#: evaluations in a row without a 1-point gain over the best, never before 2,000 steps.
PLATEAU_RULE = {"every": 250, "patience": 3, "min_gain": 0.01, "min_steps": 2000}
FLOOR_LR = 1.0e-5


def converged_schedule(stages: int) -> list[dict]:
    """converged.yaml's schedule for a task of ``stages`` steps: CoT to its plateau, then its lr decayed to the
    floor; stages 1..n-1 a fixed 1,000 steps each (they only carry the model from CoT to thoughts, as
    Coconut's fixed epochs per stage do); the fully latent stage, the RL arms' start, to its plateau, then
    decayed."""
    decay = {"floor": FLOOR_LR}
    return [{"kind": "cot", "steps": 5000, "plateau": PLATEAU_RULE, "decay": {"steps": 1000, **decay}},
            {"kind": "coconut", "steps": 1000, "stages": list(range(1, stages))},
            {"kind": "coconut", "steps": 8000, "stages": [stages], "name": "coconut_final", "plateau": PLATEAU_RULE,
             "decay": {"steps": 1500, **decay}}]


def task_overrides(name: str) -> dict:
    """What every run of a task needs, as config keys: the task and the curriculum's length."""
    t = TASKS[name]
    return {"data.synthetic": t.synthetic(), "model.curriculum.max_latent_stage": t.stages}


def task_args(name: str) -> list[str]:
    """:func:`task_overrides` on a command line."""
    return [a for k, v in task_overrides(name).items() for a in (f"--{k}", json.dumps(v))]


def schedule_args(name: str) -> list[str]:
    """The converged start's schedule on a command line."""
    return ["--model.schedule", json.dumps(converged_schedule(TASKS[name].stages))]


def start_args(name: str) -> list[str]:
    """The converged start's arguments after ``--config converged.yaml`` (the probe's and the study's)."""
    return [*task_args(name), *schedule_args(name)]


def probe_args(name: str) -> list[str]:
    """``experiments/run.py`` arguments of the task's difficulty probe (scripts/difficulty.py), which are
    the study's seed-0 start arguments (Study.coconut with ``converged_<name>``) up to their order."""
    return ["fit", "--config", str(CONVERGED_CONFIG), *start_args(name), "--seed_everything", "0", "--data.seed", "0"]
