"""The ablation study: per seed one Coconut checkpoint, then every arm from it with the same budget.

Every run is an ordinary ``experiments/run.py`` command line (logged, so every number here can be rerun
by hand), logging to one TensorBoard root ``OUT/tb``. By default the cells run in ``jobs`` long-lived
worker processes, one after another (:mod:`.cell_worker`: the same command line, without a dozen
seconds of process start and imports per cell); ``in_process=False`` starts one process per cell, as
before. A cell (a Coconut checkpoint, the start's validation, an arm's training, a test evaluation)
writes ``OUT/cells/<cell>.json`` when it finishes; a rerun with the same ``--out`` skips finished cells,
resumes an unfinished start (the long curriculum) or arm training (its ``seconds`` then count the last
attempt only; the cell says ``resumed``) from its ``last.ckpt``, and restarts other unfinished cells (a
few minutes each) from scratch.

What a cell computes and nobody reads is not computed: an RL cell skips the phase-end evaluations (its
validation curve chooses its checkpoint; its test cell tests it) and the phase checkpoint, and the
start's validation, which every arm reports at step 0, is evaluated once per seed and start
(``val_start_<latent|cot>_s<seed>``) instead of once per arm, with the same code and the same number.

Protocol (docs/design.md#protocol): each GRPO run keeps its best checkpoint by validation greedy pass@1;
test numbers (greedy pass@1 with the perturbation off, pass@k and maj@k over k rollouts under one
evaluation sampler shared by all arms, or under each arm's own training noise with ``Budget.own_noise``)
are reported with the evaluation size, 95% intervals over seeds, and paired differences on the same test
problems. Issue 22's ``converged_<task>`` budgets add the converged check of every start
(``converged_s<seed>``).
"""
from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from ..answers import answers_equal
from ..metrics import majority_vote, pass_at_k
from ..model.arms import get_arm, study_arms
from .cell_worker import CellWorker
from .processes import REPO_ROOT, RUN_SCRIPT, run_process, shell_line
from .reporting import attempt_scalars, write_csv
from .scheduling import run_by_priority
from .study_report import converged_cell
from .tasks import FLOOR_LR, TASKS, schedule_args, task_args

log = logging.getLogger("lightning_latent.experiments.study")

ARMS = study_arms()  # the arm registry (model/arms.py), in its order
CONFIGS = REPO_ROOT / "experiments" / "configs" / "synthetic"
#: What an arm's training cell spent, summed over its steps (callbacks.ComputeMeter, per rank).
COMPUTE = ("perf/rollouts", "perf/forward_positions", "perf/optimizer_steps")

