"""Callbacks: the environment record, phase-end evaluations with ``summary.json``, HParams metrics."""
from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from .evaluation import count_correct
from .distributed import all_sum
from .metrics import binomial_ci95, mean_and_ci95_from_sums, paired_sums

log = logging.getLogger("lightning_latent")

_PACKAGES = ("lightning-latent", "torch", "lightning", "transformers", "datasets", "tokenizers", "torchmetrics",
             "optuna", "optuna-integration", "tensorboard", "jsonargparse", "numpy")


def matmul_gflops(seconds: float = 0.2, n: int = 1024) -> float:
    """The CPU's fp32 matmul throughput (an n x n product, repeated for about ``seconds``), in GFLOP/s: the
    one figure that says how fast this machine runs the package (2026-12: 34 on an AVX2-only 2-core CPU,
    102 on an AVX-512 one). Constant inputs: the global RNG is left alone."""
    a = torch.full((n, n), 0.5)
    a @ a  # warm-up
    reps, t0 = 0, time.perf_counter()
    while reps < 2 or time.perf_counter() - t0 < seconds:
        a @ a
        reps += 1
    return round(2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9, 1)


def environment_record() -> dict:
    """Package versions, git commit, CPU / GPU, the CPU's kernel level and matmul throughput: what a reader
    needs to rerun a number, and to know how long it will take on their machine."""
    versions = {}
    for p in _PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"packages": versions, "git_commit": commit, "python": platform.python_version(),
            "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "matmul_1024_fp32_gflops": matmul_gflops(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpus": gpus,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


