"""The LightningModule: one schedule of phases (CoT, the latent curriculum, Dropout-GRPO).

The maths lives elsewhere (layout, latent LM, perturbations, GRPO loss, metrics); this file is glue:
which segment of the schedule a step belongs to, one step function per kind of phase, logging,
checkpoint state. Optimisation is manual because a GRPO step makes ``mu`` optimiser steps on one
rollout batch; every backward's gradients are all-reduced explicitly (DDP's own hook would sync only
the first one, DESIGN.md section 5).
"""
from __future__ import annotations

import copy
import logging
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .data.layout import IGNORE, CurriculumConfig, Layout, collate_prompts, collate_train
from .data.records import BadRow, Record
from .data.synthetic import SyntheticConfig
from .metrics import ExactMatchAccuracy, MajorityAtK, PassAtK
from .model.build import (
    ModelConfig,
    build_model,
    build_tokenizer,
    init_state_dict,
    load_weights,
    tokenizer_from_bytes,
    tokenizer_to_bytes,
)
from .model.latent_lm import LatentLM, generate, max_positions
from .model.perturb import PerturbConfig, Perturber
from .rl.grpo import group_advantages, group_stats, grpo_loss, select_mixed_groups
from .rl.rewards import answer_key, answers_equal, extract_answer, get_reward
from .rl.rollout import RolloutBatch, replay_logprobs, rollout, rollout_seed
from .schedule import Phase, Segment, flatten, locate

log = logging.getLogger("lightning_latent")


