"""The sweep driver: ``python sweeps/sweep.py --config sweeps/<space>.yaml --n-trials N --storage URL
--study-name NAME --out DIR [--devices D]``.

One worker = one driver process. Workers on one or several machines that name the same study and
storage share it (``load_if_exists``): each ``ask()`` is a distinct trial, so no two workers run the
same trial. ``--n-trials`` is the study's total: a worker asks for a new trial only while the study
holds fewer than N trials that are finished (COMPLETE / PRUNED / FAIL, a failed trial that was
enqueued again not counted twice) or running; a restarted driver therefore carries on where it stopped.

Failure handling: a trial whose process exits non-zero is FAIL with ``error`` and ``log_path`` user
attributes. Each worker records a heartbeat for its running trial; a worker that dies leaves a trial
whose heartbeat goes stale, and the next stale-trial check (every worker runs
``optuna.storages.fail_stale_trials`` before each ask) fails it and enqueues its parameters again
(``RetryHeartbeatStaleTrialCallback``). Ctrl-C / SIGTERM stops the trial's processes, marks the trial
FAIL (``error: interrupted``), enqueues its parameters again and writes the results.

Several nodes per trial: the driver on node 0 runs ``torchrun --node_rank 0``; every other node runs
the driver with ``--follow --node-rank R`` (same config, storage and study), which joins each running
multi-node trial with ``torchrun --node_rank R``.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from ...helptext import description_first
from .pruning import COLLAPSED_KEY, PRUNED_KEY
from ..processes import error_from_log, run_process, shell_line
from .results import SURPLUS_KEY, write_results
from .runner import Launch, command, fit_args, trial_env, trial_version
from .space import SweepConfig, load_sweep_config

log = logging.getLogger("lightning_latent.experiments.sweep")
# Heartbeats, stale-trial retries and ask()/tell() with heartbeats are what the driver is built on.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)

try:  # optuna >= 4.9
    from optuna.storages import RetryHeartbeatStaleTrialCallback as _Retry
except ImportError:  # pragma: no cover - older optuna
    from optuna.storages import RetryFailedTrialCallback as _Retry


# -- storage and study ---------------------------------------------------------------------------------
def default_storage(out: str | Path) -> str:
    return f"sqlite:///{Path(out).resolve() / 'study.db'}"


def make_storage(url: str, heartbeat_interval: int | None = 10, grace_period: int | None = None,
                 max_retry: int | None = 1) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats; stale trials are failed and (up to ``max_retry`` times)
    enqueued again."""
    kw: dict[str, Any] = {}
    if heartbeat_interval:
        kw["heartbeat_interval"] = int(heartbeat_interval)
        kw["grace_period"] = int(grace_period or 3 * heartbeat_interval)
        cb = _Retry(max_retry=max_retry) if max_retry != 0 else None
        import inspect

        name = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback"
                in inspect.signature(optuna.storages.RDBStorage).parameters else "failed_trial_callback")
        kw[name] = cb
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kw)


def open_study(cfg: SweepConfig, storage: optuna.storages.RDBStorage, study_name: str) -> optuna.Study:
    return optuna.create_study(study_name=study_name, storage=storage, direction=cfg.direction,
                               sampler=cfg.make_sampler(), pruner=cfg.make_pruner(), load_if_exists=True)


