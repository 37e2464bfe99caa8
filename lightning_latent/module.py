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
import math
import random
import time
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from .data.layout import IGNORE, CurriculumConfig, Layout, collate_train
from .data.records import BadRow, Record
from .data.synthetic import DEFAULT_SYNTHETIC, SyntheticConfig
from .distributed import all_sum, is_distributed, sync_grads, world_size
from .evaluation import EvalConfig, Evaluator, prediction_rows
from .guards import NonFiniteGuard
from .optim import OptimConfig
from .metrics import ExactMatchAccuracy, MajorityAtK, PassAtK
from .model.build import (ModelConfig, build_model, build_tokenizer, init_state_dict, load_weights, read_checkpoint,
                          tokenizer_from_bytes, tokenizer_to_bytes)
from .model.latent_lm import LatentLM, max_positions
from .model.perturb import PerturbConfig, Perturber
from .model.trainable import apply_grad_masks, trainable_masks
from .rl.reference import Reference
from .rl.rewards import answers_equal, get_reward
from .rl.rollout import rollout, rollout_seed, rollout_stats
from .rl.update import GRPOConfig, grpo_update
from .schedule import Phase, Segment, flatten, locate

log = logging.getLogger("lightning_latent")


class DataPlan(NamedTuple):
    """What the datamodule must serve next on this rank."""

    batch_size: int  # records per step
    steps_left: int  # steps left in the current segment
    consumed: int  # records this rank has consumed so far (where the stream resumes)


def default_schedule() -> list[Phase]:
    """The embedded default: CoT, the latent curriculum (3 stages: the 3-step synthetic problems end
    fully latent), then Dropout-GRPO."""
    return [Phase("cot", steps=800), Phase("coconut", steps=250, stages=[1, 2, 3]),
            Phase("grpo", steps=200, name="dropout_grpo")]


def _coerce(cls, value):
    """A plain dict (hand-written YAML, an old checkpoint) -> the config dataclass ``cls``."""
    if isinstance(value, dict):
        kw = {k: tuple(v) if isinstance(v, list) and cls is SyntheticConfig else v for k, v in value.items()}
        return cls(**kw)
    return value


