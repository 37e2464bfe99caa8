"""The LightningModule: one schedule of phases (CoT, the latent curriculum, GRPO), as glue.

Each job lives in its own module and this file calls it: where a step is in the schedule
(:mod:`.schedule`), a supervised step's layout and loss (:mod:`.data.layout`), rollouts
(:mod:`.rl.rollout`), the GRPO update (:mod:`.rl.update`), the frozen reference (:mod:`.rl.reference`),
gradient all-reduce (:mod:`.distributed`), the non-finite guard (:mod:`.guards`), answering
(:mod:`.evaluation`). Optimisation is manual because a GRPO step makes ``mu`` optimiser steps on one
rollout batch (docs/design.md#ddp).
"""
from __future__ import annotations

import logging
import random
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from .configs import coerce
from .data.layout import IGNORE, CurriculumConfig, train_batch
from .data.records import Record
from .data.synthetic import DEFAULT_SYNTHETIC, SyntheticConfig
from .distributed import mean_over_ranks
from .evaluation import EvalConfig, EvalMetrics, Evaluator, count_correct, prediction_rows
from .guards import CollapseError, CollapseGuard, NonFiniteGuard, check_rollouts, stop_checkpoint
from .model.build import ModelConfig, build_latent_model, tokenizer_to_bytes
from .model.perturb import PerturbConfig, Perturber
from .model.trainable import trainable_masks
from .optim import OptimConfig, guarded_step
from .rl.reference import Reference
from .rl.rewards import get_reward
from .rl.rollout import RolloutBatch, rollout, rollout_seed, rollout_stats
from .rl.update import GRPOConfig, grpo_update
from .schedule import (DataPlan, Phase, PlateauWatch, Segment, data_plan, default_schedule, flatten, locate,
                       set_lengths, shrink_to_one_step)

log = logging.getLogger("lightning_latent")

# The GRPO recipe found by the recipe search on the synthetic task (issue 13, docs/results/recipe/): 32
# prompts x K=4 per step, mu=2, beta=0.01, lr 5e-5, every parameter trained. The module's defaults (and
# so the embedded default run and the synthetic configs) use it; GRPOConfig / OptimConfig keep their
# general-purpose defaults for other tasks, whose configs set their own (gsm8k/dropout_grpo.yaml).
RECIPE_GRPO = GRPOConfig(group_size=4, beta=0.01, mu=2)
RECIPE_OPTIM = OptimConfig(grpo_lr=5e-5)
RECIPE_PROMPTS = 32


