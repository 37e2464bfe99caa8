"""Multi-process and resume checks of the Lightning module (subprocesses running a small driver).

* a 2-rank DDP GRPO step (mu=2, per-row masks, sampled answers) equals a 1-rank step on the same
  global batch: the parameters after the step agree to 1e-6 and did change;
* a run stopped mid-schedule and resumed from ``last.ckpt`` logs the same losses for the remaining
  steps as the uninterrupted run;
* with dynamic sampling and ranks that keep different numbers of groups (2 and 1), the DDP gradient
  equals the 1-process gradient of the global batch for ``grpo`` and ``dr_grpo``, and NOT for ``dapo``
  (an expected failure, docs/design.md#ddp): measured max |difference| 1.5e-3 for gradient entries up to
  4e-2, while re-weighting each rank by its share of the answer tokens gives the global gradient.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.ddp, pytest.mark.slow]

DRIVER = textwrap.dedent(
    r'''
    import json, os, sys, warnings, logging
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    import torch
    torch.set_num_threads(1)
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from lightning_latent.data.datamodule import LatentDataModule
    from lightning_latent.data.layout import CurriculumConfig
    from lightning_latent.model.build import ModelConfig
    from lightning_latent.model.perturb import PerturbConfig
    from lightning_latent.module import LatentReasoner
    from lightning_latent.optim import OptimConfig
    from lightning_latent.rl.update import GRPOConfig
    from lightning_latent.rl.rewards import REWARDS

    # a random tiny model never answers correctly: a multi-level reward of the text gives groups
    # with different rewards, so the GRPO gradient is not zero
    REWARDS["text_hash"] = lambda texts, golds: torch.tensor([float(sum(map(ord, t)) % 5) / 4 for t in texts])
    from lightning_latent.schedule import Phase
    import lightning_latent.optim as O
    import lightning_latent.rl.update as U

    args = json.loads(sys.argv[1])
    # text_hash, except that every rollout of a prompt whose gold is in ``flat_golds`` gets reward 0: those
    # groups are zero-variance, so dynamic sampling drops them and ranks keep different numbers of groups
    flat = set(args.get("flat_golds", ()))
    REWARDS["text_hash_flat"] = lambda texts, golds: torch.tensor(
        [0.0 if g in flat else float(sum(map(ord, t)) % 5) / 4 for t, g in zip(texts, golds)])

    out = args["out"]
    L.seed_everything(0, verbose=False)
    if args["mode"] == "grpo":
        schedule = [Phase("grpo", steps=1)]
        curriculum = CurriculumConfig(c_thought=1, max_latent_stage=2)
    else:
        schedule = [Phase("cot", steps=3), Phase("coconut", steps=2, stages=[1]), Phase("grpo", steps=3)]
        curriculum = CurriculumConfig(c_thought=1, max_latent_stage=1)
    module = LatentReasoner(
        backbone=ModelConfig(n_layer=2, n_embd=32, n_head=2, n_positions=128),
        curriculum=curriculum,
        schedule=schedule,
        perturb=PerturbConfig(arm="dropout_shared", p=0.2),
        grpo=GRPOConfig(group_size=4, answer_temperature=1.0, max_new_tokens=args.get("max_new_tokens", 6),
                        mu=args["mu"], beta=args.get("beta", 0.0), reward=args.get("reward", "text_hash"),
                        aggregation=args.get("aggregation", "grpo"),
                        dynamic_sampling=args.get("dynamic_sampling", False)),
        optim=OptimConfig(lr=1e-2, grpo_lr=1e-2, grad_clip=1e3),
        batch_size=4,
        grpo_prompts=args["prompts"],
        max_length=128,
    )
    if args.get("double"):
        module.model.double()
    dm = LatentDataModule(task="synthetic", val_limit=8, test_limit=8, eval_batch_size=8)
    callbacks = []
    if args.get("ckpt_dir"):
        callbacks.append(ModelCheckpoint(dirpath=args["ckpt_dir"], every_n_train_steps=1, save_last=True,
                                         save_top_k=-1, filename="step{step}"))
    trainer = L.Trainer(
        accelerator="cpu", devices=args["devices"], strategy="ddp" if args["devices"] > 1 else "auto",
        max_epochs=-1, max_steps=args.get("max_steps", -1), reload_dataloaders_every_n_epochs=1,
        limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1,
        logger=CSVLogger(out, name="log", version=0) if args.get("log") else False,
        enable_checkpointing=bool(callbacks), callbacks=callbacks, enable_progress_bar=False,
        enable_model_summary=False, deterministic=False, 
    )
    init = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    probe = {}
    if args.get("probe"):
        # Record, on each rank: the groups kept, the (rows, answer tokens) the loss is normalised by, and the
        # gradient of the first inner iteration before and after the all-reduce.
        keep_fn, loss_fn, sync_fn = U.select_mixed_groups, U.grpo_loss, O.sync_grads

        def keep(rewards):
            k = keep_fn(rewards)
            probe.setdefault("n_groups", len(k))
            probe.setdefault("n_kept", int(k.sum()))
            return k

        def loss(*a, **kw):
            if kw.get("totals") is not None:
                probe.setdefault("totals", list(kw["totals"]))
            return loss_fn(*a, **kw)

        def sync(params):
            params = list(params)
            first = "grad_local" not in probe
            if first:
                probe["grad_local"] = {n: p.grad.detach().clone() for n, p in module.model.named_parameters()
                                       if p.grad is not None}
            sync_fn(params)
            if first:
                probe["grad"] = {n: p.grad.detach().clone() for n, p in module.model.named_parameters()
                                 if p.grad is not None}

        U.select_mixed_groups, U.grpo_loss, O.sync_grads = keep, loss, sync
    trainer.fit(module, datamodule=dm, ckpt_path=args.get("ckpt_path"))
    if probe:
        torch.save(probe, os.path.join(out, f"probe{trainer.global_rank}.pt"))
    if trainer.is_global_zero:
        torch.save({"init": init, "final": {k: v.detach().cpu() for k, v in module.model.state_dict().items()},
                    "step_count": module.step_count, "global_step": trainer.global_step},
                   os.path.join(out, "result.pt"))
    '''
)


def _launch(tmp_path: Path, name: str, **args) -> subprocess.Popen:
    out = tmp_path / name
    out.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "driver.py"
    if not script.exists():
        script.write_text(DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore",
               HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    args["out"] = str(out)
    return subprocess.Popen([sys.executable, str(script), json.dumps(args)], cwd=str(out), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        log, _ = proc.communicate()
        pytest.fail(f"driver timed out:\n{log[-4000:]}")
    assert proc.returncode == 0, f"driver failed ({proc.returncode}):\n{log[-6000:]}"
    return log


def _result(tmp_path: Path, name: str) -> dict:
    return torch.load(tmp_path / name / "result.pt", weights_only=False)


def test_ddp_grpo_step_equals_single_process(tmp_path):
    p_rank = 2
    # float64: in fp32 the two runs differ by ~1e-5 after the step, because a rank pads its prompts to
    # its own longest one (other matmul shapes, rounding at 1e-7) and Adam's first steps divide by
    # |g|, which amplifies rounding in near-zero gradient entries; in float64 they agree to ~1e-14,
    # while a missing gradient sync on the second inner iteration shows up as ~1e-2.
    two = _launch(tmp_path, "ddp2", mode="grpo", devices=2, prompts=p_rank, mu=2, double=True)
    one = _launch(tmp_path, "ddp1", mode="grpo", devices=1, prompts=2 * p_rank, mu=2, double=True)
    _wait(two)
    _wait(one)
    r2, r1 = _result(tmp_path, "ddp2"), _result(tmp_path, "ddp1")
    assert r1["step_count"] == r2["step_count"] == 1
    assert r1["global_step"] == r2["global_step"] == 2  # mu=2 optimiser steps
    for k in r1["init"]:
        assert torch.equal(r1["init"][k], r2["init"][k]), k
    changed, worst = 0, 0.0
    for k, v1 in r1["final"].items():
        v2 = r2["final"][k]
        worst = max(worst, (v1 - v2).abs().max().item())
        changed += int((v1 - r1["init"][k]).abs().max().item() > 1e-4)
    assert worst <= 1e-6, f"1-rank and 2-rank parameters differ by {worst}"
    assert changed >= 10, "the GRPO step did not visibly change the parameters"


def _losses(path: Path) -> dict[int, float]:
    rows = list(csv.DictReader(open(path)))
    out = {}
    for r in rows:
        if r.get("train/loss"):
            out[int(r["step"])] = float(r["train/loss"])
    return out


def test_resume_reproduces_remaining_losses(tmp_path):
    full = _launch(tmp_path, "full", mode="resume", devices=1, prompts=2, mu=1, beta=0.02, log=True)
    ck = tmp_path / "ckpts"
    part = _launch(tmp_path, "part", mode="resume", devices=1, prompts=2, mu=1, beta=0.02, log=True,
                   max_steps=6, ckpt_dir=str(ck))
    _wait(full)
    _wait(part)
    assert (ck / "last.ckpt").exists()
    assert _result(tmp_path, "part")["step_count"] == 6
    state = torch.load(ck / "last.ckpt", weights_only=False, map_location="cpu")
    assert state["schedule_state"]["step_count"] == 6 and state["schedule_state"]["kind"] == "grpo"
    assert "grpo_reference" in state
    res = _launch(tmp_path, "resumed", mode="resume", devices=1, prompts=2, mu=1, beta=0.02, log=True,
                  ckpt_path=str(ck / "last.ckpt"))
    _wait(res)
    f = _losses(tmp_path / "full" / "log" / "version_0" / "metrics.csv")
    p = _losses(tmp_path / "part" / "log" / "version_0" / "metrics.csv")
    r = _losses(tmp_path / "resumed" / "log" / "version_0" / "metrics.csv")
    assert len(f) == 8, f
    steps = sorted(f)
    assert sorted(p) == steps[:6]
    for s in steps[:6]:
        assert p[s] == pytest.approx(f[s], abs=1e-6), s
    assert sorted(r) == steps[6:], (r, steps)
    for s in steps[6:]:
        assert r[s] == pytest.approx(f[s], abs=1e-6), (s, r[s], f[s])
    rf, rr = _result(tmp_path, "full"), _result(tmp_path, "resumed")
    assert rf["step_count"] == rr["step_count"] == 8
    for k, v in rf["final"].items():
        assert (v - rr["final"][k]).abs().max().item() <= 1e-6, k


# --------------------------------------------------------------------------------------------------
# Dynamic sampling with unequal kept groups, for each aggregation
# --------------------------------------------------------------------------------------------------
# Rank 0 gets training rows 0 and 2, rank 1 rows 1 and 3 (golds 60, 26, 60, 38); the reward makes the
# group of gold "26" zero-variance, so with dynamic sampling rank 0 keeps 2 groups, rank 1 keeps 1, and
# the 1-process run keeps 3 of its 4. Answers of up to 24 tokens vary in length (EOS is sampled), so a
# rank's share of the answer tokens differs from its share of the rows: that is what separates dapo's
# token-level mean from the row-level means of grpo and dr_grpo.
# The model runs in float64, but the log-probs (and so the loss arithmetic) are float32 (``.float()`` on the
# logits in generate / replay_logprobs), so gradients built from differently normalised losses agree to
# ~3e-8 relative, not 1e-16. Measured: grpo and dr_grpo ~1e-17, dapo re-weighted 3e-8, dapo as is 4e-2.
TOL = 1e-6  # relative to the largest gradient entry
DYNAMIC = dict(mode="grpo", mu=2, double=True, reward="text_hash_flat", flat_golds=["26"],
               dynamic_sampling=True, max_new_tokens=24, probe=True)


@pytest.fixture(scope="module")
def dynamic_run(tmp_path_factory):
    """run(aggregation) -> (probes of the 2 ranks, probe of the 1-process run, results 2-rank, 1-process);
    each aggregation is run once per module."""
    cache: dict[str, tuple] = {}

    def run(aggregation: str):
        if aggregation not in cache:
            tmp = tmp_path_factory.mktemp(f"dyn_{aggregation}")
            two = _launch(tmp, "two", devices=2, prompts=2, aggregation=aggregation, **DYNAMIC)
            one = _launch(tmp, "one", devices=1, prompts=4, aggregation=aggregation, **DYNAMIC)
            _wait(two)
            _wait(one)
            p2 = [torch.load(tmp / "two" / f"probe{r}.pt", weights_only=False) for r in range(2)]
            p1 = torch.load(tmp / "one" / "probe0.pt", weights_only=False)
            # the case must be the one described above, or the comparison proves nothing
            if [p["n_kept"] for p in p2] != [2, 1] or p1["n_kept"] != 3:
                pytest.fail(f"kept groups per rank {[p['n_kept'] for p in p2]}, 1-process {p1['n_kept']}: "
                            "expected [2, 1] and 3 (did the synthetic data or the reward change?)")
            cache[aggregation] = (p2, p1, _result(tmp, "two"), _result(tmp, "one"))
        return cache[aggregation]

    return run


def _grad_diff(a: dict, b: dict) -> tuple[float, float]:
    """(max |a - b|, max |b|) over all gradient entries (pytest.fail, not an AssertionError, when the
    parameters differ or the gradient is zero: the xfail below expects only the equality to fail)."""
    if a.keys() != b.keys():
        pytest.fail(f"different parameters have gradients: {sorted(a.keys() ^ b.keys())}")
    if max(v.abs().max().item() for v in b.values()) <= 1e-3:
        pytest.fail("zero gradient: the case tests nothing")
    return (max((a[k] - b[k]).abs().max().item() for k in a), max(b[k].abs().max().item() for k in b))


def _param_diff(r2: dict, r1: dict) -> float:
    return max((r2["final"][k] - v).abs().max().item() for k, v in r1["final"].items())


@pytest.mark.parametrize("aggregation", ["grpo", "dr_grpo"])
def test_ddp_dynamic_sampling_unequal_groups(dynamic_run, aggregation):
    """Row-level aggregations: weighting rank r by (kept groups_r / kept groups) * world makes the
    rank-averaged gradient the global batch's, also when ranks keep different numbers of groups."""
    p2, p1, r2, r1 = dynamic_run(aggregation)
    diff, scale = _grad_diff(p2[0]["grad"], p1["grad"])
    assert diff <= TOL * scale, f"{aggregation}: DDP gradient differs by {diff} (max |g| {scale})"
    assert _param_diff(r2, r1) <= 1e-6


def test_ddp_dynamic_sampling_dapo_equals_global_batch(dynamic_run):
    """dapo divides by answer tokens, so each rank's loss is weighted by its share of the tokens
    (rl.update.rank_weight), not of the groups: the DDP gradient then equals the global batch's. The
    case is one where the two shares differ (a group weighting would be off by about 4% here)."""
    p2, p1, _, _ = dynamic_run("dapo")
    n = [p["n_kept"] for p in p2]
    tokens = [p["totals"][1] for p in p2]
    assert [t / sum(tokens) for t in tokens] != pytest.approx([k / sum(n) for k in n], abs=1e-3), (
        f"token shares {tokens} equal group shares {n}: this case cannot separate the two weightings")
    assert sum(tokens) == p1["totals"][1], "the 1-process run saw other answers"
    diff, scale = _grad_diff(p2[0]["grad"], p1["grad"])
    assert diff <= TOL * scale, f"dapo: DDP gradient differs by {diff} (max |g| {scale})"