@dataclass
class Budget:
    """What one cell costs. ``common`` args go to every run (e.g. a smaller model for tests)."""

    grpo_steps: int = 200
    val_interval: int = 50
    val_limit: int = 500
    test_limit: int = 2000
    k: int = 8
    eval_p: float = 0.1  # the shared evaluation sampler: dropout_shared at this p, answers at T=1
    diversity_prompts: int = 128
    diversity_grid: str = "full"  # "small": three settings only (tests)
    coconut_args: list[str] = field(default_factory=list)
    common: list[str] = field(default_factory=list)
    # The start of every arm: the curriculum config (under experiments/configs/synthetic/) and whether the
    # study's validation size is passed to it (a plateau-trained start judges its stages on its own
    # validation set: it keeps that config's size, so the start is the same run as by hand).
    start_config: str = "coconut.yaml"
    start_val_limit: bool = True
    # Validation pass@1 reported at these GRPO step counts (learning speed; multiples of val_interval)
    curve_steps: tuple[int, ...] = ()
    # The converged check of every start (issue 22): sft_continue from it for grpo_steps at this learning rate
    # (the start's decayed floor) may gain at most ``converged_gain`` on the validation problems. None: no check.
    converged_lr: float | None = None
    converged_gain: float = 0.01
    # A start that fails its check trains longer (issue 22): ``extension_steps`` more steps of its fully latent
    # stage ``final_stage`` at ``converged_lr``, then the check again, at most ``max_extensions`` times.
    max_extensions: int = 0
    extension_steps: int = 1000
    final_stage: int | None = None
    # A start trained under feature masks (p_train > 0) is evaluated masks off, and converging under its masks
    # does not converge the masks-off model (docs/results/paper_setting/: +2.8 / +6.7 / +20.4 points from 300
    # masks-off steps at p_train 0.05 / 0.1 / 0.2). With this set, the converged check also runs masks off, and
    # a start that passes the masked check but fails this one is repaired: an extension with the masks off.
    # Extensions and repairs share ``max_extensions``.
    masks_off_check: bool = False
    # pass@k / maj@k of an arm's test cell sampled under the arm's own training noise (its masks and answer
    # temperature: issue 22) instead of one shared sampler (eval_p); the start's test cell keeps the latter.
    own_noise: bool = False
    # The lr of sft_continue, the control "training longer": the lr the start ended at. 1e-4 is the constant lr of
    # the coconut.yaml starts; a converged start decays to converged_lr and continues there (converged_budget).
    sft_lr: float = 1.0e-4
    # Per-arm arguments of its train and test cells (e.g. a dropout arm's rollout p from its grid).
    arm_args: dict[str, list[str]] = field(default_factory=dict)
    # What with_settings added (recorded in the report): {"grpo": {KEY: VALUE}, "arms": {ARM: {KEY: VALUE}}}
    settings: dict = field(default_factory=dict)

    def with_settings(self, settings: dict) -> Budget:
        """A copy whose arms run at ``settings``, chosen on validation before the study (issue 22: the shared
        GRPO recipe and each noise arm's grid point): ``{"grpo": {KEY: VALUE}, "arms": {ARM: {KEY: VALUE}}}``
        with ``experiments/run.py`` keys (``model.optim.grpo_lr``, ``model.perturb.p``, ...). ``grpo`` goes to
        every GRPO arm, an arm's own entry to that arm; both come after the budget's own ``arm_args``, so they
        override them (the later argument wins), and go to the arm's train and test cells."""
        unknown = set(settings) - {"grpo", "arms"}
        if unknown:
            raise ValueError(f"settings: unknown keys {sorted(unknown)}; expected 'grpo' and/or 'arms'")
        arms = settings.get("arms", {})
        bad = sorted(set(arms) - set(ARMS))
        if bad:
            raise ValueError(f"settings: unknown arms {bad}; choose from {ARMS}")
        for scope in (settings.get("grpo", {}), *arms.values()):
            if not isinstance(scope, dict) or any(not isinstance(k, str) or not k.startswith(("model.", "data."))
                                                  for k in scope):
                raise ValueError(f"settings: {scope!r} must map run.py keys (model.* / data.*) to values")

        def flat(d: dict) -> list[str]:
            return [a for k, v in d.items() for a in (f"--{k}", v if isinstance(v, str) else json.dumps(v))]

        out = {a: list(self.arm_args.get(a, [])) for a in ARMS}
        for a in ARMS:
            if get_arm(a).phase == "grpo":
                out[a] += flat(settings.get("grpo", {}))
            out[a] += flat(arms.get(a, {}))
        return replace(self, arm_args={a: v for a, v in out.items() if v}, settings=settings)


#: The share of a converged start's training sequences with the masks off (issue 22, changed 2026-12-06 before
#: any study cell): under tied feature masks alone the masks-off model, the one evaluation scores, was 3-20
#: points from converged and masked training pulled it back (docs/results/paper_setting/). An even split,
#: not tuned.
UNMASKED_SHARE = 0.5


def converged_budget(task: str, p_train: float = 0.1, rollout_p: float = 0.1) -> Budget:
    """Issue 22's study on task ``task`` (experiments/tasks.py). The start is converged.yaml's, trained under
    feature masks at ``p_train`` on half its sequences, the other half masks off (:data:`UNMASKED_SHARE`)
    (plateau rule on 2,000 validation problems, lr decayed to the floor; scripts/difficulty.py ran seed 0's at
    p_train 0.1, all sequences masked, as the task's probe); every start gets the converged
    check at the floor's lr (``sft_continue`` keeps training under the start's masks; the ``sft_continue`` arm
    trains at that lr too: the lr the start ended at), and with ``p_train`` > 0
    the same check masks off, repaired while it fails (:attr:`Budget.masks_off_check`); the dropout arms roll
    out at ``rollout_p`` (until their grid picks); 300 GRPO steps with validation on 2,000 problems every 25
    (the last study's 100 steps ended 13 of 25 cells on their last checkpoint); 5,000 test problems;
    pass@8 under each arm's own noise."""
    # half the training sequences masks off (UNMASKED_SHARE), so the model evaluation scores trains too
    share = ["--model.perturb.unmasked_share", str(UNMASKED_SHARE)] if p_train > 0 else []
    common = [*task_args(task), *share, "--model.perturb.p_train", str(p_train)]
    dropout_arms = [a for a in ARMS if get_arm(a).dropout]
    return Budget(grpo_steps=300, val_interval=25, val_limit=2000, test_limit=5000, start_config="converged.yaml",
                  start_val_limit=False, curve_steps=(25, 50, 100, 200, 300),
                  coconut_args=schedule_args(task), common=common,
                  converged_lr=FLOOR_LR, sft_lr=FLOOR_LR, own_noise=True, max_extensions=3, extension_steps=1000,
                  final_stage=TASKS[task].stages, masks_off_check=p_train > 0,
                  arm_args={a: ["--model.perturb.p", str(rollout_p)] for a in dropout_arms})


