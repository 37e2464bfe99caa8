"""One progress display for the whole schedule.

:class:`ScheduleProgress` replaces Lightning's progress bar (whose epoch counter restarts at every
schedule segment and has no total). It reads the module's ``segments`` (the schedule, known in
advance) and shows:

* the current phase and stage by name, step / steps of the phase and step / steps of the run;
* elapsed time and an estimate of the time left (measured seconds per step of each phase kind times
  the steps left; evaluations not included);
* the metrics that matter for the phase: ``loss`` in supervised phases (cot, coconut, sft); ``reward``,
  ``zero-std`` (frac_zero_std) and ``kept`` (groups kept) in GRPO phases; ``val pass@1`` once measured;
* its own bar for Lightning's validation / test / predict loops and for the phase-end evaluations of
  :class:`~lightning_latent.callbacks.PhaseSummary` (which run outside Lightning's loops).

On a terminal it is a live ``rich`` display; log records, ``print`` and warnings go through its
console so that they appear above the bars instead of garbling them. When the output is not a terminal
(a file, CI) it prints a plain line every ``every`` steps (default 50), at every phase / stage start
and at the end of every evaluation. ``--progress.every N`` and ``--progress.mode plain|live|auto``
change it; the CLI registers it only when ``--trainer.enable_progress_bar`` is true (the default).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Literal

from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

SFT_METRICS = (("train/loss", "loss", "{:.3f}"),)
GRPO_METRICS = (("grpo/reward_mean", "reward", "{:.3f}"), ("grpo/frac_zero_std", "zero-std", "{:.2f}"),
                ("grpo/groups_kept", "kept", "{:.0f}"))


def fmt_seconds(s: float | None) -> str:
    if s is None or s != s:
        return "?"
    s = int(round(max(s, 0.0)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _value(metrics: dict, tag: str) -> float | None:
    v = metrics.get(tag)
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


class ScheduleProgress(ProgressBar):
    """The schedule-aware progress display (see the module docstring).

    Args:
        mode: ``auto`` (live on a terminal, plain lines otherwise), ``live`` or ``plain``.
        every: in plain mode, one line every this many training steps.
    """

    def __init__(self, mode: Literal["auto", "live", "plain"] = "auto", every: int = 50):
        super().__init__()
        if mode not in ("auto", "live", "plain"):
            raise ValueError(f"progress mode {mode!r}: choose auto, live or plain")
        if every < 1:
            raise ValueError(f"progress every={every} must be >= 1")
        self.mode, self.every = mode, every
        self._enabled = True
        self._progress = None  # rich.progress.Progress while live
        self._tasks: dict[str, Any] = {}
        self._streams: list[tuple[logging.StreamHandler, Any]] = []
        self._kind_time: dict[str, list[float]] = {}  # kind -> [seconds, steps]
        self._t0 = time.perf_counter()
        self._batch_t0: float | None = None
        self._last_seg: tuple | None = None
        self._val: tuple[float, int] | None = None  # (pass@1, step)
        self._eval: dict[str, Any] | None = None

    # -- ProgressBar API ---------------------------------------------------------------------------
    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def live(self) -> bool:
        if self.mode != "auto":
            return self.mode == "live"
        return sys.stdout.isatty() and os.environ.get("TERM") != "dumb"

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._progress is not None:
            self._progress.console.print(*args, **kwargs)
        else:
            print(*args, **kwargs, flush=True)

    # -- the live display ----------------------------------------------------------------------------
    def _start_live(self) -> None:
        if self._progress is not None or not self.live or not self._enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=28), MofNCompleteColumn(),
                                  TextColumn("{task.fields[time]}"), TextColumn("{task.fields[info]}"),
                                  redirect_stdout=True, redirect_stderr=True, refresh_per_second=4)
        self._progress.start()
        # Log handlers hold the stream they were given at import time: point them at the console's proxies.
        for name in ("", "lightning.pytorch", "lightning.fabric", "lightning_latent", "lightning_latent.experiments.study"):
            for h in logging.getLogger(name).handlers:
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    old = h.stream
                    if old in (sys.__stdout__, sys.__stderr__):
                        self._streams.append((h, old))
                        h.setStream(sys.stdout if old is sys.__stdout__ else sys.stderr)

    def _stop_live(self) -> None:
        if self._progress is None:
            return
        for h, old in self._streams:
            h.setStream(old)
        self._streams = []
        self._progress.stop()
        self._progress, self._tasks = None, {}

    def _task(self, key: str, description: str, total: float, completed: float = 0, **fields: Any) -> None:
        p = self._progress
        if p is None:
            return
        fields = {"time": "", "info": "", **fields}
        total = None if total is None or total == float("inf") else total
        if key not in self._tasks:
            self._tasks[key] = p.add_task(description, total=total, completed=completed, **fields)
        else:
            p.update(self._tasks[key], description=description, total=total, completed=completed, **fields)

    def _drop(self, key: str) -> None:
        if self._progress is not None and key in self._tasks:
            self._progress.remove_task(self._tasks.pop(key))

    # -- schedule arithmetic -------------------------------------------------------------------------
    @staticmethod
    def _phase_span(pl_module, seg) -> tuple[int, int]:
        segs = [s for s in pl_module.segments if s.phase_index == seg.phase_index]
        return segs[0].start, segs[-1].end

    @staticmethod
    def describe(pl_module, seg) -> str:
        """``cot``, ``coconut · stage 2 (2/3)``, ``dropout_grpo · grpo stage 4``."""
        if seg.kind == "cot":
            return seg.name if seg.name == "cot" else f"{seg.name} · cot"
        segs = [s for s in pl_module.segments if s.phase_index == seg.phase_index]
        kind = "" if seg.name == seg.kind else f"{seg.kind} "
        if len(segs) > 1:
            return f"{seg.name} · {kind}stage {seg.stage} ({segs.index(seg) + 1}/{len(segs)})"
        return f"{seg.name} · {kind}stage {seg.stage}"

    def _rate(self, kind: str) -> float | None:
        t = self._kind_time.get(kind)
        return t[0] / t[1] if t and t[1] else None

    def time_left(self, pl_module) -> tuple[float | None, float | None]:
        """(seconds left in the phase, seconds left in the run), from the measured seconds per step of
        each phase kind (a kind not yet run: the mean over all steps so far)."""
        step = pl_module.step_count
        all_t = [sum(v[0] for v in self._kind_time.values()), sum(v[1] for v in self._kind_time.values())]
        mean = all_t[0] / all_t[1] if all_t[1] else None
        seg = pl_module.segment
        p0, p1 = self._phase_span(pl_module, seg)
        phase_left = run_left = 0.0
        for s in pl_module.segments:
            n = max(s.end - max(s.start, step), 0)
            if not n:
                continue
            r = self._rate(s.kind) or mean
            if r is None:
                return None, None
            run_left += n * r
            if p0 <= s.start < p1:
                phase_left += n * r
        return phase_left, run_left

    def metrics_text(self, trainer, seg) -> str:
        m = trainer.callback_metrics
        parts = []
        for tag, label, f in (GRPO_METRICS if seg.kind == "grpo" else SFT_METRICS):
            v = _value(m, tag)
            if v is not None:
                parts.append(f"{label} {f.format(v)}" + (f"/{seg.batch_size}" if label == "kept" else ""))
        if self._val is not None:
            parts.append(f"val pass@1 {self._val[0]:.3f} @{self._val[1]}")
        return "  ".join(parts)

    # -- training ------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()
        self._kind_time, self._last_seg, self._val = {}, None, None
        self._start_live()
        self._refresh(trainer, pl_module, force_line=False)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_t0 = time.perf_counter()
        # A new phase / stage is announced when its first step starts (after the phase-end evaluations).
        seg = pl_module.segment if hasattr(pl_module, "segments") else None
        if seg is not None and self._enabled and (seg.phase_index, seg.stage, seg.start) != self._last_seg:
            self._last_seg = (seg.phase_index, seg.stage, seg.start)
            if self._progress is None and pl_module.step_count < pl_module.total_steps:
                print(f"▶ {self.describe(pl_module, seg)}: steps {seg.start}-{seg.end} of {pl_module.total_steps}",
                      flush=True)
            else:
                self._refresh(trainer, pl_module, False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._batch_t0 is not None and pl_module.step_count > 0:
            from .schedule import locate

            kind = locate(pl_module.segments, pl_module.step_count - 1).kind
            t = self._kind_time.setdefault(kind, [0.0, 0])
            t[0] += time.perf_counter() - self._batch_t0
            t[1] += 1
        self._batch_t0 = None
        step = pl_module.step_count
        last_of_seg = any(s.end == step for s in pl_module.segments)
        self._refresh(trainer, pl_module, force_line=step % self.every == 0 or last_of_seg)

    def _refresh(self, trainer, pl_module, force_line: bool) -> None:
        if not self._enabled or not hasattr(pl_module, "segments"):
            return
        step, total = pl_module.step_count, pl_module.total_steps
        from .schedule import locate

        seg = locate(pl_module.segments, max(step - 1, 0))  # the segment of the step just done
        if self._last_seg is not None and step < total and self._progress is not None:
            seg = pl_module.segment  # live: show the segment that runs next
        p0, p1 = self._phase_span(pl_module, seg)
        name = self.describe(pl_module, seg)
        elapsed = time.perf_counter() - self._t0
        phase_left, run_left = self.time_left(pl_module)
        info = self.metrics_text(trainer, seg)
        if self._progress is not None:
            self._task("phase", f"[bold]{name}[/]", p1 - p0, min(step, p1) - p0,
                       time=f"phase, ~{fmt_seconds(phase_left)} left", info=info)
            self._task("run", "run", total, step, time=f"{fmt_seconds(elapsed)} • ~{fmt_seconds(run_left)} left")
        elif force_line:
                print(f"[{name}] step {min(step, p1) - p0}/{p1 - p0} | run {step}/{total} "
                      f"({100 * step / max(total, 1):.0f}%) | {fmt_seconds(elapsed)} elapsed, "
                      f"~{fmt_seconds(run_left)} left" + (f" | {info}" if info else ""), flush=True)

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop_live()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._stop_live()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._stop_live()

    # -- Lightning's evaluation loops -----------------------------------------------------------------
    def _loop_start(self, key: str, total) -> None:
        self._start_live()
        self._task(key, key, total)
        self._eval_t0 = time.perf_counter()

    def _loop_advance(self, key: str) -> None:
        if self._progress is not None and key in self._tasks:
            self._progress.advance(self._tasks[key])

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._loop_start("validation", self.total_val_batches)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._loop_advance("validation")

    def on_validation_end(self, trainer, pl_module) -> None:
        self._drop("validation")
        v = _value(trainer.callback_metrics, "val/pass@1")
        if trainer.sanity_checking or v is None:
            return
        step = getattr(pl_module, "step_count", trainer.global_step)
        self._val = (v, step)
        n = _value(trainer.callback_metrics, "val/n")
        line = (f"validation at step {step}: pass@1 {v:.3f}" + (f" (n={int(n)})" if n is not None else "")
                + f", {time.perf_counter() - self._eval_t0:.1f} s")
        self.print(line) if self._progress is not None else print(line, flush=True)
        if trainer.state.fn != "fit":
            self._stop_live()

    def on_test_start(self, trainer, pl_module) -> None:
        self._loop_start("test", sum(trainer.num_test_batches) if trainer.num_test_batches else None)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._loop_advance("test")

    def on_test_end(self, trainer, pl_module) -> None:
        self._stop_live()

    def on_predict_start(self, trainer, pl_module) -> None:
        self._loop_start("predict", sum(trainer.num_predict_batches) if trainer.num_predict_batches else None)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._loop_advance("predict")

    def on_predict_end(self, trainer, pl_module) -> None:
        self._stop_live()

    # -- phase-end evaluations (PhaseSummary, outside Lightning's loops) ------------------------------
    def eval_begin(self, title: str, total: int) -> None:
        """A phase-end evaluation of ``total`` problems starts."""
        if not self._enabled:
            return
        self._eval = {"title": title, "total": total, "done": 0, "t0": time.perf_counter()}
        self._task("eval", f"eval {title}", total)

    def eval_advance(self, n: int) -> None:
        if self._eval is None:
            return
        self._eval["done"] += n
        if self._progress is not None and "eval" in self._tasks:
            self._progress.advance(self._tasks["eval"], n)

    def eval_end(self, result: str = "", val_pass1: float | None = None, step: int | None = None) -> None:
        if self._eval is None:
            return
        e, self._eval = self._eval, None
        self._drop("eval")
        if val_pass1 is not None and step is not None:
            self._val = (val_pass1, step)
        line = f"eval {e['title']}: {e['done']} problems, {time.perf_counter() - e['t0']:.1f} s" + \
            (f" | {result}" if result else "")
        self.print(line) if self._progress is not None else print(line, flush=True)
