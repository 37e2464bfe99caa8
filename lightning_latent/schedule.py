"""The phase schedule: which phases a run trains, in which order, for how many steps.

A schedule is a list of :class:`Phase`; it is flattened into :class:`Segment` s, one per (phase,
stage). :class:`Schedule` holds the segments and the step counter, which alone says where a run is
(phase, stage, step in stage): that is what makes ``--ckpt_path`` resume at the exact place a run
stopped, and what the data module's plan of records is computed from (:meth:`Schedule.data_plan`).
:class:`PlateauWatch` ends a segment early once validation stops improving.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import logging

import torch

log = logging.getLogger("lightning_latent")

PhaseKind = Literal["cot", "coconut", "grpo", "sft"]


@dataclass
class PlateauRule:
    """Train a segment until validation pass@1 stops improving (the phase's ``steps`` is then the cap).

    Every ``every`` steps the model is evaluated greedily on the validation split; the segment ends when
    ``patience`` evaluations in a row have not beaten the best so far by at least ``min_gain``
    (absolute pass@1), but never before ``min_steps``. Each stage of a ``coconut`` phase is judged on
    its own.

    ``restore_best``: when the rule ends a segment, put back the weights of its best evaluation (the
    last one that set a new best) instead of keeping the last weights. A curve that swings between
    evaluations (the fully latent stage at lr 1e-3 moves 8-18 points in 250 steps) would otherwise hand
    the next phase whatever the last swing left. A segment that runs to its cap keeps its last weights.
    """

    every: int = 100
    patience: int = 3
    min_gain: float = 0.01
    min_steps: int = 0
    restore_best: bool = False

    def __post_init__(self) -> None:
        if self.every < 1 or self.patience < 1 or self.min_gain < 0 or self.min_steps < 0:
            raise ValueError(f"plateau={self}: every and patience must be >= 1, min_gain and min_steps >= 0")


@dataclass
class Decay:
    """The end of a segment: after its constant learning rate (its ``steps``, or fewer when its plateau
    rule fires), ``steps`` more steps whose learning rate falls linearly to ``floor``, the last one at it;
    then the segment ends. The curve is torch's ``LinearLR`` (``end_factor = floor / lr``) stepped before
    each step, computed from the step counter (so a resumed run needs no scheduler state)."""

    steps: int = 1000
    floor: float = 1e-5

    def __post_init__(self) -> None:
        if self.steps < 1 or not self.floor > 0:
            raise ValueError(f"decay={self}: steps must be >= 1 and floor > 0")


class PlateauTracker:
    """The plateau rule's state within one segment: the best value and the evaluations since it."""

    def __init__(self, rule: PlateauRule):
        self.rule, self.best, self.since_best = rule, float("-inf"), 0
        self.improved = False  # whether the last evaluation set a new best

    def update(self, value: float, steps_done: int) -> bool:
        """Record one evaluation; True when the segment should end here."""
        self.improved = value >= self.best + self.rule.min_gain
        if self.improved:
            self.best, self.since_best = value, 0
        else:
            self.since_best += 1
        return self.since_best >= self.rule.patience and steps_done >= self.rule.min_steps


class PlateauWatch:
    """The plateau rule over a whole schedule: when a segment is due for an evaluation, its tracker, every
    evaluation so far (the learning curves, saved in checkpoints and in ``summary.json``) and, with
    ``restore_best``, a CPU copy of the weights of the segment's best evaluation so far."""

    def __init__(self) -> None:
        self.index: int | None = None  # the segment the tracker belongs to
        self.tracker: PlateauTracker | None = None
        self.history: list[dict] = []
        self.best_state: dict | None = None
        self.best_step: int | None = None

    @staticmethod
    def due(seg: "Segment", step: int) -> bool:
        """After ``step`` completed steps: is this an evaluation step of ``seg``'s plateau rule?"""
        done = step - seg.start
        return seg.plateau is not None and done % seg.plateau.every == 0 and step < seg.end and done < seg.decay_after

    def record(self, schedule: "Schedule", seg: "Segment", value: float, n: int, model: torch.nn.Module) -> bool:
        """One evaluation of ``seg`` after ``schedule.step`` steps (validation pass@1 ``value`` over ``n``
        problems). Returns True when the segment ends here: its length is then set to the steps done (later
        segments move up) and, with ``restore_best``, ``model`` gets the weights of its best evaluation."""
        index, step = schedule.segments.index(seg), schedule.step
        done = step - seg.start
        if self.index != index:
            self.index, self.tracker = index, PlateauTracker(seg.plateau)
            self.best_state = self.best_step = None
        self.history.append({"phase": seg.name, "stage": seg.stage, "step": step, "steps_in_stage": done,
                             "val_pass@1": value, "val_n": n})
        ended = self.tracker.update(value, done)
        if seg.plateau.restore_best and self.tracker.improved:
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self.best_step = step
        if not ended:
            return False
        schedule.end_segment(index, done)
        log.info("%s stage %d %s at its plateau after %d steps (best validation pass@1 %.3f)", seg.name, seg.stage,
                 "starts its decay" if seg.decay else "ends", done, self.tracker.best)
        if seg.plateau.restore_best and self.best_state is not None:
            model.load_state_dict(self.best_state)
            self.history[-1]["restored_step"] = self.best_step
            log.info("%s stage %d: restored the weights of step %d (validation pass@1 %.3f)", seg.name,
                     seg.stage, self.best_step, self.tracker.best)
            self.best_state = None
        return True

    def state_dict(self) -> dict:
        t = self.tracker
        return {"index": self.index, "best": None if t is None else t.best,
                "since_best": None if t is None else t.since_best, "history": list(self.history),
                "best_state": self.best_state, "best_step": self.best_step}

    def load_state_dict(self, state: dict, segments: list["Segment"]) -> None:
        self.history = list(state.get("history", []))
        self.index = state.get("index")
        if self.index is not None:
            self.tracker = PlateauTracker(segments[self.index].plateau)
            self.tracker.best, self.tracker.since_best = state["best"], state["since_best"]
        self.best_state, self.best_step = state.get("best_state"), state.get("best_step")


@dataclass
class Phase:
    """One phase.

    kind: ``cot`` (stage 0, plain chain of thought, no latent markers), ``coconut`` (the latent
    curriculum: ``steps`` per stage over ``stages``; a list gives each stage its own, e.g. the fully
    latent stage longer than the others, which is where a curriculum spends its time), ``grpo`` (RL
    post-training at the final stage) or ``sft`` (supervised latent training at the final stage: the
    ``sft_continue`` control arm).
    name: label in logs and the summary (defaults to the kind).
    stages: coconut stages (default 1 .. max_latent_stage + 1; the last removes every language step);
    for grpo / sft the single stage trained (default max_latent_stage + 1).
    batch_size: records per step on each rank (grpo: prompts per step; None: the module's ``batch_size``
        or ``grpo_prompts``).
    lr: learning rate of this phase (None: ``optim.lr``, or ``optim.grpo_lr`` for grpo).
    plateau: end each of the phase's segments early once validation pass@1 stops improving
        (:class:`PlateauRule`; ``steps`` is then the cap). None: exactly ``steps`` steps.
    decay: each of the phase's segments ends with a linear learning-rate decay (:class:`Decay`) after its
        constant part (``steps``, or where its plateau rule fired). None: no decay.
    """

    kind: PhaseKind
    steps: int | list[int] = 100
    name: str | None = None
    stages: list[int] | None = None
    batch_size: int | None = None
    lr: float | None = None
    plateau: PlateauRule | None = None
    decay: Decay | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("cot", "coconut", "grpo", "sft"):
            raise ValueError(f"schedule kind={self.kind!r} is unknown; choose cot, coconut, grpo or sft")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"schedule ({self.label}) batch_size={self.batch_size} must be >= 1")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"schedule ({self.label}) lr={self.lr} must be > 0")
        steps = self.steps if isinstance(self.steps, (list, tuple)) else [self.steps]
        if any(int(n) < 0 for n in steps):
            raise ValueError(f"schedule ({self.label}) steps={self.steps} must be >= 0")
        if isinstance(self.plateau, dict):
            self.plateau = PlateauRule(**self.plateau)
        if isinstance(self.decay, dict):
            self.decay = Decay(**self.decay)
        if self.decay is not None and self.kind == "grpo":
            raise ValueError(f"schedule ({self.label}): a decay is for supervised phases (cot, coconut, sft)")

    @property
    def label(self) -> str:
        return self.name or self.kind