BUDGETS = {
    "default": Budget(),
    # What fits one 2-core sitting of ~2 h for 5 seeds: half the GRPO steps, a smaller validation set; the
    # test set stays at 2,000 problems (the statistical-power requirement).
    "reduced": Budget(grpo_steps=100, val_interval=50, val_limit=300),
    # Issue 13: from the plateau-trained start (experiments/configs/synthetic/plateau.yaml, 36 min on 2
    # cores per seed), the shipped recipe (dropout_grpo.yaml), validation on 2,000 problems every 10 steps
    # (the learning-speed table), 5,000 test problems.
    "plateau": Budget(grpo_steps=100, val_interval=10, val_limit=2000, test_limit=5000, start_config="plateau.yaml",
                      start_val_limit=False, curve_steps=(10, 20, 50, 100)),
    # Issue 22: converged_<task> (p_train 0.1) and converged_<task>_pt<p> (the p_train choice and the
    # p_train = 0 comparison: the dropout arms roll out at p_train, or at 0.1 from a p_train = 0 start).
    **{f"converged_{t}": converged_budget(t) for t in TASKS if t != "p3_20"},
    **{f"converged_{t}_pt{p:g}": converged_budget(t, p, p or 0.1) for t in TASKS if t != "p3_20"
       for p in (0.0, 0.05, 0.2)},
    "tiny": Budget(grpo_steps=2, val_interval=1, val_limit=8, test_limit=8, k=2, diversity_prompts=4, diversity_grid="small",
                   curve_steps=(1, 2),
                   # the start's own phase-end test (1,000 problems) is not used: its test cell scores it
                   coconut_args=["--model.schedule",
                                 '[{"kind":"cot","steps":2},{"kind":"coconut","steps":1,"stages":[1,2,3]}]',
                                 "--data.test_limit", "8"],
                   common=["--model.backbone.n_layer", "1", "--model.backbone.n_embd", "32", "--model.backbone.n_head", "2",
                           "--model.grpo_prompts", "2", "--model.grpo.group_size", "2", "--model.batch_size", "8",
                           "--model.grpo.max_new_tokens", "6", "--model.evaluation.max_new_tokens", "8",
                           "--data.eval_batch_size", "8"]),
}


# The training masks off for one run: after the budget's own p_train (the later argument wins). Used by the
# masks-off converged check and the repair (Budget.masks_off_check).
MASKS_OFF = ["--model.perturb.p_train", "0.0"]