@dataclass
class GRPOConfig:
    """Dropout-GRPO settings (DESIGN.md sections 1-2). ``answer_temperature=0`` means greedy answers."""

    group_size: int = 8
    answer_temperature: float = 1.0
    max_new_tokens: int = 16
    advantage: Literal["mean", "std", "none"] = "mean"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    aggregation: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    beta: float = 0.0
    kl_clamp: float = 10.0
    reference_perturbed: bool = True
    mu: int = 1
    dynamic_sampling: bool = False
    max_groups: int | None = None  # with dynamic sampling: keep at most this many mixed groups per rank
    # Which parameters GRPO trains: None = all; "value" = the attention value projections only (the
    # published recipe's W_V: v_proj, or the V third of GPT-2's fused c_attn); else a regex over names.
    trainable: str | None = None
    reward: str = "exact_match"
    # Rows (rollouts) per backward in the update: None = the whole batch at once. Smaller values bound
    # the replay's activation memory; the gradient is the whole batch's (the losses use its denominators).
    micro_batch_rows: int | None = None

    def validate(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"grpo.group_size={self.group_size}: GRPO needs K >= 2 rollouts per prompt")
        if self.beta < 0:
            raise ValueError(f"grpo.beta={self.beta} must be >= 0")
        if self.mu < 1:
            raise ValueError(f"grpo.mu={self.mu} must be >= 1")
        if self.answer_temperature < 0:
            raise ValueError(f"grpo.answer_temperature={self.answer_temperature} must be >= 0 (0 = greedy)")
        if self.epsilon < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise ValueError(f"grpo.epsilon={self.epsilon} / epsilon_high={self.epsilon_high} must be >= 0")
        if self.max_new_tokens < 1:
            raise ValueError(f"grpo.max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.advantage not in ("mean", "std", "none"):
            raise ValueError(f"grpo.advantage={self.advantage!r} must be mean, std or none")
        if self.aggregation not in ("grpo", "dr_grpo", "dapo"):
            raise ValueError(f"grpo.aggregation={self.aggregation!r} must be grpo, dr_grpo or dapo")
        if self.trainable not in (None, "value"):
            try:
                re.compile(self.trainable)
            except re.error as err:
                raise ValueError(f"grpo.trainable={self.trainable!r} is not a valid regex: {err}") from err
        if self.micro_batch_rows is not None and self.micro_batch_rows < 1:
            raise ValueError(f"grpo.micro_batch_rows={self.micro_batch_rows} must be >= 1 (or null: whole batch)")
        get_reward(self.reward)


@dataclass
class OptimConfig:
    lr: float = 1e-3  # supervised phases
    grpo_lr: float = 1e-4
    weight_decay: float = 0.01
    grpo_weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    max_bad_steps: int = 5  # consecutive non-finite losses / gradients before the run stops


@dataclass
class EvalConfig:
    """Evaluation: greedy pass@1 with the perturbation off, plus pass@k / maj@k over ``k`` perturbed,
    sampled rollouts when ``k > 1``. ``perturb`` fixes the sampler of those k rollouts (None: the run's
    own), so that arms can be compared under one evaluation sampler."""

    max_new_tokens: int = 48
    k: int = 0
    temperature: float = 1.0
    perturb: PerturbConfig | None = None


def _as(cls, value):
    if isinstance(value, dict):
        kw = {k: tuple(v) if isinstance(v, list) and cls is SyntheticConfig else v for k, v in value.items()}
        return cls(**kw)
    return value


def trainable_masks(model: torch.nn.Module, spec: str | None) -> list[tuple[torch.nn.Parameter, Tensor]]:
    """Set ``requires_grad`` from ``spec`` (None: all, "value": value projections only, else a regex)
    and return (parameter, gradient mask) pairs for parameters trained only in part (GPT-2's fused
    c_attn holds Q, K and V: only its V third keeps a gradient)."""
    masks: list[tuple[torch.nn.Parameter, Tensor]] = []
    pattern = re.compile(spec) if spec not in (None, "value") else None
    n_on = 0
    for name, p in model.named_parameters():
        if spec is None:
            on = True
        elif spec == "value":
            on = bool(re.search(r"(v_proj|value)\.(weight|bias)$", name) or re.search(r"attn\.c_attn\.(weight|bias)$", name))
            if on and "c_attn" in name:
                m = torch.zeros_like(p)
                d = p.shape[-1] // 3
                m[..., 2 * d:] = 1.0  # Conv1D weight [in, 3d] / bias [3d]: columns q | k | v
                masks.append((p, m))
        else:
            on = bool(pattern.search(name))
        p.requires_grad_(on)
        n_on += on
    if n_on == 0:
        raise ValueError(f"grpo.trainable={spec!r} matches no parameter of the model")
    return masks


def default_schedule() -> list[Phase]:
    """The embedded default: CoT, the latent curriculum (3 stages: the 3-step synthetic problems end
    fully latent), then Dropout-GRPO."""
    return [Phase("cot", steps=800), Phase("coconut", steps=250, stages=[1, 2, 3]),
            Phase("grpo", steps=200, name="dropout_grpo")]


# The hyperparameters saved in every checkpoint hold these config dataclasses. torch >= 2.6 loads with
# ``weights_only=True`` by default (so does ``Trainer.fit(ckpt_path=...)`` / ``--ckpt_path``), which
# refuses any class not allow-listed: without this, resuming from ``last.ckpt`` fails.
torch.serialization.add_safe_globals(
    [ModelConfig, CurriculumConfig, Phase, PerturbConfig, GRPOConfig, OptimConfig, EvalConfig, SyntheticConfig]
)


class LatentReasoner(L.LightningModule):
    """Coconut model + mask sampler + GRPO loss, trained through a schedule of phases.

    Args:
        model: the base LM (GPT-2 from scratch by default, or any HF causal LM).
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
    """

    def __init__(
        self,
        model: ModelConfig = ModelConfig(),
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
        synthetic: SyntheticConfig = SyntheticConfig(max_number=20, max_value=60),
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        # Plain dicts (a checkpoint written by the CLI, a hand-written YAML) become the dataclasses.
        model, curriculum, perturb, grpo, optim, evaluation, synthetic = (
            _as(ModelConfig, model), _as(CurriculumConfig, curriculum), _as(PerturbConfig, perturb),
            _as(GRPOConfig, grpo), _as(OptimConfig, optim), _as(EvalConfig, evaluation), _as(SyntheticConfig, synthetic))
        if isinstance(evaluation.perturb, dict):
            evaluation.perturb = PerturbConfig(**evaluation.perturb)
        schedule = default_schedule() if schedule is None else [_as(Phase, p) for p in schedule]
        curriculum.validate()
        perturb.validate()
        grpo.validate()
        if batch_size < 1 or grpo_prompts < 1:
            raise ValueError(f"batch_size={batch_size} and grpo_prompts={grpo_prompts} must be >= 1")
        self.mcfg, self.cur, self.pcfg, self.gcfg = model, curriculum, perturb, grpo
        self.ocfg, self.ecfg, self.seed = optim, evaluation, seed
        self.segments = flatten(schedule, curriculum.max_latent_stage, {"sft": batch_size, "grpo": grpo_prompts},
                                {"sft": optim.lr, "grpo": optim.grpo_lr})
        self.total_steps = self.segments[-1].end

        init_sd, tok_bytes = (None, None)
        if init_from is not None:
            init_sd, tok_bytes = init_state_dict(init_from)
        self.tokenizer = tokenizer_from_bytes(tok_bytes) if tok_bytes else build_tokenizer(model, synthetic)
        lm, _ = build_model(model, self.tokenizer)
        if init_sd is not None:
            load_weights(lm, init_sd, init_from)
        self.layout = Layout(self.tokenizer, curriculum, max_length)
        limit = max_positions(lm)
        if limit is not None and max_length > limit:
            raise ValueError(f"max_length={max_length} exceeds the model's {limit} learned positions "
                             f"(n_positions): set --model.max_length {limit} or less")
        feedback = curriculum.mode != "pause_as_thought"
        self.model = LatentLM(lm, self.layout.latent_id, self.layout.start_id, self.layout.end_id, feedback,
                              checkpoint_latents=model.checkpoint_latents)
        self.perturber = Perturber(lm, perturb)
        self.eval_perturber = Perturber(lm, evaluation.perturb) if evaluation.perturb is not None else self.perturber
        self.reward_fn = get_reward(grpo.reward)
        self._ref: LatentLM | None = None  # frozen GRPO reference: not a submodule, not in the optimiser
        self._ref_state: dict | None = None
        self.step_count = 0  # completed schedule steps (what resume restores)
        self.bad_steps = 0
        self.val_acc = ExactMatchAccuracy()
        self.test_acc = ExactMatchAccuracy()
        self.eval_pass = PassAtK(evaluation.k) if evaluation.k > 1 else None
        self.eval_maj = MajorityAtK(evaluation.k) if evaluation.k > 1 else None
        self.automatic_optimization = False
        self._grad_masks: list = []
        self.predictions: list[dict] = []

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
        if self._ref is not None:
            self._ref.to(self.device)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # lists of Records: the steps build tensors and move them themselves

    def on_train_start(self) -> None:
        if self.step_count >= self.total_steps:
            log.warning("the schedule is already complete (%d steps): nothing to train", self.total_steps)
            self.trainer.should_stop = True

    def on_train_epoch_end(self) -> None:
        if self.step_count >= self.total_steps:
            self.trainer.should_stop = True

    @classmethod
    def from_checkpoint(cls, path: str, **overrides) -> "LatentReasoner":
        """Rebuild a module from one of our checkpoints (its own settings, its weights, its step).

        ``load_from_checkpoint`` goes through LightningCLI's instantiator when the CLI wrote the file;
        this works for checkpoints written either way."""
        from .model.build import read_checkpoint

        ck = read_checkpoint(path)
        if "schedule_state" not in ck:
            raise ValueError(f"{path!r} is not a lightning-latent checkpoint (no schedule_state)")
        hp = {k: v for k, v in ck.get("hyper_parameters", {}).items() if not k.startswith("_")}
        hp["init_from"] = None
        hp.update(overrides)
        module = cls(**hp)
        module.load_state_dict(ck["state_dict"])
        module.on_load_checkpoint(ck)
        return module

    # -- where are we ----------------------------------------------------------------------------------
    @property
    def segment(self) -> Segment:
        return locate(self.segments, self.step_count)

    def data_plan(self) -> tuple[int, int, int]:
        """(records per step on this rank, steps left in this segment, records this rank consumed)."""
        seg = self.segment
        offset = sum(s.steps * s.batch_size for s in self.segments if s.end <= self.step_count)
        offset += (self.step_count - seg.start) * seg.batch_size
        left = max(seg.end - self.step_count, 0)
        return seg.batch_size, left, offset

    def eval_stage(self) -> tuple[int, bool]:
        seg = self.segment
        return seg.stage, seg.kind == "cot"

    # -- optimiser -------------------------------------------------------------------------------------
    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.ocfg.lr, weight_decay=self.ocfg.weight_decay,
                                 betas=self.ocfg.betas)

    def _enter_segment(self, seg: Segment, opt) -> None:
        """Set lr / weight decay / trainable params for the segment; reset the optimiser at its start."""
        is_grpo = seg.kind == "grpo"
        for g in opt.param_groups:
            g["lr"] = seg.lr
            g["weight_decay"] = self.ocfg.grpo_weight_decay if is_grpo else self.ocfg.weight_decay
        self._grad_masks = trainable_masks(self.model, self.gcfg.trainable if is_grpo else None)
        # Base dropout is for supervised phases only; rollouts and replays must be deterministic.
        self.model.set_base_dropout(not is_grpo and self.mcfg.dropout > 0)
        if self.step_count == seg.start:
            opt.optimizer.state.clear() if hasattr(opt, "optimizer") else opt.state.clear()
            if is_grpo and seg.first_of_phase:  # a new GRPO phase: its reference is its own start
                self._ref_state = None
                object.__setattr__(self, "_ref", None)
        if is_grpo and self.gcfg.beta > 0 and self._ref is None:
            self._make_reference()

    def _make_reference(self) -> None:
        ref = copy.deepcopy(self.model)
        if self._ref_state is not None:
            ref.load_state_dict(self._ref_state)
        else:
            self._ref_state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
        ref.eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        # A plain attribute, not a registered submodule: the reference must stay out of state_dict (it is
        # saved as ``grpo_reference``; a registered one makes resuming fail with unexpected ``_ref.*`` keys).
        object.__setattr__(self, "_ref", ref)
        self._ref_perturber = Perturber(ref.lm, self.pcfg)

    # -- distributed helpers -------------------------------------------------------------------------------
    @property
    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _all_sum(self, t: Tensor) -> Tensor:
        if self._distributed:
            t = t.clone()
            dist.all_reduce(t)
        return t

    def _sync_grads(self) -> None:
        """Average gradients over ranks after every backward (each GRPO inner iteration included)."""
        if not self._distributed:
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        i = 0
        for g in grads:
            g.copy_(flat[i:i + g.numel()].view_as(g))
            i += g.numel()

    def _no_ddp_sync(self) -> None:
        # Lightning calls training_step through the DDP wrapper; gradients are synced by _sync_grads.
        m = getattr(self.trainer.strategy, "model", None) if self._trainer is not None else None
        if isinstance(m, torch.nn.parallel.DistributedDataParallel):
            m.require_backward_grad_sync = False

    def _optimizer_step(self, opt, loss: Tensor | None, ids: Any, backward=None) -> tuple[bool, float, Tensor]:
        """Backward, sync, clip, step; a non-finite loss or gradient skips the update (counted).

        ``backward`` (instead of ``loss``): a function that runs the backward passes itself (micro-batches)
        and returns the total loss, detached. Returns (stepped, grad norm, the detached loss)."""
        opt.zero_grad(set_to_none=True)
        if backward is None:
            self.manual_backward(loss)
        else:
            loss = backward()
        loss = loss.detach()
        for p, m in self._grad_masks:
            if p.grad is not None:
                p.grad.mul_(m)
        self._sync_grads()
        params = [p for p in self.model.parameters() if p.grad is not None]
        gn = torch.nn.utils.clip_grad_norm_(params, self.ocfg.grad_clip) if params else torch.zeros(())
        if not (torch.isfinite(loss) and torch.isfinite(gn)):
            self.bad_steps += 1
            self.log("train/nonfinite_skips", float(self.bad_steps))
            log.warning("non-finite loss or gradient at step %d (batch %s): update skipped (%d in a row)",
                        self.step_count, ids, self.bad_steps)
            opt.zero_grad(set_to_none=True)
            if self.bad_steps > self.ocfg.max_bad_steps:
                self.trainer.should_stop = True
                path = self._stop_checkpoint()
                raise RuntimeError(f"{self.bad_steps} non-finite steps in a row (limit optim.max_bad_steps="
                                   f"{self.ocfg.max_bad_steps}) at step {self.step_count}, last batch {ids}; the "
                                   f"weights are those before them, saved to {path}")
            return False, float("nan"), loss
        self.bad_steps = 0
        opt.step()
        return True, float(gn), loss

    def _stop_checkpoint(self) -> str:
        """Save the state (weights untouched by the skipped updates) before a run stops on bad numbers."""
        cb = self.trainer.checkpoint_callback
        d = Path(cb.dirpath) if cb is not None and getattr(cb, "dirpath", None) else \
            Path(self.trainer.default_root_dir) / "checkpoints"
        path = d / "nonfinite-stop.ckpt"
        self.trainer.save_checkpoint(path)
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
        if seg.kind == "grpo":
            self._grpo_step(batch, seg, opt)
        else:
            self._sft_step(batch, seg, opt)
        self.step_count += 1
        self.log("train/stage", float(seg.stage))
        self.log("train/phase_index", float(seg.phase_index))
        if self.step_count >= self.total_steps:
            self.trainer.should_stop = True
        return None

    def _sft_step(self, records: list[Record], seg: Segment, opt) -> None:
        rng = random.Random(f"{self.seed}/{self.step_count}/{self.global_rank}")
        feats = []
        for r in records:
            try:
                feats.append(self.layout.train_example(r, seg.stage, cot=seg.kind == "cot", rng=rng))
            except BadRow as err:
                self.trainer.datamodule.skips.add("layout", err.reason, f"record {r.idx}") if self._dm() else None
        if not feats:
            raise ValueError(f"every record of step {self.step_count} was longer than max_length="
                             f"{self.layout.max_length}: raise max_length or shorten the data")
        b = collate_train(feats, self.layout.pad_id, self.layout.latent_id)
        b = {k: v.to(self.device) for k, v in b.items()}
        self.model.train()
        out = self.model(b["input_ids"], b["attention_mask"], b["position_ids"])
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(),
                               ignore_index=IGNORE)
        ok, gn, _ = self._optimizer_step(opt, loss, b["idx"].tolist()[:8])
        self.log("train/loss", loss.detach(), prog_bar=True)
        self.log(f"train/{seg.name}/loss", loss.detach())
        if ok:
            self.log("train/grad_norm", gn)

    def _dm(self):
        return getattr(self.trainer, "datamodule", None)

    def _seeds(self, records: list[Record]) -> Tensor:
        k = self.gcfg.group_size
        return torch.tensor([rollout_seed(self.seed, self.step_count, r.idx, j) for r in records for j in range(k)],
                            dtype=torch.long)

    @property
    def rollout_temperature(self) -> float:
        return 0.0 if self.pcfg.arm == "none" else self.gcfg.answer_temperature

    def _grpo_step(self, records: list[Record], seg: Segment, opt) -> None:
        g = self.gcfg
        k = g.group_size
        t0 = time.perf_counter()
        self.model.eval()
        rb = rollout(self.model, self.perturber, self.layout, records, seg.stage, self._seeds(records), k,
                     self.rollout_temperature, g.max_new_tokens, self.reward_fn, self.tokenizer)
        t1 = time.perf_counter()
        self._log_rollout_stats(rb, n_rows=len(records) * k, seconds=t1 - t0)
        keep = select_mixed_groups(rb.rewards) if g.dynamic_sampling else torch.ones(len(records), dtype=torch.bool)
        if g.dynamic_sampling and g.max_groups is not None:
            keep &= keep.cumsum(0) <= g.max_groups
        n_local = int(keep.sum())
        n_global = int(self._all_sum(torch.tensor(float(n_local), device=self.device)).item())
        self.log("grpo/groups_kept", float(n_global))
        if n_global == 0:  # decided on all ranks together: no rank updates
            self.log("grpo/skipped_updates", 1.0)
            return
        # Ranks may keep different numbers of groups; scaling by local/global share makes the
        # rank-averaged gradient equal the gradient of the global batch.
        world = dist.get_world_size() if self._distributed else 1
        weight = (n_local / n_global) * world
        sub = rb.select_groups(keep) if n_local > 0 else rb.select_groups(torch.arange(len(records)) == 0)
        adv = group_advantages(sub.rewards, g.advantage).flatten().to(self.device)
        mask = sub.mask.float()
        ref_logp = None
        if g.beta > 0:
            with torch.no_grad():
                ref_logp, _ = replay_logprobs(self._ref, self._ref_perturber if g.reference_perturbed else None,
                                              sub, self.rollout_temperature)
        self.model.train()
        n_rows = mask.shape[0]
        mb = n_rows if g.micro_batch_rows is None else min(g.micro_batch_rows, n_rows)
        totals = (n_rows, float(mask.sum()))
        scale = weight if n_local > 0 else 0.0
        for it in range(g.mu):
            parts: list[tuple[Tensor, Tensor | None]] = []

            def backward() -> Tensor:
                # one backward per micro-batch of rows, each loss over the whole batch's denominators:
                # the accumulated gradient equals the whole batch's
                total = torch.zeros((), device=self.device)
                for a in range(0, n_rows, mb):
                    b = min(a + mb, n_rows)
                    lp, en = replay_logprobs(self.model, self.perturber, sub.rows(a, b), self.rollout_temperature,
                                             with_entropy=it == 0)
                    part, _ = grpo_loss(lp, sub.logprobs[a:b], adv[a:b], mask[a:b],
                                        None if ref_logp is None else ref_logp[a:b], g.beta, g.epsilon,
                                        g.epsilon_high, g.aggregation, max_tokens=g.max_new_tokens,
                                        kl_clamp=g.kl_clamp, totals=totals)
                    self.manual_backward(part * scale)
                    total = total + part.detach() * scale
                    parts.append((lp.detach(), None if en is None else en.detach()))
                return total

            ok, gn, loss = self._optimizer_step(opt, None, [r.idx for r in records][:8], backward=backward)
            if it == 0:
                logp = torch.cat([p for p, _ in parts])
                ent = torch.cat([e for _, e in parts])
                _, st = grpo_loss(logp, sub.logprobs, adv, mask, ref_logp, g.beta, g.epsilon, g.epsilon_high,
                                  g.aggregation, max_tokens=g.max_new_tokens, kl_clamp=g.kl_clamp)
                gap = ((logp - sub.logprobs).abs() * mask).max() if mask.sum() > 0 else torch.zeros(())
                self.log("grpo/replay_gap", gap)
                self.log("grpo/entropy", (ent * mask).sum() / mask.sum().clamp(min=1))
                for name in ("kl", "clip_frac", "ratio_mean", "ratio_min", "ratio_max", "pg_loss", "kl_clamped"):
                    self.log(f"grpo/{name}", st[name])
            if ok:
                self.log("grpo/grad_norm", gn)
        self.log("train/loss", loss.detach(), prog_bar=True)
        t2 = time.perf_counter()
        self.log("perf/rollout_share", (t1 - t0) / max(t2 - t0, 1e-9))

    def _log_rollout_stats(self, rb: RolloutBatch, n_rows: int, seconds: float) -> None:
        st = group_stats(rb.rewards)
        k = rb.group_size
        keys = [answer_key(a) for a in rb.answers]
        distinct = [len({keys[b * k + j] for j in range(k)}) for b in range(rb.rewards.shape[0])]
        vals = {f"grpo/{n}": float(st[n]) for n in ("reward_mean", "reward_std", "frac_zero_std",
                                                    "frac_all_correct", "frac_all_wrong", "frac_mixed")}
        vals["grpo/distinct_answers"] = sum(distinct) / len(distinct)
        if rb.final_thought is not None:
            th = rb.final_thought.float().view(-1, k, rb.final_thought.shape[-1])
            d = torch.cdist(th, th)
            vals["grpo/thought_diversity"] = float(d.sum() / (th.shape[0] * k * (k - 1)))
        vals["perf/rollouts_per_s"] = n_rows / max(seconds, 1e-9)
        if self._distributed:  # average the group statistics over ranks
            t = self._all_sum(torch.tensor(list(vals.values()), device=self.device)) / dist.get_world_size()
            vals = dict(zip(vals, t.tolist()))
            vals["perf/rollouts_per_s"] *= dist.get_world_size()
        self.log_dict(vals)
        self.log("reward", vals["grpo/reward_mean"], prog_bar=True)

    # -- evaluation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def answer(self, records: list[Record], stage: int, cot: bool) -> tuple[list[str | None], list[str]]:
        """Greedy answers with the perturbation off: the headline pass@1."""
        self.model.eval()
        prompts = [self.layout.prompt(r, stage, cot) for r in records]
        pb = collate_prompts(prompts, self.layout.pad_id)
        try:
            gen = generate(self.model, pb["input_ids"].to(self.device), pb["attention_mask"].to(self.device),
                           self.ecfg.max_new_tokens, self.layout.eos_id, self.layout.pad_id)
        except ValueError as err:  # generate checks the prompt length against the model: name the record
            longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
            raise ValueError(f"evaluation record {records[longest].idx} "
                             f"(evaluation.max_new_tokens={self.ecfg.max_new_tokens}): {err}") from err
        texts = self.tokenizer.batch_decode([t[: int(m.sum())] for t, m in zip(gen.tokens.cpu(), gen.mask.cpu())])
        return [extract_answer(t) for t in texts], texts

    @torch.no_grad()
    def sample_answers(self, records: list[Record], stage: int, k: int) -> list[list[str | None]]:
        """k perturbed, sampled rollouts per record (pass@k / maj@k), seeds independent of training."""
        seeds = torch.tensor([rollout_seed(self.seed + 7919, -1, r.idx, j) for r in records for j in range(k)])
        rb = rollout(self.model, self.eval_perturber, self.layout, records, stage, seeds, k, self.ecfg.temperature,
                     self.ecfg.max_new_tokens, self.reward_fn, self.tokenizer)
        return [rb.answers[i * k:(i + 1) * k] for i in range(len(records))]

    def _eval_batch(self, records: list[Record], acc: ExactMatchAccuracy, prefix: str) -> None:
        stage, cot = self.eval_stage()
        preds, texts = self.answer(records, stage, cot)
        golds = [r.answer for r in records]
        acc.update(preds, golds)
        samples = None
        if self.eval_pass is not None:
            samples = self.sample_answers(records, stage, self.ecfg.k)
            correct = torch.tensor([[answers_equal(a, g) for a in s] for s, g in zip(samples, golds)])
            self.eval_pass.update(correct)
            self.eval_maj.update(samples, golds)
        if prefix == "test":
            for i, r in enumerate(records):
                row = {"idx": r.idx, "question": r.question, "gold": r.answer, "prediction": preds[i],
                       "correct": answers_equal(preds[i], r.answer), "text": texts[i]}
                if samples is not None:
                    row["samples"] = samples[i]
                self.predictions.append(row)

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
        seg = self.segment
        self.log(f"{prefix}/pass@1", value, sync_dist=False, prog_bar=True)
        self.log(f"{prefix}/{seg.name}/pass@1", value, sync_dist=False)
        self.log(f"{prefix}/n", float(n), sync_dist=False)
        self.log(f"{prefix}/se", math.sqrt(max(float(value) * (1 - float(value)), 0.0) / max(n, 1)))
        acc.reset()
        if self.eval_pass is not None:
            self.log(f"{prefix}/pass@{self.ecfg.k}", self.eval_pass.compute())
            self.log(f"{prefix}/maj@{self.ecfg.k}", self.eval_maj.compute())
            self.eval_pass.reset()
            self.eval_maj.reset()

    def predict_step(self, batch: list[Record], batch_idx: int) -> list[dict]:
        stage, cot = self.eval_stage()
        preds, texts = self.answer(batch, stage, cot)
        return [{"idx": r.idx, "question": r.question, "gold": r.answer, "prediction": p, "text": t}
                for r, p, t in zip(batch, preds, texts)]

    # -- checkpoint state ------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tokenizer"] = tokenizer_to_bytes(self.tokenizer)
        seg = self.segment
        checkpoint["schedule_state"] = {"step_count": self.step_count, "phase": seg.name, "kind": seg.kind,
                                        "stage": seg.stage, "step_in_stage": self.step_count - seg.start}
        if self._ref_state is not None:
            checkpoint["grpo_reference"] = self._ref_state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        st = checkpoint.get("schedule_state")
        if st is None:
            raise ValueError("checkpoint has no schedule_state: not written by lightning-latent")
        self.step_count = int(st["step_count"])
        self._ref_state = checkpoint.get("grpo_reference")
        self._ref = None