class EnvironmentRecord(L.Callback):
    """Writes ``env.json`` next to the run's ``config.yaml`` (rank 0)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        log_dir = trainer.log_dir  # a collective (broadcast): every rank must call it, not rank 0 alone
        if trainer.is_global_zero and log_dir:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(log_dir) / "env.json", "w") as f:
                json.dump(environment_record(), f, indent=2)


class ComputeMeter(L.Callback):
    """Logs what each training step cost on this rank: ``perf/forward_positions`` (positions the
    transformer ran, policy and reference, every pass: rollouts, replays, checkpointed recomputation,
    a supervised forward, and a plateau evaluation inside a supervised step; not the validation loop or the
    phase-end evaluations, which run outside the training batch), ``perf/optimizer_steps`` (optimiser steps
    taken: ``mu`` per GRPO step unless skipped) and ``perf/rollouts`` (GRPO: prompts x K), all per rank.
    The study sums them per arm (its compute table)."""

    def __init__(self) -> None:
        self._steps, self._hooks, self._before = 0, [], (0, None, 0, 0, False)

    def _count(self, *args) -> None:
        self._steps += 1

    def on_train_start(self, trainer, pl_module) -> None:
        self._hooks = [opt.register_step_post_hook(self._count) for opt in trainer.optimizers]

    def _remove_hooks(self, *args, **kwargs) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    on_train_end = on_exception = teardown = _remove_hooks

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        ref = getattr(pl_module, "reference", None)
        self._before = (pl_module.model.positions_run, ref, ref.model.positions_run if ref is not None else 0,
                        self._steps, pl_module.segment.kind == "grpo")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        policy, ref_before, ref_count, steps, grpo = self._before
        ref = getattr(pl_module, "reference", None)  # (a new GRPO phase makes a new one, counting from 0)
        ref_run = 0 if ref is None else ref.model.positions_run - (ref_count if ref is ref_before else 0)
        pl_module.log("perf/forward_positions", float(pl_module.model.positions_run - policy + ref_run))
        pl_module.log("perf/optimizer_steps", float(self._steps - steps))
        if grpo:
            pl_module.log("perf/rollouts", float(len(batch) * pl_module.grpo_cfg.group_size))


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for this project's manual optimisation: every ``every_n_train_steps`` it saves
    the state AFTER the step, which is what resuming needs (the step counter and the weights agree).

    Lightning 2.6 assumes a manually optimised module wants the state from before ``optimizer.step()``
    and, lacking one, warns with a 15-line code sample at every save; the save itself is the same as
    here. Automatic optimisation: Lightning's own behaviour.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.automatic_optimization:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._every_n_train_steps < 1 or trainer.global_step % self._every_n_train_steps != 0:
            return
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is not None and self.monitor not in candidates:
            self._defer_save_until_validation = True
            return
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
        self._last_time_checked = time.monotonic()

    def on_train_end(self, trainer, pl_module) -> None:
        # A schedule ends at whatever global step its phases add up to (mu optimiser steps per GRPO step,
        # stages shortened by their plateau rule), rarely a multiple of every_n_train_steps. Lightning saves
        # last.ckpt at the end only if it never saved one, so last.ckpt would hold an earlier step (the
        # default run's: the end of the latent curriculum, before GRPO). Save it at the final step.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class PhaseSummary(L.Callback):
    """At the end of every phase: greedy pass@1 (perturbation off) on validation and test, with the
    evaluation size and a 95% interval; at the end of fit a table and ``summary.json``.

    Selection never looks at test: the test numbers are only reported.
    """

    def __init__(self, splits: tuple[str, ...] = ("validation", "test"), evaluate_start: bool = True,
                 phase_checkpoints: bool = True, pair_validation: bool = False):
        """
        Args:
            splits: the splits evaluated at each phase end (and at the start); none: rows without pass@1
                (a study's RL cell: its validation curve and its test cell say what it needs).
            evaluate_start: evaluate the starting weights of a run that starts from ``init_from``.
            phase_checkpoints: save ``checkpoints/phase-<name>.ckpt`` at every phase end (a later run can
                start from it).
            pair_validation: a grpo or sft phase's validation row also gets its paired difference against
                the phase before it (``val_paired_*``; test rows of grpo phases always do): the converged check
                of a start (``sft_continue`` at the floor's lr gains at most a point on the same problems).
        """
        for split in splits:
            if split not in ("validation", "test"):
                raise ValueError(f"summary.splits: {split!r} is not a split; choose from validation, test")
        self.splits, self.evaluate_start, self.phase_checkpoints = tuple(splits), evaluate_start, phase_checkpoints
        self.pair_validation = pair_validation
        self._last_val: dict[int, bool] = {}
        self.rows: list[dict] = []
        # This rank's per-problem test correctness of the last evaluated phase: an RL phase is compared
        # with the checkpoint it started from on the same problems (paired), not by two intervals.
        self._last_test: dict[int, bool] = {}
        self._t0 = time.perf_counter()
        self._phase_t0 = self._t0

    # The rows of phases finished before a resume travel in the checkpoint.
    def state_dict(self) -> dict:
        return {"rows": self.rows, "elapsed": time.perf_counter() - self._t0,
                "last_test": sorted(self._last_test.items()), "last_val": sorted(self._last_val.items())}

    def load_state_dict(self, state: dict) -> None:
        self.rows = list(state.get("rows", []))
        self._last_test = {int(k): bool(v) for k, v in state.get("last_test", [])}
        self._last_val = {int(k): bool(v) for k, v in state.get("last_val", [])}
        self._elapsed_before = float(state.get("elapsed", 0.0))

    def on_fit_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter() - getattr(self, "_elapsed_before", 0.0)
        self._phase_t0 = time.perf_counter()
        if getattr(pl_module, "step_count", 0) == 0:
            self.rows = []
        if getattr(pl_module, "step_count", 0) == 0 and self._want_start_eval(pl_module):
            self._evaluate(trainer, pl_module, "start", stage_seg=pl_module.segments[0])

    def _want_start_eval(self, pl_module) -> bool:
        # A run that starts from given weights reports its starting point (e.g. the Coconut checkpoint).
        return self.evaluate_start and pl_module.hparams.get("init_from") is not None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        done_seg = None
        for s in pl_module.segments:
            if s.end == pl_module.step_count and s.last_of_phase and s.steps > 0:
                done_seg = s
        if done_seg is not None and pl_module.step_count > 0:
            self._evaluate(trainer, pl_module, done_seg.name, stage_seg=done_seg)
            # Keep every phase's end state: a later run starts from it with init_from (e.g. GRPO arms and
            # sweep trials from the Coconut checkpoint of the default run).
            if self.phase_checkpoints and trainer.log_dir and not trainer.fast_dev_run:
                trainer.save_checkpoint(str(Path(trainer.log_dir) / "checkpoints" / f"phase-{done_seg.name}.ckpt"),
                                        weights_only=False)  # the full state: a run can resume from it

    def _evaluate(self, trainer, pl_module, name: str, stage_seg) -> None:
        dm = trainer.datamodule
        if dm is None:
            return
        # Every module's own mode, restored after: LatentLM keeps the backbone in eval mode unless base
        # dropout is on, and a fit that starts with the backbone in eval mode gets a Lightning warning.
        modes = {m: m.training for m in pl_module.modules()}
        bar = trainer.progress_bar_callback if hasattr(trainer.progress_bar_callback, "eval_begin") else None
        row = {"phase": name, "kind": stage_seg.kind, "stage": stage_seg.stage, "step": pl_module.step_count}
        for split in self.splits:
            recs = dm.eval_records(split)
            if trainer.fast_dev_run:  # one batch of everything, evaluation included
                recs = recs[: dm.eval_batch_size]
            if bar is not None:
                bar.eval_begin(f"after {name}: {split}", len(recs))
            per_problem: dict[int, bool] = {}
            correct, n = count_correct(pl_module.evaluator, recs, stage_seg.stage, stage_seg.cot_layout,
                                       dm.eval_batch_size, pl_module.device,
                                       on_batch=None if bar is None else bar.eval_advance, per_problem=per_problem)
            p = correct / max(n, 1)
            key = "val" if split == "validation" else split
            row[f"{key}_pass@1"] = p
            row[f"{key}_n"] = n
            row[f"{key}_ci95"] = binomial_ci95(p, max(n, 1))
            # Whether to pair is decided on the rows (the same on every rank), never on this rank's share of
            # the problems: paired_row is a collective, and a rank holding none would leave the others waiting.
            before = any(f"{key}_n" in r for r in self.rows)
            if key == "test":
                if stage_seg.kind == "grpo" and before:
                    row.update(paired_row(self._last_test, per_problem, pl_module.device))
                self._last_test = per_problem
            elif self.pair_validation:
                if stage_seg.kind in ("grpo", "sft") and before and name != "start":
                    row.update(paired_row(self._last_val, per_problem, pl_module.device, "val"))
                self._last_val = per_problem
            if bar is not None:
                bar.eval_end(f"pass@1 {p:.3f} (n={n})", p if key == "val" else None, pl_module.step_count)
            if name == "start":  # self.log() is refused in on_fit_start: write to the loggers directly
                for lg in trainer.loggers:
                    lg.log_metrics({f"phase/{name}/{key}_pass@1": p}, step=trainer.global_step)
            else:
                pl_module.log(f"phase/{name}/{key}_pass@1", p)
        now = time.perf_counter()
        row["seconds"] = round(now - self._phase_t0, 2)
        self._phase_t0 = now
        self.rows.append(row)
        for m, mode in modes.items():
            m.training = mode
        if trainer.is_global_zero:
            log.info("phase %s: %s", name, row)

    def on_fit_end(self, trainer, pl_module) -> None:
        log_dir = trainer.log_dir  # a collective (broadcast): every rank must call it, not rank 0 alone
        if not trainer.is_global_zero or not log_dir:
            return
        summary = {"phases": self.rows, "seconds": round(time.perf_counter() - self._t0, 2),
                   "steps": pl_module.step_count, "skipped_rows": trainer.datamodule.skip_report()
                   if trainer.datamodule is not None else {}}
        summary["checks"] = phase_checks(self.rows)
        plateau = getattr(pl_module, "plateau", None)
        if plateau is not None and plateau.history:  # the plateau rule's evaluations: the learning curves
            summary["plateau"] = plateau.history
            summary["segment_steps"] = [{"phase": s.name, "stage": s.stage, "steps": s.steps}
                                        for s in pl_module.segments]
        path = Path(log_dir) / "summary.json"
        with open(path, "w") as f:
            json.dump(summary, f, indent=2)
        lines = [f"{'phase':<16}{'val pass@1':>12}{'test pass@1':>13}{'± 95%':>8}{'n test':>8}{'seconds':>9}"]
        for r in self.rows:
            lines.append(f"{r['phase']:<16}{r.get('val_pass@1', float('nan')):>12.3f}"
                         f"{r.get('test_pass@1', float('nan')):>13.3f}{r.get('test_ci95', float('nan')):>8.3f}"
                         f"{r.get('test_n', 0):>8d}{r['seconds']:>9.1f}")
        for c in summary["checks"]:
            lines.append(f"{'met' if c['met'] else 'NOT met'}: {c['check']} ({c['detail']})")
        lines.append(f"total {summary['seconds']:.1f} s; summary: {path}")
        print("\n".join(lines), flush=True)


def paired_row(before: dict[int, bool], after: dict[int, bool], device, key: str = "test") -> dict:
    """The paired difference (on split ``key``) of a phase against the checkpoint it started from: summed
    over ranks (each holds its share of the problems), mean and 95% t-interval of the per-problem differences."""
    n, s, ss = paired_sums(before, after)
    t = all_sum(torch.tensor([float(n), s, ss], dtype=torch.float64, device=device))
    n = int(t[0])
    if n == 0:
        return {}
    diff, half = mean_and_ci95_from_sums(n, float(t[1]), float(t[2]))
    return {f"{key}_paired_diff": diff, f"{key}_paired_ci95": half, f"{key}_paired_n": n}


def phase_checks(rows: list[dict]) -> list[dict]:
    """Did each RL phase beat the checkpoint it started from, on test pass@1? ``met`` only when the
    paired per-problem difference (same test problems before and after) has a 95% interval above 0.
    Said in the summary either way, with the numbers (a disappointing result is still the result)."""
    out = []
    for prev, row in zip(rows, rows[1:]):
        if row.get("kind") != "grpo" or "test_pass@1" not in row or "test_pass@1" not in prev:
            continue
        a, b = prev["test_pass@1"], row["test_pass@1"]
        if "test_paired_diff" in row:
            d, half, n = row["test_paired_diff"], row["test_paired_ci95"], row["test_paired_n"]
            lo, hi = d - half, d + half
            met = bool(lo > 0)
            detail = (f"{100 * b:.1f}% vs {100 * a:.1f}%, paired difference {100 * d:+.1f} points, 95% interval "
                      f"[{100 * lo:+.1f}, {100 * hi:+.1f}] over the same n={n} test problems")
        else:  # rows from an older summary: no per-problem record
            met = False
            detail = (f"{100 * b:.1f}% vs {100 * a:.1f}%, difference {100 * (b - a):+.1f} points, "
                      f"n={row.get('test_n')}; no paired per-problem record, so not judged")
        out.append({"check": f"{row['phase']} above {prev['phase']} (test pass@1, paired)", "met": met,
                    "detail": detail})
    return out