@dataclass
class Segment:
    phase_index: int
    name: str
    kind: PhaseKind
    stage: int
    steps: int
    start: int  # global step at which it starts
    batch_size: int
    lr: float
    first_of_phase: bool = False
    last_of_phase: bool = False
    plateau: PlateauRule | None = None
    decay: Decay | None = None
    decay_after: int = 1 << 62  # steps into the segment at which its decay starts (no decay: never)

    @property
    def end(self) -> int:
        return self.start + self.steps

    def lr_at(self, step: int) -> float:
        """The learning rate of global step ``step`` (in this segment): ``lr``, then along its decay."""
        into_decay = step - self.start - self.decay_after + 1
        if self.decay is None or into_decay < 1:
            return self.lr
        return self.lr + (self.decay.floor - self.lr) * min(into_decay, self.decay.steps) / self.decay.steps

    @property
    def cot_layout(self) -> bool:
        """Whether prompts and examples use the CoT phase's layout (no latent markers): the CoT phase,
        and GRPO / supervised phases at stage 0 (GRPO on a CoT model, the ``cot_grpo`` arm)."""
        return uses_cot_layout(self.kind, self.stage)


def uses_cot_layout(kind: str, stage: int) -> bool:
    """:attr:`Segment.cot_layout` of a segment of this kind at this stage (also for a checkpoint's record)."""
    return kind == "cot" or (stage == 0 and kind in ("grpo", "sft"))


