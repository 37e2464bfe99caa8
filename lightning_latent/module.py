"""The LightningModule: one schedule of phases (CoT, the latent curriculum, GRPO), as glue.

Each job lives in its own module and this file calls it: where the run is (:mod:`.schedule`), the
optimiser's per-segment settings and guarded step (:mod:`.optim`), a supervised step's loss
(:mod:`.supervised`), rollouts (:mod:`.rl.rollout`), the GRPO update (:mod:`.rl.update`), the frozen
reference (:mod:`.rl.reference`), the guards (:mod:`.guards`), answering (:mod:`.evaluation`).
Optimisation is manual because a GRPO step makes ``mu`` optimiser steps on one rollout batch
(docs/design.md#ddp). A GRPO step flows one way: rollouts -> :func:`~.rl.update.grpo_update` (which
loops over the inner iterations and steps the optimiser it is given) -> what this module logs.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import replace

import lightning as L
import torch

from .config_types import coerce
from .data.layout import CurriculumConfig
from .data.records import Record
from .data.sources import SKIPS
from .data.synthetic import DEFAULT_SYNTHETIC, SyntheticConfig
from .distributed import mean_over_ranks, no_ddp_grad_sync
from .evaluation import EvalConfig, EvalMetrics, Evaluator, count_correct, prediction_rows
from .guards import CollapseGuard, NonFiniteGuard, stop_on_collapse, stop_on_nonfinite
from .model.build import ModelConfig, build_latent_model, tokenizer_to_bytes
from .model.perturb import PerturbConfig, Perturber
from .optim import GuardedOptimizer, NonFiniteStop, OptimConfig, enter_segment
from .rl.reference import Reference
from .rl.rewards import get_reward
from .rl.rollout import rollout, rollout_seed, rollout_stats
from .rl.update import GRPOConfig, grpo_update
from .schedule import Phase, PlateauWatch, Schedule, Segment, default_schedule, flatten, place_mismatch
from .supervised import supervised_loss

log = logging.getLogger("lightning_latent")


class LatentReasoner(L.LightningModule):
    """Coconut model + mask sampler + GRPO loss, trained through a schedule of phases. Every default is
    its config class's (docs/design.md#settings).

    Args:
        backbone: the base LM (GPT-2 from scratch by default, or any HF causal LM).
        curriculum: the Coconut curriculum (c, max latent stage, baselines).
        schedule: the phases to run, in order (None: :func:`~.schedule.default_schedule`).
        perturb: the rollout perturbation (arm, p, sites, scope).
        grpo: GRPO settings (defaults: the synthetic recipe). optim: optimiser settings.
        evaluation: evaluation settings.
        batch_size: records per supervised step on each rank (phases may override).
        grpo_prompts: prompts per GRPO step on each rank (phases may override): 32 x K=4 = 128 rollouts.
        max_length: longest training example (longer ones are skipped and counted).
        init_from: start from these weights: a lightning-latent ``.ckpt``, a reference Coconut ``.pt``
            (``base_causallm.*``) or an HF folder / hub id.
        synthetic: synthetic-task settings (fix the word-level tokenizer's vocabulary).
        seed: the run's seed (rollout seeds and curriculum sampling derive from it).
        task: the data task (linked from ``--data.task``): a from-scratch model gets its word vocabulary.
    """

    def __init__(
        self,
        backbone: ModelConfig = ModelConfig(),
        curriculum: CurriculumConfig = CurriculumConfig(),
        schedule: list[Phase] | None = None,
        perturb: PerturbConfig = PerturbConfig(),
        grpo: GRPOConfig = GRPOConfig(),
        optim: OptimConfig = OptimConfig(),
        evaluation: EvalConfig = EvalConfig(),
        batch_size: int = 64,
        grpo_prompts: int = 32,
        max_length: int = 256,
        init_from: str | None = None,
        synthetic: SyntheticConfig = DEFAULT_SYNTHETIC,
        seed: int = 0,
        task: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.backbone_cfg, self.curriculum = coerce(ModelConfig, backbone), coerce(CurriculumConfig, curriculum)
        self.perturb_cfg, self.grpo_cfg = coerce(PerturbConfig, perturb), coerce(GRPOConfig, grpo)
        self.optim_cfg, self.eval_cfg = coerce(OptimConfig, optim), coerce(EvalConfig, evaluation)
        phases = default_schedule() if schedule is None else [coerce(Phase, p) for p in schedule]
        if batch_size < 1 or grpo_prompts < 1:
            raise ValueError(f"batch_size={batch_size} and grpo_prompts={grpo_prompts} must be >= 1")
        self.seed = seed
        self.schedule = Schedule(flatten(phases, self.curriculum.max_latent_stage,
                                         {"sft": batch_size, "grpo": grpo_prompts},
                                         {"sft": self.optim_cfg.lr, "grpo": self.optim_cfg.grpo_lr}))
        self.tokenizer, self.layout, self.model = build_latent_model(
            self.backbone_cfg, self.curriculum, max_length, coerce(SyntheticConfig, synthetic), task, init_from)
        self.perturber = Perturber(self.model.lm, self.perturb_cfg)  # rollouts, replays (and the reference's own)
        train_masks = self.perturb_cfg.for_training()  # supervised phases: perturb.p_train, one mask per sequence
        self.train_perturber = Perturber(self.model.lm, train_masks) if train_masks is not None else None
        eval_perturber = Perturber(self.model.lm, self.eval_cfg.perturb) if self.eval_cfg.perturb else self.perturber
        self.reward_fn = get_reward(self.grpo_cfg.reward)
        if self.eval_cfg.temperature is None:  # the k samples under the arm's own answer noise
            self.eval_cfg = replace(self.eval_cfg, temperature=self.rollout_temperature)
        self.evaluator = Evaluator(self.model, self.layout, self.tokenizer, self.eval_cfg, eval_perturber,
                                   self.reward_fn, seed)
        self.reference: Reference | None = None  # the frozen GRPO reference (not a submodule)
        self._reference_state: dict | None = None
        self.nonfinite = NonFiniteGuard(self.optim_cfg.max_bad_steps)
        self.collapse = CollapseGuard(self.grpo_cfg.collapse_patience)
        self.plateau = PlateauWatch()
        self.val_metrics, self.test_metrics = EvalMetrics(self.eval_cfg.k), EvalMetrics(self.eval_cfg.k)
        self.automatic_optimization = False
        self.predictions: list[dict] = []

    # -- where the run is: the schedule's state, under the names callbacks and scripts read ----------------
    step_count = property(lambda self: self.schedule.step, lambda self, v: setattr(self.schedule, "step", v),
                          doc="Completed schedule steps: what a resume restores.")
    segments = property(lambda self: self.schedule.segments)
    total_steps = property(lambda self: self.schedule.total)
    segment = property(lambda self: self.schedule.segment, doc="The segment of the next step.")

    def eval_stage(self) -> tuple[int, bool]:
        """(stage, CoT layout?) at which the model is evaluated now."""
        return self.segment.stage, self.segment.cot_layout

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.trainer.fast_dev_run:
            # One batch of every phase (every segment), one fit-loop epoch per segment.
            self.schedule.shrink_to_one_step()
            self.trainer.fit_loop.max_epochs = len(self.segments)
            self.trainer.fit_loop.epoch_loop.max_steps = -1
        dm = getattr(self.trainer, "datamodule", None)
        if hasattr(dm, "follow"):  # the data module plans its training loaders from the schedule
            dm.follow(self.schedule)
        if self.reference is not None:
            self.reference.to(self.device)

    def _stop_if_finished(self) -> bool:
        if self.schedule.finished:
            self.trainer.should_stop = True
        return self.schedule.finished

    def on_train_start(self) -> None:
        if self._stop_if_finished():
            log.warning("the schedule is already complete (%d steps): nothing to train", self.total_steps)

    def on_train_batch_start(self, batch, batch_idx: int) -> int | None:
        # -1 ends Lightning's epoch: a segment ended (or shortened) by its plateau rule; the next epoch's
        # loader serves the next segment (Schedule.data_plan).
        return -1 if self.schedule.epoch_over else None

    def on_train_epoch_start(self) -> None:
        self.schedule.epoch_end = None

    # -- training ----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.optim_cfg
        return torch.optim.AdamW(self.model.parameters(), lr=o.lr, weight_decay=o.weight_decay, betas=o.betas)

    def training_step(self, batch: list[Record], batch_idx: int) -> None:
        no_ddp_grad_sync(self.trainer.strategy.model)  # GuardedOptimizer.step all-reduces the gradients
        seg = self.schedule.segment
        optimizer = self._enter_segment(seg, batch)
        try:
            if seg.kind == "grpo":
                self._grpo_step(batch, seg, optimizer)
            else:
                self._sft_step(batch, seg, optimizer)
        except NonFiniteStop:
            stop_on_nonfinite(self.trainer, self.nonfinite, self.step_count, optimizer.batch_ids)
        finally:
            if optimizer.skipped:  # (each skip was logged as a warning, with the step and the batch)
                self.log("train/nonfinite_skips", float(optimizer.last_skip_count))
        self.schedule.step += 1
        self._plateau_check(seg)
        self.log("train/stage", float(seg.stage))
        self.log("train/phase_index", float(seg.phase_index))
        self._stop_if_finished()

    def _enter_segment(self, seg: Segment, batch: list[Record]) -> GuardedOptimizer:
        """The segment's learning rate, weight decay and trainable parameters, the base model's dropout
        (supervised phases only: rollouts and replays must be deterministic) and, in GRPO, its reference."""
        is_grpo = seg.kind == "grpo"
        optimizer = enter_segment(self.optimizers(), self.optim_cfg, seg, self.step_count, self.model,
                                  self.grpo_cfg.trainable if is_grpo else None, self.nonfinite,
                                  [r.idx for r in batch][:8])
        self.model.set_base_dropout(not is_grpo and self.backbone_cfg.dropout > 0)
        if is_grpo and seg.first_of_phase and self.step_count == seg.start:  # a new GRPO phase: a new reference
            self._reference_state, self.reference = None, None
        if is_grpo and self.grpo_cfg.beta > 0 and self.reference is None:
            self.reference = Reference(self.model, self.perturb_cfg, self._reference_state)
            self._reference_state = self.reference.state
        return optimizer

    def _sft_step(self, records: list[Record], seg: Segment, optimizer: GuardedOptimizer) -> None:
        rng = random.Random(f"{self.seed}/{self.step_count}/{self.global_rank}")
        loss = supervised_loss(self.model, self.layout, records, seg.stage, seg.cot_layout, rng, self.device,
                               self.train_perturber, self.seed, self.step_count, SKIPS)
        optimizer.zero_grad()
        self.manual_backward(loss)
        stepped, grad_norm = optimizer.step(loss.detach())
        self.log("train/loss", loss.detach(), prog_bar=True)
        self.log(f"train/{seg.name}/loss", loss.detach())
        if seg.decay is not None:  # (the learning rate moves only in a decay)
            self.log("train/lr", seg.lr_at(self.step_count))
        if stepped:
            self.log("train/grad_norm", grad_norm)

    @property
    def rollout_temperature(self) -> float:
        """Answers are sampled at ``grpo.answer_temperature`` unless the arm decodes greedily."""
        return 0.0 if self.perturb_cfg.arm_entry.greedy_answers else self.grpo_cfg.answer_temperature

    def _grpo_step(self, records: list[Record], seg: Segment, optimizer: GuardedOptimizer) -> None:
        cfg, k = self.grpo_cfg, self.grpo_cfg.group_size
        t0 = time.perf_counter()
        self.model.eval()
        seeds = torch.tensor([rollout_seed(self.seed, self.step_count, r.idx, j) for r in records for j in range(k)],
                             dtype=torch.long)
        rb = rollout(self.model, self.perturber, self.layout, records, seg.stage, seeds, k,
                     self.rollout_temperature, cfg.max_new_tokens, self.reward_fn, self.tokenizer, seg.cot_layout)
        t1 = time.perf_counter()
        stats = mean_over_ranks(rollout_stats(rb, seconds=t1 - t0), self.device, summed=("perf/rollouts_per_s",))
        self.log_dict(stats)
        self.log("reward", stats["grpo/reward_mean"], prog_bar=True)
        stop_on_collapse(self.trainer, rb.rewards, stats, cfg, self.collapse, self.step_count, self.device)
        result = grpo_update(self.model, self.perturber, rb, cfg, self.rollout_temperature, self.reference,
                             optimizer, self.manual_backward)
        self.log_dict(result.log_values())
        if result.loss is not None:
            self.log("train/loss", result.loss, prog_bar=True)
            self.log("perf/rollout_share", (t1 - t0) / max(time.perf_counter() - t0, 1e-9))

    def _plateau_check(self, seg: Segment) -> None:
        """At a plateau evaluation step: greedy validation pass@1; the segment ends here once it has
        stopped improving (:class:`~.schedule.PlateauWatch`), and Lightning's epoch with it."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or self.trainer.fast_dev_run or not PlateauWatch.due(seg, self.step_count):
            return
        correct, n = count_correct(self.evaluator, dm.eval_records("validation"), seg.stage, seg.cot_layout,
                                   dm.eval_batch_size, self.device)
        self.log(f"plateau/{seg.name}/stage{seg.stage}/val_pass@1", correct / max(n, 1))
        self.plateau.record(self.schedule, seg, correct / max(n, 1), n, self.model)

    # -- evaluation -------------------------------------------------------------------------------------
    def _log_eval(self, prefix: str, metrics: EvalMetrics) -> None:
        for name, value in metrics.compute_and_reset(prefix, self.segment.name).items():
            self.log(name, value, sync_dist=False, prog_bar=name == f"{prefix}/pass@1")

    def validation_step(self, batch: list[Record], batch_idx: int) -> None:
        self.evaluator.evaluate(batch, *self.eval_stage(), self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val", self.val_metrics)

    def test_step(self, batch: list[Record], batch_idx: int) -> None:
        self.evaluator.evaluate(batch, *self.eval_stage(), self.test_metrics, self.predictions)

    def on_test_epoch_start(self) -> None:
        self.predictions = []

    def on_test_epoch_end(self) -> None:
        self._log_eval("test", self.test_metrics)

    def predict_step(self, batch: list[Record], batch_idx: int) -> list[dict]:
        preds, texts = self.evaluator.answer(batch, *self.eval_stage())
        return prediction_rows(batch, preds, texts, with_correct=False)

    # -- checkpoint state ------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tokenizer"] = tokenizer_to_bytes(self.tokenizer)
        checkpoint["schedule_state"] = {**self.schedule.state_dict(), "plateau": self.plateau.state_dict()}
        if self._reference_state is not None:
            checkpoint["grpo_reference"] = self._reference_state
        checkpoint["collapse_guard"] = self.collapse.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        st = checkpoint.get("schedule_state")
        if st is None:
            raise ValueError("checkpoint has no schedule_state: not written by lightning-latent")
        self.schedule.load_state_dict(st)
        if (why := place_mismatch(st, self.segment)) is not None:
            # evaluating at another stage than the model was trained for is a wrong number, not a warning;
            # a resumed fit may be given a longer phase, which can move a phase-end checkpoint's next step
            if self._trainer is not None and self._trainer.state.fn == "fit":
                log.warning("resuming: %s", why)
            else:
                raise ValueError(why)
        self.plateau.load_state_dict(st.get("plateau", {}), self.segments)
        self._reference_state, self.reference = checkpoint.get("grpo_reference"), None
        self.collapse.load_state_dict(checkpoint.get("collapse_guard", {}))