class Study:
    def __init__(self, out: str | Path, seeds: int = 5, arms: tuple[str, ...] = ARMS, budget: str | Budget = "default",
                 diversity: bool = True, work: str | Path | None = None, jobs: int = 1, in_process: bool = True):
        for a in arms:
            if a not in ARMS:
                raise ValueError(f"unknown arm {a!r}; choose from {ARMS}")
        if seeds < 1:
            raise ValueError(f"--seeds {seeds} must be >= 1")
        if jobs < 1:
            raise ValueError(f"--jobs {jobs} must be >= 1")
        self.out = Path(out).resolve()  # tables and plots
        # cells run with cwd=work: every path handed to them must be absolute
        self.work = Path(work).resolve() if work is not None else self.out
        self.seeds, self.arms, self.diversity, self.jobs = seeds, tuple(arms), diversity, jobs
        self.in_process = in_process
        self._workers: queue.Queue = queue.Queue()  # idle cell workers (at most ``jobs``, made when first needed)
        self._n_workers = 0
        self._lock = threading.Lock()
        self._cell_locks: dict[str, threading.Lock] = {}  # cells several chains ask for (a seed's start_val)
        self.budget = BUDGETS[budget] if isinstance(budget, str) else budget
        self.tb = self.work / "tb"  # TensorBoard events and checkpoints
        self.cells = self.work / "cells"
        self.cells.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()

    # -- running cells ------------------------------------------------------------------------------
    def _done(self, cell: str) -> dict | None:
        f = self.cells / f"{cell}.json"
        return json.loads(f.read_text()) if f.exists() else None

    def _finish(self, cell: str, result: dict) -> dict:
        (self.cells / f"{cell}.json").write_text(json.dumps(result, indent=2))
        return result

    def _run(self, args: list[str], name: str, version: str, cell: str, resumable: bool = False) -> Path:
        """Run one cell's ``run.py`` process into ``tb/<name>/<version>``. An unfinished earlier attempt is
        deleted and started again, unless ``resumable`` and it left a ``last.ckpt``: then the run continues
        from that checkpoint in the same directory (resume is exact: tests/integration/test_reliability.py), so a start
        killed after 40 minutes loses at most the steps since its last checkpoint."""
        vdir = self.tb / name / version
        last = vdir / "checkpoints" / "last.ckpt"
        logf = self.cells / f"{cell}.log"
        if resumable and last.exists():
            log.info("cell %s: resuming the unfinished attempt from %s", cell, last)
            (vdir / "config.yaml").unlink(missing_ok=True)  # the config saver never overwrites; this run's replaces it
            try:
                return self._run_process(cell, [*args, "--ckpt_path", str(last)], name, version, logf)
            except RuntimeError as err:  # e.g. a checkpoint from other code: lose the attempt, not the study
                log.warning("%s; starting the cell again from scratch", err)
        if vdir.exists():  # an unfinished earlier attempt: start the cell again from scratch
            shutil.rmtree(vdir)
        logf.unlink(missing_ok=True)  # one attempt per log
        return self._run_process(cell, args, name, version, logf)

    def _run_process(self, cell: str, args: list[str], name: str, version: str, logf: Path) -> Path:
        argv = [*args, "--trainer.logger.init_args.save_dir", str(self.tb), "--trainer.logger.init_args.name", name,
                "--trainer.logger.init_args.version", version, "--trainer.enable_progress_bar", "false"]
        cmd = [sys.executable, str(RUN_SCRIPT), *argv]
        log.info("cell %s: %s", cell, shell_line(cmd))
        if self.in_process:  # the log starts with the command line, as run_process writes it
            logf.parent.mkdir(parents=True, exist_ok=True)
            with open(logf, "a") as f:
                f.write(f"$ {shell_line(cmd)}\n")
            rc = self._in_worker(argv, logf)
        else:
            rc = run_process(cmd, self._env(), logf, cwd=self.work)
        if rc != 0:
            raise RuntimeError(f"cell {cell} failed (exit {rc}); see {logf}")
        return self.tb / name / version

    def _env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        if self.jobs > 1:  # cells in parallel share the cores: each gets its part of them
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.jobs))
        return env

    def _in_worker(self, argv: list[str], logf: Path) -> int:
        """Run one cell in an idle worker (a new one while fewer than ``jobs`` exist); a worker whose cell
        failed is replaced, so no cell starts from a failed one's leftovers."""
        with self._lock:
            if self._workers.empty() and self._n_workers < self.jobs:
                self._n_workers += 1
                self._workers.put(CellWorker(self._env(), self.work))
        worker = self._workers.get()
        rc = 1
        try:
            rc = worker.run(argv, logf)
        finally:
            if rc != 0:
                worker.close()
                worker = CellWorker(self._env(), self.work)
            self._workers.put(worker)
        return rc

    def close(self) -> None:
        """Stop the cell workers (a later cell starts new ones)."""
        with self._lock:
            while not self._workers.empty():
                self._workers.get().close()
            self._n_workers = 0

    def _seed_args(self, seed: int) -> list[str]:
        return ["--seed_everything", str(seed), "--data.seed", str(seed), *self.budget.common]

    def coconut(self, seed: int) -> str:
        cell = f"coconut_s{seed}"
        done = self._done(cell)
        if done and Path(done["ckpt"]).exists():
            return done["ckpt"]  # (a missing checkpoint, e.g. on another machine, is rebuilt: same seed, same run)
        b = self.budget
        val = ["--data.val_limit", str(b.val_limit)] if b.start_val_limit else []
        vdir = self._run(["fit", "--config", str(CONFIGS / b.start_config), *self._seed_args(seed), *b.coconut_args,
                          *val], "coconut", f"seed{seed}", cell, resumable=True)
        ckpt = vdir / "checkpoints" / "last.ckpt"
        return self._finish(cell, {"ckpt": str(ckpt), "seconds": None})["ckpt"]

    def start(self, seed: int) -> str:
        """The arms' start of a seed: the curriculum's checkpoint (:meth:`coconut`); with a converged check, that
        checkpoint trained longer at the floor lr (:meth:`extend`) while its check fails, at most
        ``max_extensions`` times. Written to cell ``start_s<seed>`` with its checks."""
        b = self.budget
        done = self._done(f"start_s{seed}")
        # a start written before the masks-off check (no record of it) is checked again; its cells are reused
        stale = done and b.masks_off_check and not done.get("masks_off_check")
        if done and not stale and Path(done["ckpt"]).exists():
            return done["ckpt"]
        ckpt = self.coconut(seed)
        if b.converged_lr is None:
            return ckpt
        repairs = 0
        for k in range(b.max_extensions + 1):
            masked = self.converged(seed, ckpt, k)
            off = self.converged(seed, ckpt, k, masks_off=True) if b.masks_off_check and masked["converged"] else None
            converged = masked["converged"] and (off is None or off["converged"])
            if converged or k == b.max_extensions:
                break
            # first converge under the masks (the start's own training), then close the masks-off gap
            repair = off is not None
            repairs += repair
            ckpt = self.extend(seed, ckpt, k + 1, masks_off=repair)
        return self._finish(f"start_s{seed}", {"ckpt": ckpt, "extensions": k, "converged": converged,
                                               **({"repairs": repairs, "masks_off_check": True}
                                                  if b.masks_off_check else {})})["ckpt"]

    def extend(self, seed: int, start: str, k: int, masks_off: bool = False) -> str:
        """Extension ``k`` of a start that failed its check: ``extension_steps`` steps of its fully latent stage
        at the floor lr (the start's config and masks, weights from ``start``, a fresh optimiser). With
        ``masks_off`` a repair: the same with the training masks off (``p_train`` 0), for a start converged
        under its masks whose masks-off model still gains (:attr:`Budget.masks_off_check`)."""
        cell = f"extend_s{seed}_x{k}"
        done = self._done(cell)
        if done and Path(done["ckpt"]).exists():
            if done.get("from", start) != start or bool(done.get("masks_off")) != masks_off:
                raise RuntimeError(f"cell {cell} extended {done.get('from', start)} (masks_off "
                                   f"{bool(done.get('masks_off'))}), "
                                   f"not {start} (masks_off {masks_off}); move it aside to extend again")
            return done["ckpt"]
        b = self.budget
        if b.final_stage is None:
            raise ValueError("extending a start needs Budget.final_stage (its fully latent stage)")
        t = time.perf_counter()
        vdir = self._run(["fit", "--config", str(CONFIGS / b.start_config), *self._seed_args(seed), *b.coconut_args,
                          "--model.init_from", start, *self._extension_schedule(), *(MASKS_OFF if masks_off else [])],
                         "repair" if masks_off else "extend", f"seed{seed}_x{k}", cell, resumable=True)
        return self._finish(cell, {"ckpt": str(vdir / "checkpoints" / "last.ckpt"), "from": start,
                                   "steps": b.extension_steps, "lr": b.converged_lr,
                                   **({"masks_off": True} if masks_off else {}),
                                   "seconds": round(time.perf_counter() - t, 1)})["ckpt"]

    def _extension_schedule(self) -> list[str]:
        """The one-phase schedule of an extension: its fully latent stage at the floor lr. Its checkpoint is
        tested under it too: the curriculum's schedule would put its step 1,000 in the CoT phase."""
        b = self.budget
        phase = {"kind": "coconut", "steps": b.extension_steps, "stages": [b.final_stage], "lr": b.converged_lr,
                 "name": "coconut_floor"}
        return ["--model.schedule", json.dumps([phase])]

    def _is_extension(self, seed: int, ckpt: str) -> bool:
        """Whether ``ckpt`` is seed ``seed``'s start after an extension, as its start cell (:meth:`start`) records
        it. No start cell, no check and no extension; a wrong answer fails loudly (the test refuses a checkpoint
        at another stage than its schedule's)."""
        start = self._done(f"start_s{seed}")
        return bool(start and start["ckpt"] == ckpt and start.get("extensions", 0) > 0)

    def _arm_args(self, seed: int, arm: str, start: str, steps: int, sft_lr: float | None = None) -> list[str]:
        """``fit`` of ``arm`` from ``start`` for ``steps`` steps, with the budget's validation. A supervised arm
        trains at ``sft_lr``, by default the budget's (one place for the number, not a second default here)."""
        b = self.budget
        args = ["fit", "--config", str(CONFIGS / "dropout_grpo.yaml"), "--config", str(CONFIGS / "arms" / f"{arm}.yaml"),
                *self._seed_args(seed), "--model.init_from", start, "--data.val_limit", str(b.val_limit)]
        spec = get_arm(arm)
        lr = b.sft_lr if sft_lr is None else sft_lr
        extra = {"batch_size": 32, "lr": lr} if spec.phase == "sft" else {}  # 32: the prompts per GRPO step
        if spec.start == "cot":  # the CoT model, at stage 0 with the CoT prompt layout
            extra["stages"] = [0]
        return args + [*b.arm_args.get(arm, []),
                       "--model.schedule", json.dumps([{"kind": spec.phase, "steps": steps, "name": arm, **extra}])]

    def start_val(self, seed: int, arm: str, start: str) -> float:
        """Validation greedy pass@1 of ``arm``'s start, what every arm reports at step 0. Evaluated once per
        seed and kind of start (``latent``; ``cot`` for cot_grpo), by the code that evaluated it inside each
        RL cell before (the phase summary's start evaluation, in a fit of 0 steps): the same number."""
        kind = get_arm(arm).start
        cell = f"val_start_{kind}_s{seed}"
        with self._lock:
            cell_lock = self._cell_locks.setdefault(cell, threading.Lock())
        with cell_lock:  # the arms of a seed run in parallel with --jobs: the first computes it, the rest read it
            return self._start_val(seed, arm, start, kind, cell)

    def _start_val(self, seed: int, arm: str, start: str, kind: str, cell: str) -> float:
        done = self._done(cell)
        if done:
            return done["val_pass@1"]
        t = time.perf_counter()
        args = [*self._arm_args(seed, arm, start, 0), "--summary.splits", '["validation"]',
                "--summary.phase_checkpoints", "false", "--checkpoint.save_last", "false",
                "--checkpoint.every_n_train_steps", "null"]
        vdir = self._run(args, f"val_start_{kind}", f"seed{seed}", cell)
        row = next(r for r in json.loads((vdir / "summary.json").read_text())["phases"] if r["phase"] == "start")
        return self._finish(cell, {"val_pass@1": row["val_pass@1"], "val_n": row["val_n"], "start": start,
                                   "seconds": round(time.perf_counter() - t, 1)})["val_pass@1"]

    def converged(self, seed: int, start: str, k: int = 0, masks_off: bool = False) -> dict:
        """The converged check of a start (issue 22): ``sft_continue`` from it for the RL budget's steps at the
        budget's ``converged_lr`` (the start's decayed floor), its final weights (no best-of selection) against
        the start on the same validation problems, paired. Converged: a mean gain of at most ``converged_gain``.
        ``masks_off``: the continuation trains with the training masks off (evaluation is masks off either way)."""
        b = self.budget
        cell = converged_cell(seed, k, masks_off)  # k: the check after extension k (Study.start)
        done = self._done(cell)
        if done:
            if done.get("start", start) != start:  # (cells before 96796e1 did not record it)
                raise RuntimeError(f"cell {cell} checked {done['start']}, not {start}; move it aside to check again")
            return done
        t = time.perf_counter()
        args = [*self._arm_args(seed, "sft_continue", start, b.grpo_steps, sft_lr=b.converged_lr),
                "--summary.splits", '["validation"]', "--summary.pair_validation", "true",
                "--summary.phase_checkpoints", "false", "--checkpoint.save_last", "false",
                "--checkpoint.every_n_train_steps", "null", "--trainer.limit_val_batches", "0",
                *(MASKS_OFF if masks_off else [])]
        vdir = self._run(args, "converged_off" if masks_off else "converged", f"seed{seed}" + (f"_x{k}" if k else ""),
                         cell)
        rows = {r["phase"]: r for r in json.loads((vdir / "summary.json").read_text())["phases"]}
        end = rows["sft_continue"]
        gain, half = end["val_paired_diff"], end["val_paired_ci95"]
        return self._finish(cell, {"start_val": rows["start"]["val_pass@1"], "end_val": end["val_pass@1"],
                                   "val_n": end["val_paired_n"], "gain": gain, "gain_ci95": half,
                                   "lr": b.converged_lr, "steps": b.grpo_steps, "converged": gain <= b.converged_gain,
                                   "start": start, "extension": k, **({"masks_off": True} if masks_off else {}),
                                   "seconds": round(time.perf_counter() - t, 1)})

    def train_arm(self, seed: int, arm: str, start: str) -> dict:
        cell = f"train_{arm}_s{seed}"
        done = self._done(cell)
        if done:
            return done
        b = self.budget
        start_val = self.start_val(seed, arm, start)
        t = time.perf_counter()
        args = [*self._arm_args(seed, arm, start, b.grpo_steps),
                "--trainer.val_check_interval", str(b.val_interval),
                "--trainer.log_every_n_steps", "1",  # the training-reward curve at every step ("learns")
                "--checkpoint.monitor", "val/pass@1", "--checkpoint.mode", "max", "--checkpoint.save_top_k", "1",
                "--checkpoint.every_n_train_steps", "null", "--checkpoint.filename", "best",
                # what nobody reads: the phase-end evaluations (the start's is start_val's) and phase checkpoint
                "--summary.splits", "[]", "--summary.evaluate_start", "false", "--summary.phase_checkpoints", "false"]
        # resumable: an RL cell (about 20 minutes) killed at a session's end continues from its last validation's
        # checkpoint, with its best-so-far (ModelCheckpoint's state) and exactly the uninterrupted numbers
        vdir = self._run(args, arm, f"seed{seed}", cell, resumable=True)
        runs = [ln for ln in (self.cells / f"{cell}.log").read_text().splitlines() if ln.startswith("$ ")]
        resumed = bool(runs) and "--ckpt_path" in runs[-1]  # (a resume that failed started again from scratch)
        best = vdir / "checkpoints" / "best.ckpt"
        curves = read_curves(vdir, ("grpo/frac_zero_std", "grpo/reward_mean", "grpo/frac_all_correct",
                                    "grpo/frac_all_wrong", "grpo/frac_mixed", "val/pass@1", *COMPUTE))
        fz = curves.get("grpo/frac_zero_std", [])
        seconds = round(time.perf_counter() - t, 1)
        compute = {k.split("/")[1]: sum(v for _, v in curves.pop(k, [])) for k in COMPUTE}  # (the sums only)
        return self._finish(cell, {"ckpt": str(best if best.exists() else vdir / "checkpoints" / "last.ckpt"),
                                   "frac_zero_std": sum(v for _, v in fz) / len(fz) if fz else float("nan"),
                                   "start_val": start_val, "curves": curves, "compute": compute,
                                   "seconds": seconds, **({"resumed": True} if resumed else {})})

    def evaluate(self, seed: int, tag: str, ckpt: str, arm_cfg: str | None) -> dict:
        cell = f"test_{tag}_s{seed}"
        done = self._done(cell)
        if arm_cfg is None:
            self._check_seed_start(seed, ckpt)
        extension = arm_cfg is None and self._is_extension(seed, ckpt)
        stale = extension and done and not done.get("extension")  # tested before b45b239: in the CoT layout
        if done and not stale:
            return done
        b = self.budget
        cfgs = ["--config", str(CONFIGS / b.start_config)] if arm_cfg is None else \
            ["--config", str(CONFIGS / "dropout_grpo.yaml"), "--config", str(CONFIGS / "arms" / f"{arm_cfg}.yaml")]
        args = ["test", *cfgs, *self._seed_args(seed), "--ckpt_path", ckpt, "--data.test_limit", str(b.test_limit),
                "--model.evaluation.k", str(b.k)]
        if arm_cfg is not None:
            args += b.arm_args.get(arm_cfg, [])
        if b.own_noise and arm_cfg is not None:  # the arm's masks (evaluation.perturb null) and its temperature
            args += ["--model.evaluation.temperature", "null", "--model.evaluation.perturb", "null"]
        else:
            args += ["--model.evaluation.temperature", "1.0",
                     "--model.evaluation.perturb", json.dumps({"arm": "dropout_shared", "p": b.eval_p})]
        if arm_cfg is None:  # the start, under the schedule it was trained with (an extension's own, last)
            args += [*b.coconut_args, *(self._extension_schedule() if extension else [])]
        t = time.perf_counter()
        vdir = self._run(args, f"test_{tag}", f"seed{seed}", cell)
        rows = [json.loads(line) for line in (vdir / "predictions_test.jsonl").read_text().splitlines()]
        return self._finish(cell, {**score(rows, b.k), "seconds": round(time.perf_counter() - t, 1),
                                   **({"extension": True} if extension else {})})

    # -- the study -----------------------------------------------------------------------------------
    def run(self) -> None:
        """Every cell not finished yet, ``jobs`` at a time, seed by seed (:mod:`.scheduling`): a seed's start
        (the curriculum, checked and extended), then, queued ahead of later seeds' starts, its start's test
        and each arm's training + test chain. A study stopped early has whole seeds, not every start half built."""
        try:
            first = self.start(0)
            if self.diversity and not (self.out / "diversity.csv").exists():
                self.run_diversity(first)
            run_by_priority([((s, 0), partial(self._seed_cells, s)) for s in range(self.seeds)], self.jobs)
        finally:
            self.close()
        self.report()

    def _seed_cells(self, seed: int) -> list:
        """Seed ``seed``'s start (checked, extended), then its cells, as jobs for :func:`run_by_priority`."""
        start = self.start(seed)

        def cell(fn, *args) -> None:  # a leaf job: no follow-ups
            fn(*args)

        return [((seed, 1), partial(cell, self.evaluate, seed, "coconut", start, None)),
                *(((seed, 1), partial(cell, self._arm_chain, seed, arm, start)) for arm in self.arms)]

    def _check_seed_start(self, seed: int, start: str) -> None:
        """Refuse a seed's finished cells computed from another start (a start checked again, e.g. repaired
        after :attr:`Budget.masks_off_check` came in): its ``val_start_latent`` cell names the start its arms
        ran from. Trusting them would mix two starts in one seed's row, silently."""
        done = self._done(f"val_start_latent_s{seed}")
        if done and done.get("start", start) != start:
            raise RuntimeError(f"seed {seed}'s cells in {self.cells} ran from {done['start']}, but its start is now "
                               f"{start}: move its val_start/train/test cells (and their tb runs) aside to run them "
                               f"again")

    def _arm_chain(self, seed: int, arm: str, start: str) -> dict:
        self._check_seed_start(seed, start)
        if self._done(f"test_{arm}_s{seed}"):
            return self._done(f"test_{arm}_s{seed}")
        # the CoT model sits beside the curriculum's checkpoint (an extended start is elsewhere)
        arm_start = str(Path(self.coconut(seed)).with_name("phase-cot.ckpt")) if get_arm(arm).start == "cot" else start
        tr = self.train_arm(seed, arm, arm_start)
        if not Path(tr["ckpt"]).exists():  # trained on another machine: train again (deterministic), from step 0
            (self.cells / f"train_{arm}_s{seed}.json").unlink()
            shutil.rmtree(self.tb / arm / f"seed{seed}", ignore_errors=True)  # no resume from a leftover last.ckpt
            tr = self.train_arm(seed, arm, arm_start)
        return self.evaluate(seed, arm, tr["ckpt"], arm)

    def run_diversity(self, ckpt: str) -> None:
        from ..data.synthetic import synthetic_record
        from .diversity import DiversitySetting, default_settings, measure
        from ..checkpoints import load_module

        module = load_module(ckpt)
        cfg = module.hparams["synthetic"]
        recs = [synthetic_record(cfg, "validation", i) for i in range(self.budget.diversity_prompts)]
        settings = default_settings() if self.budget.diversity_grid == "full" else [
            DiversitySetting("dropout_shared", 0.0), DiversitySetting("dropout_shared", 0.3),
            DiversitySetting("gaussian", 0.3)]
        rows = measure(module, recs, settings, k=8)
        write_csv(self.out / "diversity.csv", rows)
        from .study_report import plot_diversity

        plot_diversity(rows, self.out / "diversity.png")

    def report(self) -> None:
        """Tables and plots from the finished cells (:class:`~.study_report.StudyReport`)."""
        self.reporter().write()

    def reporter(self):
        """The :class:`~.study_report.StudyReport` of this study's output folder and cells."""
        from .study_report import StudyReport

        return StudyReport(self.out, self.tb, self.cells, self.seeds, self.arms, self.budget, self.t0)