def place_mismatch(state: dict, segment: Segment) -> str | None:
    """Why a checkpoint's recorded place (``schedule_state``: the stage and layout of its next step) differs
    from ``segment``, where the configured schedule puts that step; None when they agree (or the record is
    too old to say). Evaluation runs at the segment's stage and layout, so a checkpoint given a schedule other
    than its own, e.g. a start trained longer by its own one-phase schedule, tested under the full
    curriculum's, would be scored at the wrong stage: 1,000 steps into the curriculum is its CoT phase."""
    if "stage" not in state or "kind" not in state:
        return None
    saved = (int(state["stage"]), uses_cot_layout(state["kind"], int(state["stage"])))
    if saved == (segment.stage, segment.cot_layout):
        return None
    def layout(cot: bool) -> str:
        return "the CoT layout" if cot else "the latent layout"
    return (f"the checkpoint was saved at step {state.get('step_count')} of its phase {state.get('phase')!r} "
            f"(stage {saved[0]}, {layout(saved[1])}), but the configured schedule puts that step in "
            f"{segment.name!r} (stage {segment.stage}, {layout(segment.cot_layout)}): give the schedule it was "
            f"trained with (its run's config.yaml), or start from its weights with --model.init_from")


def default_schedule() -> list[Phase]:
    """The embedded default: CoT, the latent curriculum (3 stages: the 3-step synthetic problems end
    fully latent), then Dropout-GRPO. Balanced so that the latent model is trained before RL within about
    10 minutes on 2 CPU cores (docs/results/plateau/: the fully latent stage is where the steps go)."""
    return [Phase("cot", steps=700), Phase("coconut", steps=[200, 300, 800], stages=[1, 2, 3]),
            Phase("grpo", steps=40, name="dropout_grpo")]


def final_stage(max_latent_stage: int) -> int:
    """The stage past the curriculum's last, with every language step removed: where GRPO and supervised phases
    train when given no stage."""
    return max_latent_stage + 1


def flatten(phases: list[Phase], max_latent_stage: int, default_batch: dict[str, int], default_lr: dict[str, float]
            ) -> list[Segment]:
    """Phases -> segments with absolute start steps; checks the stages against the curriculum."""
    if not phases:
        raise ValueError("schedule is empty: give at least one phase")
    segs: list[Segment] = []
    start = 0
    final = final_stage(max_latent_stage)
    for i, ph in enumerate(phases):
        if ph.kind == "cot":
            stages = [0]
        elif ph.kind == "coconut":
            stages = list(ph.stages) if ph.stages else list(range(1, final + 1))
        else:
            stages = list(ph.stages) if ph.stages else [final]
            if len(stages) != 1:
                raise ValueError(f"schedule[{i}] ({ph.kind}) trains one stage, got stages={stages}")
        for s in stages:
            if s < 0:
                raise ValueError(f"schedule[{i}].stages contains {s}; stages are >= 0")
        per_stage = [int(n) for n in ph.steps] if isinstance(ph.steps, (list, tuple)) else [int(ph.steps)] * len(stages)
        if len(per_stage) != len(stages):
            raise ValueError(f"schedule[{i}].steps={ph.steps} gives {len(per_stage)} step counts for "
                             f"{len(stages)} stages {stages}; give one per stage or a single number")
        group = "grpo" if ph.kind == "grpo" else "sft"
        for j, s in enumerate(stages):
            n = per_stage[j]
            seg = Segment(i, ph.label, ph.kind, s, n, start, ph.batch_size or default_batch[group],
                          ph.lr if ph.lr is not None else default_lr[group], j == 0, j == len(stages) - 1,
                          ph.plateau)
            if ph.decay is not None:  # the constant part, then the decay's steps
                seg.decay, seg.decay_after, seg.steps = ph.decay, n, n + ph.decay.steps
            segs.append(seg)
            start += seg.steps
    return segs