# The hyperparameters saved in every checkpoint hold these config dataclasses. torch >= 2.6 loads with
# ``weights_only=True`` by default (so does ``--ckpt_path``), which refuses any class not allow-listed.
# Checkpoints written before the configs moved out of this file name them ``lightning_latent.module.*``.
torch.serialization.add_safe_globals(
    [ModelConfig, CurriculumConfig, Phase, PerturbConfig, GRPOConfig, OptimConfig, EvalConfig, SyntheticConfig,
     *((cls, f"{__name__}.{cls.__name__}") for cls in (GRPOConfig, OptimConfig, EvalConfig))]
)


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
        grpo: GRPOConfig = GRPOConfig(),
        optim: OptimConfig = OptimConfig(),
        evaluation: EvalConfig = EvalConfig(),
        batch_size: int = 64,
        grpo_prompts: int = 16,
        max_length: int = 256,
        init_from: str | None = None,
        synthetic: SyntheticConfig = DEFAULT_SYNTHETIC,
        seed: int = 0,
        task: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.backbone_cfg, self.curriculum = _coerce(ModelConfig, backbone), _coerce(CurriculumConfig, curriculum)
        self.perturb_cfg, self.grpo_cfg = _coerce(PerturbConfig, perturb), _coerce(GRPOConfig, grpo)
        self.optim_cfg, self.eval_cfg = _coerce(OptimConfig, optim), _coerce(EvalConfig, evaluation)
        synthetic = _coerce(SyntheticConfig, synthetic)
        if isinstance(self.eval_cfg.perturb, dict):
            self.eval_cfg.perturb = PerturbConfig(**self.eval_cfg.perturb)
        schedule = default_schedule() if schedule is None else [_coerce(Phase, p) for p in schedule]
        self.curriculum.validate()
        self.perturb_cfg.validate()
        self.grpo_cfg.validate()
        if batch_size < 1 or grpo_prompts < 1:
            raise ValueError(f"batch_size={batch_size} and grpo_prompts={grpo_prompts} must be >= 1")
        self.seed = seed
        self.segments = flatten(schedule, self.curriculum.max_latent_stage, {"sft": batch_size, "grpo": grpo_prompts},
                                {"sft": self.optim_cfg.lr, "grpo": self.optim_cfg.grpo_lr})
        self.total_steps = self.segments[-1].end

        init_sd, tok_bytes = init_state_dict(init_from) if init_from is not None else (None, None)
        self.tokenizer = tokenizer_from_bytes(tok_bytes) if tok_bytes else build_tokenizer(self.backbone_cfg, synthetic, task)
        lm, _ = build_model(self.backbone_cfg, self.tokenizer)
        if init_sd is not None:
            load_weights(lm, init_sd, init_from)
        self.layout = Layout(self.tokenizer, self.curriculum, max_length)
        limit = max_positions(lm)
        if limit is not None and max_length > limit:
            raise ValueError(f"max_length={max_length} exceeds the model's {limit} learned positions "
                             f"(n_positions): set --model.max_length {limit} or less")
        self.model = LatentLM(lm, self.layout.latent_id, self.layout.start_id, self.layout.end_id,
                              feedback=self.curriculum.mode != "pause_as_thought",
                              checkpoint_latents=self.backbone_cfg.checkpoint_latents)
        self.perturber = Perturber(lm, self.perturb_cfg)
        eval_perturber = Perturber(lm, self.eval_cfg.perturb) if self.eval_cfg.perturb is not None else self.perturber
        self.reward_fn = get_reward(self.grpo_cfg.reward)
        self.evaluator = Evaluator(self.model, self.layout, self.tokenizer, self.eval_cfg, eval_perturber,
                                   self.reward_fn, seed)
        self.reference: Reference | None = None  # the frozen GRPO reference (not a submodule)
        self._reference_state: dict | None = None
        self.step_count = 0  # completed schedule steps (what resume restores)
        self.nonfinite = NonFiniteGuard(self.optim_cfg.max_bad_steps)
        self.val_acc, self.test_acc = ExactMatchAccuracy(), ExactMatchAccuracy()
        k = self.eval_cfg.k
        self.eval_pass, self.eval_maj = (PassAtK(k), MajorityAtK(k)) if k > 1 else (None, None)
        self.automatic_optimization = False
        self._grad_masks: list = []
        self.predictions: list[dict] = []

    @classmethod
    def from_checkpoint(cls, path: str, **overrides) -> "LatentReasoner":
        """Rebuild a module from one of our checkpoints (its own settings, its weights, its step); also
        reads checkpoints written before ``model`` was renamed ``backbone``."""
        ck = read_checkpoint(path)
        if "schedule_state" not in ck:
            raise ValueError(f"{path!r} is not a lightning-latent checkpoint (no schedule_state)")
        hp = upgrade_hparams({k: v for k, v in ck.get("hyper_parameters", {}).items() if not k.startswith("_")})
        hp["init_from"] = None
        hp.update(overrides)
        module = cls(**hp)
        module.load_state_dict(ck["state_dict"])
        module.on_load_checkpoint(ck)
        return module

    # -- where are we ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.trainer.fast_dev_run:
            # One batch of every phase (every segment): shrink each segment to one step and let the
            # fit loop run one epoch per segment.
            k = 0
            for s in self.segments:
                s.start, s.steps = k, (1 if s.steps > 0 else 0)
                k += s.steps
            self.total_steps = k
            self.trainer.fit_loop.max_epochs = len(self.segments)
            self.trainer.fit_loop.epoch_loop.max_steps = -1
        if self.reference is not None:
            self.reference.to(self.device)

    @property
    def segment(self) -> Segment:
        return locate(self.segments, self.step_count)

    def data_plan(self) -> DataPlan:
        seg = self.segment
        consumed = sum(s.steps * s.batch_size for s in self.segments if s.end <= self.step_count)
        consumed += (self.step_count - seg.start) * seg.batch_size
        return DataPlan(seg.batch_size, max(seg.end - self.step_count, 0), consumed)

    def eval_stage(self) -> tuple[int, bool]:
        """(stage, CoT layout?) at which the model is evaluated now."""
        seg = self.segment
        return seg.stage, seg.kind == "cot"

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
        for group in opt.param_groups:
            group["lr"] = seg.lr
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
        """Zero, ``backward()`` (runs the backward passes, returns the loss), mask, sync, clip, step; a
        non-finite loss or gradient skips the update (counted; too many in a row stop the run)."""
        opt.zero_grad(set_to_none=True)
        loss = backward().detach()
        apply_grad_masks(self._grad_masks)
        sync_grads(self.model.parameters())
        params = [p for p in self.model.parameters() if p.grad is not None]
        gn = torch.nn.utils.clip_grad_norm_(params, self.optim_cfg.grad_clip) if params else torch.zeros(())
        if self.nonfinite.check(loss, gn):
            opt.step()
            return True, float(gn), loss
        self.log("train/nonfinite_skips", float(self.nonfinite.bad_steps))
        log.warning("non-finite loss or gradient at step %d (batch %s): update skipped (%d in a row)",
                    self.step_count, ids, self.nonfinite.bad_steps)
        opt.zero_grad(set_to_none=True)
        if self.nonfinite.exhausted:
            self.trainer.should_stop = True
            path = self._stop_checkpoint("nonfinite-stop.ckpt")
            raise RuntimeError(self.nonfinite.message(self.step_count, ids, path))
        return False, float("nan"), loss

    def _stop_checkpoint(self, name: str) -> str:
        """Save the state (weights untouched by skipped updates) before a run stops on bad numbers."""
        cb = self.trainer.checkpoint_callback
        d = Path(cb.dirpath) if cb is not None and getattr(cb, "dirpath", None) else \
            Path(self.trainer.default_root_dir) / "checkpoints"
        path = d / name
        self.trainer.save_checkpoint(path, weights_only=False)  # the full state, to resume from
        return str(path)

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
        self.log("train/stage", float(seg.stage))
        self.log("train/phase_index", float(seg.phase_index))
        if self.step_count >= self.total_steps:
            self.trainer.should_stop = True
        return None

    def _no_ddp_sync(self) -> None:
        # Lightning calls training_step through the DDP wrapper; gradients are synced by sync_grads.
        m = getattr(self.trainer.strategy, "model", None) if self._trainer is not None else None
        if isinstance(m, torch.nn.parallel.DistributedDataParallel):
            m.require_backward_grad_sync = False

    def _sft_step(self, records: list[Record], seg: Segment, opt) -> None:
        rng = random.Random(f"{self.seed}/{self.step_count}/{self.global_rank}")
        dm = getattr(self.trainer, "datamodule", None)
        feats = []
        for r in records:
            try:
                feats.append(self.layout.train_example(r, seg.stage, cot=seg.kind == "cot", rng=rng))
            except BadRow as err:
                if dm is not None:
                    dm.skips.add("layout", err.reason, f"record {r.idx}")
        if not feats:
            raise ValueError(f"every record of step {self.step_count} was longer than max_length="
                             f"{self.layout.max_length}: raise max_length or shorten the data")
        b = {k: v.to(self.device) for k, v in collate_train(feats, self.layout.pad_id, self.layout.latent_id).items()}
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
                     self.rollout_temperature, cfg.max_new_tokens, self.reward_fn, self.tokenizer)
        t1 = time.perf_counter()
        stats = rollout_stats(rb, seconds=t1 - t0)
        if is_distributed():  # average the group statistics over ranks; throughput adds up
            summed = all_sum(torch.tensor(list(stats.values()), device=self.device)) / world_size()
            stats = dict(zip(stats, summed.tolist()))
            stats["perf/rollouts_per_s"] *= world_size()
        self.log_dict(stats)
        self.log("reward", stats["grpo/reward_mean"], prog_bar=True)
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

    # -- evaluation -------------------------------------------------------------------------------------
    def _eval_batch(self, records: list[Record], acc: ExactMatchAccuracy, prefix: str) -> None:
        stage, cot = self.eval_stage()
        preds, texts = self.evaluator.answer(records, stage, cot)
        golds = [r.answer for r in records]
        acc.update(preds, golds)
        samples = None
        if self.eval_pass is not None:
            samples = self.evaluator.sample(records, stage, self.eval_cfg.k)
            self.eval_pass.update(torch.tensor([[answers_equal(a, g) for a in s] for s, g in zip(samples, golds)]))
            self.eval_maj.update(samples, golds)
        if prefix == "test":
            self.predictions.extend(prediction_rows(records, preds, texts, samples))

    def validation_step(self, batch: list[Record], batch_idx: int) -> None:
        self._eval_batch(batch, self.val_acc, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val", self.val_acc)

    def test_step(self, batch: list[Record], batch_idx: int) -> None:
        self._eval_batch(batch, self.test_acc, "test")

    def on_test_epoch_start(self) -> None:
        self.predictions = []

    def on_test_epoch_end(self) -> None:
        self._log_eval("test", self.test_acc)

    def _log_eval(self, prefix: str, acc: ExactMatchAccuracy) -> None:
        value = acc.compute()
        with acc.sync_context():
            n = int(acc.n)
        self.log(f"{prefix}/pass@1", value, sync_dist=False, prog_bar=True)
        self.log(f"{prefix}/{self.segment.name}/pass@1", value, sync_dist=False)
        self.log(f"{prefix}/n", float(n), sync_dist=False)
        self.log(f"{prefix}/se", math.sqrt(max(float(value) * (1 - float(value)), 0.0) / max(n, 1)))
        acc.reset()
        if self.eval_pass is not None:
            self.log(f"{prefix}/pass@{self.eval_cfg.k}", self.eval_pass.compute())
            self.log(f"{prefix}/maj@{self.eval_cfg.k}", self.eval_maj.compute())
            self.eval_pass.reset()
            self.eval_maj.reset()

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

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        st = checkpoint.get("schedule_state")
        if st is None:
            raise ValueError("checkpoint has no schedule_state: not written by lightning-latent")
        self.step_count = int(st["step_count"])
        self._reference_state = checkpoint.get("grpo_reference")
        self.reference = None


def upgrade_hparams(hp: dict) -> dict:
    """Hyperparameters of an older checkpoint -> today's names (``model`` -> ``backbone``)."""
    if "model" in hp and "backbone" not in hp:
        hp = {("backbone" if k == "model" else k): v for k, v in hp.items()}
    return hp
