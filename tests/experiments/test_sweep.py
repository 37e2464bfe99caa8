"""The Optuna sweep driver: trials as DDP fits, crash / prune / restart, concurrent workers, a killed
worker, PostgreSQL, and the two-node torchrun launch. Each trial is a few GRPO steps of a tiny model."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from lightning_latent.experiments.sweep import callbacks_from_env
from lightning_latent.experiments.sweep.driver import counted
from lightning_latent.experiments.sweep.runner import Launch, command, fit_args
from lightning_latent.experiments.sweep.space import load_sweep_config

from conftest import REPO

SWEEP = REPO / "sweeps" / "sweep.py"
TINY = REPO / "sweeps" / "tiny.yaml"
PARAMS = ("model.perturb.p", "model.grpo.group_size", "model.grpo.beta")


def make_tiny_coconut(root: Path) -> Path:
    """A tiny Coconut checkpoint (CoT 2 steps + one latent stage), as the issue describes."""
    cmd = [sys.executable, str(REPO / "experiments" / "run.py"), "fit", "--model.backbone.n_layer", "1",
           "--model.backbone.n_embd", "32", "--model.backbone.n_head", "2",
           '--model.schedule=[{"kind":"cot","steps":2},{"kind":"coconut","steps":1}]',
           "--data.val_limit", "8", "--data.test_limit", "8", "--trainer.accelerator", "cpu",
           "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(root),
           "--trainer.logger.init_args.name", "coconut", "--trainer.logger.init_args.version", "v0"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    ckpt = root / "coconut" / "v0" / "checkpoints" / "last.ckpt"
    assert r.returncode == 0 and ckpt.exists(), r.stderr[-3000:]
    return ckpt


@pytest.fixture(scope="module")
def coconut_ckpt(tmp_path_factory) -> Path:
    return make_tiny_coconut(tmp_path_factory.mktemp("coconut"))


def sweep_cmd(ckpt: Path, out: Path, n: int, *extra: str, study: str = "tiny", devices: int = 2,
              storage: str | None = None, plots: bool = False) -> list[str]:
    cmd = [sys.executable, str(SWEEP), "--config", str(TINY), "--init-from", str(ckpt), "--n-trials", str(n),
           "--out", str(out), "--study-name", study, "--devices", str(devices), *extra]
    if storage:
        cmd += ["--storage", storage]
    if not plots:
        cmd.append("--no-plots")
    return cmd


def run_sweep(*args, timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(sweep_cmd(*args, **kw), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def sqlite_url(out: Path) -> str:
    return f"sqlite:///{out.resolve() / 'study.db'}"


def load(url: str, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


def enqueue_crash(url: str, name: str = "tiny") -> None:
    """A trial forced to crash: p=1.5 is outside [0, 1), so the fit fails at start-up."""
    study = optuna.create_study(study_name=name, storage=url, direction="maximize", load_if_exists=True)
    study.enqueue_trial({"model.perturb.p": 1.5, "model.grpo.group_size": 2, "model.grpo.beta": 0.01})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- fast: the config and the command line ------------------------------------------------------------
def test_space_constant_rollouts_and_command():
    cfg = load_sweep_config(TINY, init_from="/x/last.ckpt")
    assert set(cfg.space) == set(PARAMS) and cfg.direction == "maximize" and cfg.metric == "val/pass@1"
    assert cfg.overrides({"model.grpo.group_size": 2})["model.grpo_prompts"] == 4
    assert cfg.overrides({"model.grpo.group_size": 4})["model.grpo_prompts"] == 2
    assert cfg.overrides({})["model.init_from"] == "/x/last.ckpt"
    assert isinstance(cfg.make_pruner(), optuna.pruners.MedianPruner)
    cfg2 = load_sweep_config(TINY, sets=["pruner={type: hyperband, min_resource: 1, max_resource: 4}"])
    assert isinstance(cfg2.make_pruner(), optuna.pruners.HyperbandPruner)
    with pytest.raises(ValueError, match="not divisible"):
        load_sweep_config(TINY, sets=["rollouts_per_step=6", "space.model.grpo.group_size={type: categorical, "
                                                             "choices: [4]}"])
    # the synthetic default: the three searched keys, prompts x K from the recipe (32 x 4)
    d = load_sweep_config(REPO / "sweeps" / "dropout_grpo.yaml")
    assert set(d.space) == set(PARAMS) and d.space["model.grpo.beta"]["log"] is True
    assert d.constant_rollouts() == 128 and d.overrides({"model.grpo.group_size": 16})["model.grpo_prompts"] == 8
    args = fit_args(None, {"model.schedule": [{"kind": "grpo", "steps": 4}]}, "/tb", "s", "trial_0003",
                    Launch(devices=2))
    assert "--trainer.strategy=ddp" in args and "--trainer.logger.init_args.version=trial_0003" in args
    assert '--model.schedule=[{"kind": "grpo", "steps": 4}]' in args
    tr = command(fit_args(None, {}, "/tb", "s", "v", Launch(nnodes=2, node_rank=1)), Launch(nnodes=2, node_rank=1))
    assert tr[1:3] == ["-m", "torch.distributed.run"] and "--node_rank=1" in tr and "--trainer.num_nodes=2" in tr


def test_constant_rollouts_over_a_base_config_that_sets_no_k_hold_the_recipes_128(tmp_path):
    """K searched at constant rollouts over a base config that sets neither K nor the prompts per step:
    both come from the run's defaults, the recipe's 32 prompts x K=4 = 128 rollouts (before, K came from
    GRPOConfig's old default 8 and the prompts from the module: 32 x 8 = 256)."""
    y = tmp_path / "sweep.yaml"
    y.write_text("base_config: null\nspace:\n  model.grpo.group_size: {type: categorical, choices: [4, 8]}\n")
    cfg = load_sweep_config(y)
    assert cfg.constant_rollouts() == 128
    assert cfg.overrides({"model.grpo.group_size": 8})["model.grpo_prompts"] == 16


def test_grid_sweep_visits_each_point_once_and_stops(tmp_path, monkeypatch):
    """sampler: {type: grid} (the dropout-rate search): every point once, in the driver's ask / tell loop,
    and the worker stops when the grid is done although --n-trials asks for more."""
    from lightning_latent.experiments.sweep.driver import Worker
    cfg = load_sweep_config(TINY, sets=["sampler={type: grid, seed: 0}", "rollouts_per_step=null",
                                        "space={model.perturb.p: {type: categorical, choices: [0.0, 0.1, 0.2]}}"])
    with pytest.raises(ValueError, match="grid needs categorical"):
        load_sweep_config(TINY, sets=["sampler={type: grid}"])  # tiny.yaml searches beta on a float range
    with pytest.raises(ValueError, match="must be tpe, random or grid"):
        load_sweep_config(TINY, sets=["sampler={type: cmaes}"])
    assert cfg.is_grid and not load_sweep_config(TINY).is_grid and load_sweep_config(TINY).sampler_kind == "tpe"
    worker = Worker(cfg, sqlite_url(tmp_path), "grid", tmp_path, Launch(devices=1), heartbeat_interval=None)

    def fake_fit(trial, params):  # the objective without a fit: the value is the searched p
        worker.study.tell(trial, params["model.perturb.p"])
        return TrialState.COMPLETE
    monkeypatch.setattr(worker, "_run_and_tell", fake_fit)
    ran = worker.run(n_trials=10)
    study = load(sqlite_url(tmp_path), "grid")
    assert len(ran) == 3 and sorted(t.params["model.perturb.p"] for t in study.trials) == [0.0, 0.1, 0.2]
    assert study.best_value == 0.2 and all(t.state == TrialState.COMPLETE for t in study.trials)


def test_a_recipe_chosen_on_its_mean_over_the_arms(tmp_path, monkeypatch):
    """objective.mean_over (issue 22's shared recipe): a grid over lr x arm; the lr with the best mean over
    the arms is chosen, not the single best trial, and summary.md names it. By hand: lr 1e-4 has the best
    trial (0.9) but a mean of 0.5; lr 5e-5 has the best mean (0.7)."""
    from lightning_latent.experiments.sweep.driver import Worker
    from lightning_latent.experiments.sweep.results import best_by_mean_over, trials_frame, write_results

    space = ("space={model.optim.grpo_lr: {type: categorical, choices: [5.0e-5, 1.0e-4]}, "
             "model.perturb.arm: {type: categorical, choices: [temperature, dropout_greedy]}}")
    sets = ["sampler={type: grid, seed: 0}", "rollouts_per_step=null", space, "pruner={type: nop}"]
    with pytest.raises(ValueError, match="mean_over='model.grpo.beta' must name a categorical"):
        load_sweep_config(TINY, sets=[*sets, "objective={mean_over: model.grpo.beta}"])
    cfg = load_sweep_config(TINY, sets=[*sets, "objective={mean_over: model.perturb.arm}"])
    worker = Worker(cfg, sqlite_url(tmp_path), "recipe", tmp_path, Launch(devices=1), heartbeat_interval=None)
    value = {(5.0e-5, "temperature"): 0.6, (5.0e-5, "dropout_greedy"): 0.8,
             (1.0e-4, "temperature"): 0.9, (1.0e-4, "dropout_greedy"): 0.1}

    def fake_fit(trial, params):
        worker.study.tell(trial, value[params["model.optim.grpo_lr"], params["model.perturb.arm"]])
        return TrialState.COMPLETE
    monkeypatch.setattr(worker, "_run_and_tell", fake_fit)
    worker.run(n_trials=10)
    study = load(sqlite_url(tmp_path), "recipe")
    rows, best = best_by_mean_over(trials_frame(study), "model.perturb.arm")
    assert best["model.optim.grpo_lr"] == 5.0e-5 and best["mean"] == pytest.approx(0.7)
    assert [r["mean"] for r in rows] == pytest.approx([0.7, 0.5]) and study.best_value == 0.9
    text = write_results(study, cfg, tmp_path / "out", sqlite_url(tmp_path), plots=False)["summary.md"].read_text()
    assert "Chosen: `model.optim.grpo_lr` = 5e-05 (mean 0.7000)" in text


def test_reporter_only_in_trials():
    assert callbacks_from_env({}) == []
    cbs = callbacks_from_env({"LL_OPTUNA_STORAGE": "sqlite:///x.db", "LL_OPTUNA_STUDY": "s", "LL_OPTUNA_TRIAL": "3",
                              "LL_OPTUNA_PRUNER": json.dumps({"type": "median"})})
    assert len(cbs) == 1 and cbs[0].number == 3 and cbs[0].monitor == "val/pass@1"


# -- slow: real sweeps -----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.ddp
def test_sweep_ddp_crash_prune_restart(coconut_ckpt, tmp_path):
    """3 trials, 2-process CPU DDP, sqlite: a forced crash is FAIL and the sweep goes on; a restarted
    driver carries on without rerunning finished trials; a trial is PRUNED under DDP; results written."""
    out = tmp_path / "sweep"
    url = sqlite_url(out)
    out.mkdir()
    enqueue_crash(url)
    run_sweep(coconut_ckpt, out, 2)  # trial 0 crashes, trial 1 completes
    study = load(url)
    t0, t1 = study.trials
    assert t0.state == TrialState.FAIL and "perturb.p=1.5" in t0.user_attrs["error"]
    assert Path(t0.user_attrs["log_path"]).exists()
    assert t1.state == TrialState.COMPLETE and t1.value is not None and max(t1.intermediate_values) == 4
    started = t1.datetime_start

    # restart with a larger total and a pruner that always prunes (pass@1 of the tiny model < 0.5)
    r = run_sweep(coconut_ckpt, out, 3, "--set", "pruner={type: threshold, lower: 0.5}", plots=True)
    study = load(url)
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert study.trials[1].datetime_start == started  # not rerun
    assert "trial 0:" not in r.stderr and "trial 1:" not in r.stderr
    t2 = study.trials[2]
    assert t2.state == TrialState.PRUNED and sorted(t2.intermediate_values) == [2]  # stopped at step 2 of 4
    log_dir = Path(t2.user_attrs["log_dir"])
    assert log_dir.name == "trial_0002" and (log_dir / "config.yaml").exists()
    assert json.loads((log_dir / "summary.json").read_text())["steps"] == 2  # both ranks stopped at step 2
    assert all(t.params.keys() == set(PARAMS) for t in study.trials)
    for f in ("trials.csv", "summary.md", "history.png", "intermediate.png"):
        assert (out / f).exists(), f
    import pandas as pd

    df = pd.read_csv(out / "trials.csv")
    assert list(df["state"]) == ["FAIL", "COMPLETE", "PRUNED"]
    assert {"number", "value", "duration_s", "log_dir", "params_model.perturb.p"} <= set(df.columns)
    md = (out / "summary.md").read_text()
    assert "Trial 1" in md and "experiments/run.py fit" in md and "--model.init_from=" in md


@pytest.mark.slow
def test_concurrent_workers_disjoint_and_stop_at_total(coconut_ckpt, tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    cmd = sweep_cmd(coconut_ckpt, out, 2, devices=1)
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
    study = load(sqlite_url(out))
    real = [t for t in study.trials if not t.system_attrs.get("ll:surplus")]
    assert len(counted(study.trials)) == 2 and len(real) == 2
    assert all(t.state == TrialState.COMPLETE for t in real)
    ran = []
    for _, err in outs:
        ran.append({int(line.split("trial ")[1].split(":")[0]) for line in err.splitlines() if "] trial " in line
                    and "COMPLETE" not in line and "FAIL" not in line and "PRUNED" not in line})
    assert ran[0].isdisjoint(ran[1]) and ran[0] | ran[1] == {t.number for t in real}
    assert len({t.user_attrs["worker"] for t in real}) == 2  # both workers took part


@pytest.mark.slow
def test_killed_worker_trial_fails_and_is_retried(coconut_ckpt, tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    url = sqlite_url(out)
    hb = ["--heartbeat-interval", "1", "--grace-period", "3"]
    proc = subprocess.Popen(sweep_cmd(coconut_ckpt, out, 1, *hb, devices=1), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid = None
    deadline = time.time() + 180
    while time.time() < deadline and pid is None:
        time.sleep(1)
        try:
            trials = load(url).trials
        except Exception:
            continue
        pid = next((t.user_attrs.get("pid") for t in trials if t.state == TrialState.RUNNING), None)
    assert pid is not None, "no trial started"
    os.kill(proc.pid, signal.SIGKILL)  # the worker dies; its trial stays RUNNING
    proc.wait()
    try:
        os.killpg(pid, signal.SIGKILL)  # the orphaned fit
    except ProcessLookupError:
        pass
    assert load(url).trials[0].state == TrialState.RUNNING
    time.sleep(4)  # past the grace period
    # a restarted driver runs the stale-trial check itself (total 0: nothing more to run)
    run_sweep(coconut_ckpt, out, 0, *hb, devices=1)
    study = load(url)
    t0, t1 = study.trials
    assert t0.state == TrialState.FAIL
    assert t1.state == TrialState.WAITING and t1.params == t0.params and t1.system_attrs["failed_trial"] == 0
    assert counted(study.trials) == []  # the failed trial is replaced by its retry in the budget


def _postgres_url() -> str | None:
    url = os.environ.get("LL_POSTGRES_URL")
    if url:
        return url
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        r = subprocess.run(["bash", str(REPO / "tests" / "services" / "start_postgres.sh")], capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout.strip().splitlines()[-1]
    return None


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.postgres
def test_sweep_on_postgres(coconut_ckpt, tmp_path):
    url = _postgres_url()
    if url is None:
        pytest.skip("LL_POSTGRES_URL is unset (CI starts a server with tests/services/start_postgres.sh)")
    name = f"tiny_{os.getpid()}_{int(time.time())}"
    out = tmp_path / "sweep"
    enqueue_crash(url, name)
    run_sweep(coconut_ckpt, out, 2, study=name, storage=url)
    study = load(url, name)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert study.trials[1].intermediate_values and (out / "trials.csv").exists()
    optuna.delete_study(study_name=name, storage=url)


@pytest.mark.slow
@pytest.mark.ddp
def test_torchrun_two_nodes_on_loopback(coconut_ckpt, tmp_path):
    """One trial over two single-process "nodes" (torchrun --nnodes 2 --node_rank 0|1): node 0's driver
    starts it, node 1's driver (--follow) joins it; rank 0 reports to the study."""
    out = tmp_path / "sweep"
    out.mkdir()
    port = free_port()
    nodes = ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    node0 = subprocess.Popen(sweep_cmd(coconut_ckpt, out, 1, *nodes, "--node-rank", "0", devices=1), cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2)  # let node 0 create the study
    node1 = subprocess.Popen(sweep_cmd(coconut_ckpt, out, 1, *nodes, "--node-rank", "1", "--follow", devices=1),
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    o0 = node0.communicate(timeout=600)
    o1 = node1.communicate(timeout=300)
    assert node0.returncode == 0 and node1.returncode == 0, (o0[1][-3000:], o1[1][-3000:])
    study = load(sqlite_url(out))
    (t,) = study.trials
    assert t.state == TrialState.COMPLETE and sorted(t.intermediate_values) == [2, 4], \
        (out / "trials" / "trial_0000.log").read_text()[-3000:]
    assert t.system_attrs.get("ll:joined:1") and "torch.distributed.run" in t.user_attrs["command"]
    log1 = (out / "trials" / "trial_0000_node1.log").read_text()
    assert "--node_rank=1" in log1


@pytest.mark.parametrize("name", ["paper_recipe", "paper_noise"])
def test_the_paper_sweeps_run_their_task_and_refuse_to_run_without_one(name):
    """Issue 22's grids: a trial gets the chosen task's settings and curriculum length (a start of one task
    cannot run on another), and until a task is set the sweep is refused by name."""
    path = REPO / "sweeps" / f"{name}.yaml"
    with pytest.raises(ValueError, match="sweep task='CHOOSE' is not a task"):
        load_sweep_config(path)
    cfg = load_sweep_config(path, sets=["task=p5_20"])
    assert cfg.is_grid and cfg.pruner["type"] == "nop"
    params = {k: spec["choices"][0] for k, spec in cfg.space.items()}
    ov = cfg.overrides(params)
    assert ov["data.synthetic"]["max_steps"] == 5 and ov["model.curriculum.max_latent_stage"] == 5
    assert ov["model.perturb.p_train"] == 0.1 and ov["model.schedule"][0]["steps"] == 300
    fit = fit_args(cfg.base_config, ov, "tb", "t", "0", Launch(devices=1))
    assert '--data.synthetic={"seed": 0, "min_steps": 5, "max_steps": 5, "max_number": 20, "max_value": 60, ' \
           '"operators": "+-*"}' in fit


def test_a_grid_point_requeued_after_a_failure_is_not_counted_as_asked(tmp_path):
    """A resumed grid sweep must run the points whose trials failed and were enqueued again (WAITING): issue
    22's recipe grid stopped with two such points never run, and a choice was made without them."""
    import optuna

    from lightning_latent.experiments.sweep.space import load_sweep_config

    lr = "space.model.optim.grpo_lr={type: categorical, choices: [2.5e-06]}"
    cfg = load_sweep_config("sweeps/paper_recipe.yaml", ["task=p4_40", lr])
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'g.db'}", sampler=cfg.make_sampler())
    points = [{"model.perturb.arm": a, "model.optim.grpo_lr": 2.5e-6, "model.grpo.dynamic_sampling": d}
              for a in ("temperature", "dropout_shared", "dropout_greedy") for d in (False, True)]
    def ask():
        t = study.ask()
        cfg.suggest(t)  # as the driver does: the point's params are set
        return t

    for params in points[:4]:
        study.enqueue_trial(params)
        study.tell(ask(), 0.5)
    assert not cfg.grid_exhausted(study)
    failed = []
    for params in points[4:]:  # asked, then killed (FAIL) ...
        study.enqueue_trial(params)
        tr = ask()
        study.tell(tr, state=optuna.trial.TrialState.FAIL)
        failed.append(study.trials[tr.number])
    for f in failed:  # ... and added again as the driver's retry callback does (optuna's Retry*Callback): WAITING
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING, params=f.params,
                                                  distributions=f.distributions,
                                                  system_attrs={"retry_history": [f.number]}))
    assert not cfg.grid_exhausted(study)
    for _ in points[4:]:
        study.tell(ask(), 0.4)
    assert cfg.grid_exhausted(study)