def score(rows: list[dict], k: int) -> dict:
    """pass@1 (greedy), pass@k and maj@k (over the k sampled rollouts) from a predictions file."""
    correct = [1.0 if r["correct"] else 0.0 for r in rows]
    out = {"pass@1": sum(correct) / len(rows), "n_eval": len(rows), "correct": correct}
    if rows and "samples" in rows[0]:
        right = [sum(answers_equal(a, r["gold"]) for a in r["samples"]) for r in rows]  # correct samples per problem
        pk = [pass_at_k(len(r["samples"]), c, k) for r, c in zip(rows, right)]
        mk = [answers_equal(majority_vote(r["samples"][:k]), r["gold"]) for r in rows]
        out[f"pass@{k}"] = sum(pk) / len(rows)
        out[f"maj@{k}"] = sum(mk) / len(rows)
        # sampled pass@1: the expected accuracy of one perturbed, sampled answer (pass@k at k=1)
        out["sampled_pass@1"] = sum(pass_at_k(len(r["samples"]), c, 1) for r, c in zip(rows, right)) / len(rows)
    else:
        out[f"pass@{k}"] = out[f"maj@{k}"] = out["sampled_pass@1"] = float("nan")
    return out


def read_curves(logdir: Path, tags: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of the ``tags`` a run logged, as JSON-ready lists (kept in the cell
    file, which outlives the event files of a cleaned-up run); a resumed run's curves as if uninterrupted
    (:func:`~.reporting.attempt_scalars`)."""
    return {t: [(int(st), float(v)) for st, v in zip(df["step"], df["value"])]
            for t, df in attempt_scalars(logdir, tags).items()}