class LatentReasoner(L.LightningModule):
    """Coconut model + mask sampler + GRPO loss, trained through a schedule of phases.

    Args:
        backbone: the base LM (GPT-2 from scratch by default, or any HF causal LM).
        curriculum: the Coconut curriculum (c, max latent stage, baselines).
        schedule: the phases to run, in order.
        perturb: the rollout perturbation (arm, p, sites, scope).
        grpo: GRPO settings.
        optim: optimiser settings.
        evaluation: evaluation settings.
        batch_size: records per step on each rank in supervised phases (phases may override).
        grpo_prompts: prompts per step on each rank in GRPO phases (phases may override).
        max_length: longest training example (longer ones are skipped and counted).
        init_from: start from these weights: a lightning-latent ``.ckpt``, a reference Coconut ``.pt``
            (``base_causallm.*``) or an HF folder / hub id.
        synthetic: synthetic-task settings (fix the word-level tokenizer's vocabulary).
        seed: the run's seed (rollout seeds and curriculum sampling derive from it).
        task: the data task (linked from ``--data.task`` by the CLI): a from-scratch model gets that
            task's word vocabulary (the task registry, data/tasks.py); None: the synthetic one.
    """

    def __init__(
        self,
        backbone: ModelConfig = ModelConfig(),
        curriculum: CurriculumConfig = CurriculumConfig(c_thought=1, max_latent_stage=3),
        schedule: list[Phase] | None = None,
        perturb: PerturbConfig = PerturbConfig(),
        grpo: GRPOConfig = RECIPE_GRPO,
        optim: OptimConfig = RECIPE_OPTIM,
        evaluation: EvalConfig = EvalConfig(),
        batch_size: int = 64,
        grpo_prompts: int = RECIPE_PROMPTS,
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
        synthetic = coerce(SyntheticConfig, synthetic)
        if isinstance(self.eval_cfg.perturb, dict):
            self.eval_cfg.perturb = PerturbConfig(**self.eval_cfg.perturb)
        schedule = default_schedule() if schedule is None else [coerce(Phase, p) for p in schedule]
        self.curriculum.validate()
        self.perturb_cfg.validate()
        self.grpo_cfg.validate()
        if batch_size < 1 or grpo_prompts < 1:
            raise ValueError(f"batch_size={batch_size} and grpo_prompts={grpo_prompts} must be >= 1")
        self.seed = seed
        self.segments = flatten(schedule, self.curriculum.max_latent_stage, {"sft": batch_size, "grpo": grpo_prompts},
                                {"sft": self.optim_cfg.lr, "grpo": self.optim_cfg.grpo_lr})
        self.total_steps = self.segments[-1].end

        self.tokenizer, self.layout, self.model = build_latent_model(self.backbone_cfg, self.curriculum, max_length,
                                                                     synthetic, task, init_from)
        lm = self.model.lm
        self.perturber = Perturber(lm, self.perturb_cfg)
        eval_perturber = Perturber(lm, self.eval_cfg.perturb) if self.eval_cfg.perturb is not None else self.perturber
        self.reward_fn = get_reward(self.grpo_cfg.reward)
        self.evaluator = Evaluator(self.model, self.layout, self.tokenizer, self.eval_cfg, eval_perturber,
                                   self.reward_fn, seed)
        self.reference: Reference | None = None  # the frozen GRPO reference (not a submodule)
        self._reference_state: dict | None = None
        self.step_count = 0  # completed schedule steps (what resume restores)
        self.nonfinite = NonFiniteGuard(self.optim_cfg.max_bad_steps)
        self.collapse = CollapseGuard(self.grpo_cfg.collapse_patience)
        self.plateau = PlateauWatch()
        self._end_epoch = False
        self.val_metrics, self.test_metrics = EvalMetrics(self.eval_cfg.k), EvalMetrics(self.eval_cfg.k)
        self.automatic_optimization = False
        self._grad_masks: list = []
        self.predictions: list[dict] = []

    # -- where are we ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.trainer.fast_dev_run:
            # One batch of every phase (every segment), one fit-loop epoch per segment.
            self.total_steps = shrink_to_one_step(self.segments)
            self.trainer.fit_loop.max_epochs = len(self.segments)
            self.trainer.fit_loop.epoch_loop.max_steps = -1
        if self.reference is not None:
            self.reference.to(self.device)

    @property
    def segment(self) -> Segment:
        return locate(self.segments, self.step_count)

    def data_plan(self) -> DataPlan:
        return data_plan(self.segments, self.step_count)

    def eval_stage(self) -> tuple[int, bool]:
        """(stage, CoT layout?) at which the model is evaluated now."""
        seg = self.segment
        return seg.stage, seg.cot_layout

    def on_train_start(self) -> None:
        if self.step_count >= self.total_steps:
            log.warning("the schedule is already complete (%d steps): nothing to train", self.total_steps)
            self.trainer.should_stop = True

    def on_train_epoch_end(self) -> None:
        if self.step_count >= self.total_steps:
            self.trainer.should_stop = True

    # -- optimiser -------------------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.optim_cfg
        return torch.optim.AdamW(self.model.parameters(), lr=o.lr, weight_decay=o.weight_decay, betas=o.betas)

    def _enter_segment(self, seg: Segment, opt) -> None:
        """Set lr / weight decay / trainable params for the segment; reset the optimiser at its start."""
        is_grpo = seg.kind == "grpo"
        warmup = self.optim_cfg.grpo_warmup_steps if is_grpo else 0
        lr = seg.lr * min(1.0, (self.step_count - seg.start + 1) / warmup) if warmup > 0 else seg.lr
        for group in opt.param_groups:
            group["lr"] = lr
            group["weight_decay"] = self.optim_cfg.grpo_weight_decay if is_grpo else self.optim_cfg.weight_decay
        self._grad_masks = trainable_masks(self.model, self.grpo_cfg.trainable if is_grpo else None)
        # Base dropout is for supervised phases only; rollouts and replays must be deterministic.
        self.model.set_base_dropout(not is_grpo and self.backbone_cfg.dropout > 0)
        if self.step_count == seg.start:
            opt.optimizer.state.clear() if hasattr(opt, "optimizer") else opt.state.clear()
            if is_grpo and seg.first_of_phase:  # a new GRPO phase: its reference is its own start
                self._reference_state, self.reference = None, None
        if is_grpo and self.grpo_cfg.beta > 0 and self.reference is None:
            self.reference = Reference(self.model, self.perturb_cfg, self._reference_state)
            self._reference_state = self.reference.state

    def _optimizer_step(self, opt, backward, ids: Any) -> tuple[bool, float, Tensor]:
        """:func:`~.optim.guarded_step`; a skipped (non-finite) update is logged, and too many in a row
        stop the run with a checkpoint of the last good weights."""
        ok, gn, loss = guarded_step(opt, list(self.model.parameters()), backward, self._grad_masks,
                                    self.optim_cfg.grad_clip, self.nonfinite)
        if not ok:
            self.log("train/nonfinite_skips", float(self.nonfinite.bad_steps))
            log.warning("non-finite loss or gradient at step %d (batch %s): update skipped (%d in a row)",
                        self.step_count, ids, self.nonfinite.bad_steps)
            if self.nonfinite.exhausted:
                self.trainer.should_stop = True
                raise RuntimeError(self.nonfinite.message(self.step_count, ids,
                                                          stop_checkpoint(self.trainer, "nonfinite-stop.ckpt")))
        return ok, gn, loss

    # -- training ---------------------------------------------------------------------------------------
    def training_step(self, batch: list[Record], batch_idx: int) -> None:
        if self.step_count >= self.total_steps:
            self.trainer.should_stop = True
            return None
        self._no_ddp_sync()
        seg = self.segment
        opt = self.optimizers()
        self._enter_segment(seg, opt)
        (self._grpo_step if seg.kind == "grpo" else self._sft_step)(batch, seg, opt)
        self.step_count += 1
        self._plateau_check(seg)
        self.log("train/stage", float(seg.stage))
        self.log("train/phase_index", float(seg.phase_index))
        if self.step_count >= self.total_steps:
            self.trainer.should_stop = True
        return None

    def on_train_batch_start(self, batch, batch_idx: int) -> int | None:
        # -1 ends Lightning's epoch: a segment ended early by its plateau rule; the next epoch's loader
        # serves the next segment (data_plan).
        return -1 if self._end_epoch else None

    def on_train_epoch_start(self) -> None:
        self._end_epoch = False

    def _plateau_check(self, seg: Segment) -> None:
        """At a plateau evaluation step: greedy validation pass@1; the segment ends here once it has
        stopped improving (schedule.PlateauRule), and Lightning's epoch with it."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or self.trainer.fast_dev_run or not self.plateau.due(seg, self.step_count):
            return
        correct, n = count_correct(self.evaluator, dm.eval_records("validation"), seg.stage, seg.cot_layout,
                                   dm.eval_batch_size, self.device)
        self.log(f"plateau/{seg.name}/stage{seg.stage}/val_pass@1", correct / max(n, 1))
        ended = self.plateau.record(self.segments, seg, self.step_count, correct / max(n, 1), n)
        if seg.plateau.restore_best and self.plateau.tracker.improved:
            self.plateau.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            self.plateau.best_step = self.step_count
        if ended:
            self.total_steps, self._end_epoch = self.segments[-1].end, True
            log.info("%s stage %d ends at its plateau after %d steps (best validation pass@1 %.3f)", seg.name,
                     seg.stage, seg.steps, self.plateau.tracker.best)
            if seg.plateau.restore_best and self.plateau.best_state is not None:
                self.model.load_state_dict(self.plateau.best_state)
                self.plateau.history[-1]["restored_step"] = self.plateau.best_step
                log.info("%s stage %d: restored the weights of step %d (validation pass@1 %.3f)", seg.name,
                         seg.stage, self.plateau.best_step, self.plateau.tracker.best)
                self.plateau.best_state = None

    def _no_ddp_sync(self) -> None:
        # Lightning calls training_step through the DDP wrapper; gradients are synced by sync_grads.
        m = getattr(self.trainer.strategy, "model", None) if self._trainer is not None else None
        if isinstance(m, torch.nn.parallel.DistributedDataParallel):
            m.require_backward_grad_sync = False

    def _sft_step(self, records: list[Record], seg: Segment, opt) -> None:
        rng = random.Random(f"{self.seed}/{self.step_count}/{self.global_rank}")
        dm = getattr(self.trainer, "datamodule", None)
        skip = None if dm is None else lambda r, err: dm.skips.add("layout", err.reason, f"record {r.idx}")
        try:
            b = train_batch(self.layout, records, seg.stage, seg.cot_layout, rng, skip)
        except ValueError as err:
            raise ValueError(f"step {self.step_count}: {err}") from err
        b = {k: v.to(self.device) for k, v in b.items()}
        self.model.train()
        out = self.model(b["input_ids"], b["attention_mask"], b["position_ids"])
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(),
                               ignore_index=IGNORE)

        def backward() -> Tensor:
            self.manual_backward(loss)
            return loss

        ok, gn, _ = self._optimizer_step(opt, backward, b["idx"].tolist()[:8])
        self.log("train/loss", loss.detach(), prog_bar=True)
        self.log(f"train/{seg.name}/loss", loss.detach())
        if ok:
            self.log("train/grad_norm", gn)

    @property
    def rollout_temperature(self) -> float:
        """Answers are sampled at ``grpo.answer_temperature`` unless the arm decodes greedily."""
        return 0.0 if self.perturb_cfg.spec.greedy_answers else self.grpo_cfg.answer_temperature

    def _grpo_step(self, records: list[Record], seg: Segment, opt) -> None:
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
        self._check_rollouts(rb, stats)
        ref = self.reference
        result = grpo_update(
            self.model, self.perturber, rb, cfg, self.rollout_temperature,
            reference=None if ref is None else lambda sub: ref.logprobs(sub, self.rollout_temperature,
                                                                        cfg.reference_perturbed),
            backward=self.manual_backward,
            optimizer_step=lambda fn: self._optimizer_step(opt, fn, [r.idx for r in records][:8]))
        self.log("grpo/groups_kept", float(result.groups_kept))
        if result.loss is None:  # no rank kept a group: no update
            self.log("grpo/skipped_updates", 1.0)
            return
        self.log_dict({f"grpo/{name}": value for name, value in result.stats.items()})
        if result.grad_norm is not None:
            self.log("grpo/grad_norm", result.grad_norm)
        self.log("train/loss", result.loss, prog_bar=True)
        self.log("perf/rollout_share", (t1 - t0) / max(time.perf_counter() - t0, 1e-9))

    def _check_rollouts(self, rb: RolloutBatch, stats: dict[str, float]) -> None:
        """Warn about truncated answers; stop a run whose rewards carry no signal (guards.check_rollouts)."""
        msg = check_rollouts(rb.rewards, stats, self.grpo_cfg, self.collapse, self.step_count, self.device)
        if msg is not None:
            self.trainer.should_stop = True
            path = stop_checkpoint(self.trainer, "collapse-stop.ckpt")
            raise CollapseError(f"{msg}; checkpoint: {path}", value=float(rb.rewards.mean() > 0.5))

    # -- evaluation -------------------------------------------------------------------------------------
    def _eval_batch(self, records: list[Record], metrics: EvalMetrics, prefix: str) -> None:
        stage, cot = self.eval_stage()
        preds, texts = self.evaluator.answer(records, stage, cot)
        samples = self.evaluator.sample(records, stage, self.eval_cfg.k) if self.eval_cfg.k > 1 else None
        metrics.update(preds, [r.answer for r in records], samples)
        if prefix == "test":
            self.predictions.extend(prediction_rows(records, preds, texts, samples))

    def _log_eval(self, prefix: str, metrics: EvalMetrics) -> None:
        for name, value in metrics.compute_and_reset(prefix, self.segment.name).items():
            self.log(name, value, sync_dist=False, prog_bar=name == f"{prefix}/pass@1")

    def validation_step(self, batch: list[Record], batch_idx: int) -> None:
        self._eval_batch(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val", self.val_metrics)

    def test_step(self, batch: list[Record], batch_idx: int) -> None:
        self._eval_batch(batch, self.test_metrics, "test")

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
        seg = self.segment
        checkpoint["schedule_state"] = {"step_count": self.step_count, "phase": seg.name, "kind": seg.kind,
                                        "stage": seg.stage, "step_in_stage": self.step_count - seg.start}
        if self._reference_state is not None:
            checkpoint["grpo_reference"] = self._reference_state
        checkpoint["collapse_guard"] = self.collapse.state_dict()
        checkpoint["schedule_state"]["segment_steps"] = [s.steps for s in self.segments]
        checkpoint["schedule_state"]["plateau"] = self.plateau.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        st = checkpoint.get("schedule_state")
        if st is None:
            raise ValueError("checkpoint has no schedule_state: not written by lightning-latent")
        self.step_count = int(st["step_count"])
        self._reference_state = checkpoint.get("grpo_reference")
        self.reference = None
        self.collapse.load_state_dict(checkpoint.get("collapse_guard", {}))
        if "segment_steps" in st and len(st["segment_steps"]) == len(self.segments):  # plateau-shortened stages
            self.total_steps = set_lengths(self.segments, st["segment_steps"])
        self.plateau.load_state_dict(st.get("plateau", {}), self.segments)