def locate(segments: list[Segment], step: int) -> Segment:
    """The segment holding global step ``step`` (the last one once the schedule is done)."""
    for s in segments:
        if s.start <= step < s.end:
            return s
    return segments[-1]


class DataPlan(NamedTuple):
    """What the datamodule must serve next on this rank."""

    batch_size: int  # records per step
    steps_left: int  # steps left in the current segment
    consumed: int  # records this rank has consumed so far (where the stream resumes)


def data_plan(segments: list[Segment], step: int) -> DataPlan:
    """The plan at global step ``step``: the segment's batch size and remaining steps, and how many
    records the segments before it (and this one so far) consumed."""
    seg = locate(segments, step)
    consumed = sum(s.steps * s.batch_size for s in segments if s.end <= step)
    if seg.start <= step < seg.end:  # (a finished schedule: every segment is counted above)
        consumed += (step - seg.start) * seg.batch_size
    return DataPlan(seg.batch_size, max(seg.end - step, 0), consumed)


def set_lengths(segments: list[Segment], lengths: list[int]) -> int:
    """Give the segments these step counts (a segment ended early by its plateau rule, or a resumed run
    re-applying them) and recompute every start; returns the new total."""
    if len(lengths) != len(segments):
        raise ValueError(f"{len(lengths)} segment lengths for a schedule of {len(segments)} segments")
    k = 0
    for s, n in zip(segments, lengths):
        s.start, s.steps = k, int(n)
        k += s.steps
    return k


class Schedule:
    """The run's segments and its step counter (completed schedule steps): where the run is.

    The module owns it and hands it to the data module once (``LatentDataModule.follow``), which builds
    each training loader from :meth:`data_plan`; everything that changes where the run is (a step done,
    a segment ended by its plateau rule, a resume, ``fast_dev_run``) changes it in place, so both see the
    same state without calling each other."""

    def __init__(self, segments: list[Segment]):
        self.segments = segments
        self.step = 0
        # The step at which the current loader's epoch ends early (a segment ended or shortened by its plateau
        # rule: the loader's remaining batches are not used); None: when the loader runs out.
        self.epoch_end: int | None = None

    @property
    def epoch_over(self) -> bool:
        return self.epoch_end is not None and self.step >= self.epoch_end

    @property
    def total(self) -> int:
        return self.segments[-1].end

    @property
    def finished(self) -> bool:
        return self.step >= self.total

    @property
    def segment(self) -> Segment:
        """The segment of the next step (the last one once the schedule is done)."""
        return locate(self.segments, self.step)

    def data_plan(self) -> DataPlan:
        return data_plan(self.segments, self.step)

    def end_segment(self, index: int, steps: int) -> None:
        """Segment ``index``'s plateau rule fired after ``steps`` steps: it ends there, or with a decay it
        decays from there on; later segments move up."""
        seg = self.segments[index]
        lengths = [s.steps for s in self.segments]
        if seg.decay is not None:
            seg.decay_after, lengths[index] = steps, steps + seg.decay.steps
        else:
            lengths[index] = steps
        set_lengths(self.segments, lengths)
        self.epoch_end = seg.end

    def set_lengths(self, lengths: list[int]) -> None:
        set_lengths(self.segments, lengths)

    def state_dict(self) -> dict:
        """What a checkpoint records of where the run is (``schedule_state``): the step counter (what a
        resume restores), the segment lengths (plateau-shortened stages), and for readers the place."""
        seg = self.segment
        state = {"step_count": self.step, "phase": seg.name, "kind": seg.kind, "stage": seg.stage,
                 "step_in_stage": self.step - seg.start, "segment_steps": [s.steps for s in self.segments]}
        if any(s.decay is not None for s in self.segments):
            state["decay_after"] = [s.decay_after for s in self.segments]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume: the step counter, and the segments that a plateau rule ended early keep that length
        (the command line decides every other length, so a resumed run may be given a longer phase)."""
        self.step = int(state["step_count"])
        saved = state.get("segment_steps", ())
        if len(saved) == len(self.segments):  # a checkpoint of the same schedule
            for seg, after in zip(self.segments, state.get("decay_after") or [None] * len(saved)):
                if seg.decay is not None and after is not None and seg.plateau is not None:
                    seg.decay_after = min(after, seg.decay_after)  # where its plateau rule started the decay
            set_lengths(self.segments, [min(n, s.steps) if s.plateau is not None else s.steps
                                        for s, n in zip(self.segments, saved)])

    def shrink_to_one_step(self) -> None:
        """``fast_dev_run``: one step of every segment that has any."""
        set_lengths(self.segments, [1 if s.steps > 0 else 0 for s in self.segments])