def fail_stale(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _retried_numbers(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    out: set[int] = set()
    for t in trials:
        out.update(t.system_attrs.get("retry_history", []))
    return out


def counted(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Trials that use up the budget: finished or running, except failed ones enqueued again and
    surplus trials (asked concurrently past the total)."""
    retried = _retried_numbers(trials)
    return [t for t in trials if (t.state in FINISHED or t.state == TrialState.RUNNING)
            and not t.system_attrs.get(SURPLUS_KEY) and not (t.state == TrialState.FAIL and t.number in retried)]


def finished_count(study: optuna.Study) -> int:
    trials = study.get_trials(deepcopy=False)
    return sum(t.state in FINISHED for t in counted(trials))



def reduce_curve(values: list[float], reduce: str = "last", direction: str = "maximize") -> float:
    """A trial's objective from its validation curve (one value per validation, in step order).

    ``last``: the value at the end of the fit; ``best``: the best value along the way; ``mean``: the
    mean over the validations, i.e. the area under the learning curve divided by its length (with evenly
    spaced validations), which rewards a recipe that learns fast, not only one that ends high.
    """
    if not values:
        raise ValueError("reduce_curve: no validation values")
    if reduce == "best":
        return max(values) if direction == "maximize" else min(values)
    if reduce == "mean":
        return sum(values) / len(values)
    if reduce == "last":
        return values[-1]
    raise ValueError(f"reduce={reduce!r} must be last, best or mean")

class _Heartbeat:
    """Records the trial's heartbeat every ``interval`` seconds while the trial runs."""

    def __init__(self, storage, trial_id: int, interval: int | None):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        if self.interval:
            self.storage.record_heartbeat(self.trial_id)  # at once: a trial with no beat is never stale
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as err:  # a transient DB error must not kill the worker
                log.warning("heartbeat failed: %s", err)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


# -- one trial ---------------------------------------------------------------------------------------
class Worker:
    def __init__(self, cfg: SweepConfig, storage_url: str, study_name: str, out: str | Path, launch: Launch,
                 heartbeat_interval: int | None = 10, grace_period: int | None = None, max_retry: int | None = 1,
                 trial_timeout: float | None = None):
        self.cfg, self.storage_url, self.study_name = cfg, storage_url, study_name
        self.out = Path(out).resolve()
        self.launch = launch
        self.heartbeat_interval = heartbeat_interval
        self.max_retry = max_retry
        self.trial_timeout = trial_timeout
        for attempt in range(5):  # workers that start together race to create the tables / the study
            try:
                self.storage = make_storage(storage_url, heartbeat_interval, grace_period, max_retry)
                self.study = open_study(cfg, self.storage, study_name)
                break
            except Exception as err:  # sqlalchemy OperationalError / IntegrityError
                if attempt == 4:
                    raise
                log.warning("opening the study failed (%s); retrying", str(err).splitlines()[0])
                time.sleep(1 + attempt)
        self.tb_dir = self.out / "tb"
        self.ran: list[int] = []

    def _log_path(self, number: int, node_rank: int = 0) -> Path:
        suffix = f"_node{node_rank}" if node_rank else ""
        return self.out / "trials" / f"{trial_version(number)}{suffix}.log"

    def _trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number)

    def run(self, n_trials: int) -> list[int]:
        """Ask / run / tell until the study holds ``n_trials`` finished trials; returns the numbers run."""
        while True:
            fail_stale(self.study)
            if len(counted(self.study.get_trials(deepcopy=False))) >= n_trials:
                break
            if self.cfg.grid_exhausted(self.study):  # a grid sweep ends with its grid, whatever --n-trials says
                log.info("every point of the grid has a trial; stopping")
                break
            trial = self.study.ask()
            trials = self.study.get_trials(deepcopy=False)
            before = [t for t in counted(trials) if t.number < trial.number]
            if len(before) >= n_trials:  # another worker asked first, concurrently
                self.storage.set_trial_system_attr(trial._trial_id, SURPLUS_KEY, True)
                self.study.tell(trial, state=TrialState.FAIL)
                break
            self.run_trial(trial)
            self.ran.append(trial.number)
        return self.ran

    def run_trial(self, trial: optuna.trial.Trial) -> TrialState:
        told = False
        with _Heartbeat(self.storage, trial._trial_id, self.heartbeat_interval):
            try:
                # A sampler seeded per trial number: reproducible, and distinct across workers. Not a grid:
                # its grid ids index a seed-dependent order, so the seed that assigned the id must sample it.
                if not self.cfg.is_grid:
                    self.study.sampler = self.cfg.make_sampler(seed_offset=trial.number)
                params = self.cfg.suggest(trial)
                state = self._run_and_tell(trial, params)
                told = True
                return state
            except BaseException as err:
                if not told:
                    self._fail_interrupted(trial, err)
                raise

    def _run_and_tell(self, trial: optuna.trial.Trial, params: dict) -> TrialState:
        number = trial.number
        for key in ("error", "returncode", "seconds", "last_step", "pid"):  # a retry inherits the failed
            if trial.user_attrs.get(key) is not None:                        # trial's user attributes
                trial.set_user_attr(key, None)
        launch = self.launch
        if launch.nnodes > 1:
            launch = Launch(**{**launch.__dict__, "master_port": launch.master_port + number % 1000})
        args = fit_args(self.cfg.base_config, self.cfg.overrides(params), self.tb_dir, self.study_name,
                        trial_version(number), launch)
        cmd = command(args, launch)
        log_path = self._log_path(number)
        log_dir = self.tb_dir / self.study_name / trial_version(number)
        trial.set_user_attr("log_path", str(log_path))
        trial.set_user_attr("log_dir", str(log_dir))
        trial.set_user_attr("command", shell_line(cmd))
        trial.set_user_attr("fit_args", args)
        trial.set_user_attr("nnodes", launch.nnodes)
        trial.set_user_attr("devices", launch.devices)
        trial.set_user_attr("master_port", launch.master_port)
        trial.set_user_attr("worker", f"{os.uname().nodename}:{os.getpid()}")
        env = trial_env(self.storage_url, self.study_name, number, self.cfg.metric, self.cfg.pruner)
        log.info("trial %d: %s", number, params)
        t0 = time.time()
        rc = run_process(cmd, env, log_path, timeout_s=self.trial_timeout,
                         on_start=lambda proc: trial.set_user_attr("pid", proc.pid))
        trial.set_user_attr("returncode", rc)
        trial.set_user_attr("seconds", round(time.time() - t0, 2))
        ft = self.storage.get_trial(trial._trial_id)
        collapsed = ft.system_attrs.get(COLLAPSED_KEY)
        if rc != 0 and collapsed is not None:  # stopped by the collapse guard: a bad trial with its value
            trial.set_user_attr("collapsed", collapsed["message"])
            trial.set_user_attr("last_step", collapsed["step"])
            self.study.tell(trial, collapsed["value"])
            log.warning("trial %d COLLAPSED at step %d (value %.3f); log: %s", number, collapsed["step"],
                        collapsed["value"], log_path)
            return TrialState.COMPLETE
        if rc != 0:
            err = error_from_log(log_path) or f"exit status {rc}"
            trial.set_user_attr("error", err)
            self.study.tell(trial, state=TrialState.FAIL)
            log.warning("trial %d FAIL (exit %d): %s; log: %s", number, rc, err, log_path)
            return TrialState.FAIL
        if ft.system_attrs.get(PRUNED_KEY):
            self.study.tell(trial, state=TrialState.PRUNED)
            log.info("trial %d PRUNED at step %s", number, ft.system_attrs[PRUNED_KEY].get("step"))
            return TrialState.PRUNED
        iv = ft.intermediate_values
        if not iv:
            trial.set_user_attr("error", f"the fit ended without reporting {self.cfg.metric} (does validation "
                                         "run? check trainer.val_check_interval against the GRPO steps)")
            self.study.tell(trial, state=TrialState.FAIL)
            return TrialState.FAIL
        value = reduce_curve([iv[s] for s in sorted(iv)], self.cfg.objective.get("reduce", "last"), self.cfg.direction)
        trial.set_user_attr("last_step", max(iv))
        self.study.tell(trial, value)
        log.info("trial %d COMPLETE: %s=%.4f", number, self.cfg.metric, value)
        return TrialState.COMPLETE

    def _fail_interrupted(self, trial: optuna.trial.Trial, err: BaseException) -> None:
        """Leave the storage consistent: FAIL the trial, then enqueue its parameters again."""
        try:
            reason = "interrupted" if isinstance(err, KeyboardInterrupt) else f"{type(err).__name__}: {err}"
            trial.set_user_attr("error", reason)
            self.study.tell(trial, state=TrialState.FAIL)
            if isinstance(err, KeyboardInterrupt) and self.max_retry != 0:
                _Retry(max_retry=self.max_retry)(self.study, self.storage.get_trial(trial._trial_id))
        except Exception as e2:  # pragma: no cover - best effort on the way out
            log.error("could not mark trial %d as failed: %s", trial.number, e2)

    # -- other nodes -------------------------------------------------------------------------------------
    def follow(self, n_trials: int, poll_s: float = 2.0, idle_exit_s: float | None = None) -> list[int]:
        """On node ``launch.node_rank`` > 0: join every running multi-node trial with torchrun."""
        joined_key = f"ll:joined:{self.launch.node_rank}"
        idle_since = time.monotonic()
        while True:
            trials = self.study.get_trials(deepcopy=False)
            todo = [t for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get("nnodes", 1) > 1
                    and "fit_args" in t.user_attrs and not t.system_attrs.get(joined_key)]
            if todo:
                t = todo[0]
                self.storage.set_trial_system_attr(t._trial_id, joined_key, True)
                launch = Launch(**{**self.launch.__dict__, "master_port": t.user_attrs["master_port"],
                                   "nnodes": t.user_attrs["nnodes"], "devices": t.user_attrs["devices"]})
                cmd = command(t.user_attrs["fit_args"], launch)
                env = trial_env(self.storage_url, self.study_name, t.number, self.cfg.metric, self.cfg.pruner)
                rc = run_process(cmd, env, self._log_path(t.number, self.launch.node_rank), self.trial_timeout)
                if rc != 0:
                    log.warning("trial %d on node %d exited with %d", t.number, self.launch.node_rank, rc)
                self.ran.append(t.number)
                idle_since = time.monotonic()
                continue
            done = len([c for c in counted(trials) if c.state in FINISHED]) >= n_trials
            if done and not any(t.state == TrialState.RUNNING for t in trials):
                return self.ran
            if idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                return self.ran
            time.sleep(poll_s)


# -- command line ---------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sweeps/sweep.py", description=(
        "Run an Optuna hyperparameter sweep over Dropout-GRPO trials (one DDP fit per trial) and write its "
        "report (trials.csv, summary.md, plots, the HParams tab of OUT/tb).\n\n"
        "Example: python sweeps/sweep.py --config sweeps/tiny.yaml --n-trials 4 --out sweeps/out/tiny\n\n")
        + __doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="sweep YAML (search space, objective, sampler, pruner)")
    p.add_argument("--n-trials", type=int, required=True, help="the study's total number of finished trials")
    p.add_argument("--out", default=None, help="results folder (default: sweeps/out/<study name>)")
    p.add_argument("--storage", default=None, help="Optuna RDB URL (default: sqlite file OUT/study.db)")
    p.add_argument("--study-name", default=None, help="default: the config file's stem")
    p.add_argument("--devices", type=int, default=1, help="DDP processes per node for each trial")
    p.add_argument("--accelerator", default=None, help="cpu / gpu (default: the experiment config's)")
    p.add_argument("--init-from", default=None, help="override the YAML's init_from (the Coconut checkpoint)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the sweep YAML, e.g. pruner.type=hyperband or args.trainer.val_check_interval=5")
    p.add_argument("--heartbeat-interval", type=int, default=10, help="seconds; 0 turns heartbeats off")
    p.add_argument("--grace-period", type=int, default=None, help="stale after this many seconds (default 3x)")
    p.add_argument("--max-retry", type=int, default=1, help="times a stale or interrupted trial is enqueued again")
    p.add_argument("--trial-timeout", type=float, default=None, help="seconds before a trial is killed (FAIL)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes per trial (torchrun)")
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=29500, help="base port; trial n uses base + n %% 1000")
    p.add_argument("--follow", action="store_true", help="node rank > 0: join the trials node 0 starts")
    p.add_argument("--no-plots", action="store_true")
    return description_first(p)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[sweep %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    cfg = load_sweep_config(args.config, args.set, args.init_from)
    study_name = args.study_name or Path(args.config).stem
    out = Path(args.out or Path("sweeps") / "out" / study_name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage_url = args.storage or default_storage(out)
    if cfg.init_from and not Path(cfg.init_from).exists():
        raise SystemExit(f"init_from {cfg.init_from} does not exist (pass --init-from PATH.ckpt)")
    launch = Launch(devices=args.devices, accelerator=args.accelerator, nnodes=args.nnodes, node_rank=args.node_rank,
                    master_addr=args.master_addr, master_port=args.master_port)
    worker = Worker(cfg, storage_url, study_name, out, launch, args.heartbeat_interval or None, args.grace_period,
                    args.max_retry, args.trial_timeout)

    def _term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)  # also when started with SIGINT ignored (a background job)
    rc = 0
    try:
        if args.follow or args.node_rank > 0:
            ran = worker.follow(args.n_trials)
        else:
            ran = worker.run(args.n_trials)
        log.info("worker done: ran trials %s; study holds %d finished trials", ran, finished_count(worker.study))
    except KeyboardInterrupt:
        log.warning("interrupted: the running trial is FAIL and enqueued again; results written")
        rc = 130
    if args.node_rank == 0:
        files = write_results(worker.study, cfg, out, storage_url, plots=not args.no_plots)
        log.info("results: %s", ", ".join(str(p) for p in files.values()))
    return rc


if __name__ == "__main__":
    sys.exit(main())
