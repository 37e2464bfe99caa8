"""lightning_latent/module.py: the LightningModule as glue: a ``fast_dev_run`` through every phase, and
``training_step`` taking the branch of its segment (a GRPO step logs the GRPO metrics, a supervised one its
loss and no GRPO metric), argument checks. Whole CLI runs: tests/integration/test_cli_runs.py."""
from __future__ import annotations

import lightning as L
import pytest

from lightning_latent.data.datamodule import LatentDataModule
from lightning_latent.data.layout import CurriculumConfig
from lightning_latent.evaluation import EvalConfig
from lightning_latent.model.build import ModelConfig
from lightning_latent.module import LatentReasoner
from lightning_latent.rl.update import GRPOConfig
from lightning_latent.schedule import Phase

from conftest import tiny_trainer


def tiny_module(schedule) -> LatentReasoner:
    L.seed_everything(0, verbose=False)
    return LatentReasoner(backbone=ModelConfig(n_layer=1, n_embd=32, n_head=2),
                          curriculum=CurriculumConfig(c_thought=1, max_latent_stage=1), schedule=schedule,
                          batch_size=4, grpo_prompts=2, grpo=GRPOConfig(group_size=2, max_new_tokens=4),
                          evaluation=EvalConfig(max_new_tokens=8))


def tiny_data() -> LatentDataModule:
    return LatentDataModule(val_limit=4, test_limit=4, eval_batch_size=4)


def test_fast_dev_run_trains_one_step_of_every_segment(tmp_path):
    m = tiny_module([Phase("cot", steps=5), Phase("coconut", steps=3, stages=[1, 2]), Phase("grpo", steps=4)])
    assert [s.kind for s in m.segments] == ["cot", "coconut", "coconut", "grpo"] and m.total_steps == 15
    kinds = []

    class Kinds(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            kinds.append((pl_module.segment.kind, pl_module.segment.stage))

    t = tiny_trainer(tmp_path, fast_dev_run=True, callbacks=[Kinds()])
    t.fit(m, datamodule=tiny_data())
    assert m.step_count == len(m.segments) == 4  # one step per segment
    assert m.schedule.finished and [s.steps for s in m.segments] == [1, 1, 1, 1]
    assert kinds == [("cot", 0), ("coconut", 1), ("coconut", 2), ("grpo", 2)]


def test_training_step_names_its_branch(tmp_path):
    m = tiny_module([Phase("cot", steps=1), Phase("grpo", steps=1)])
    logged: dict[str, set[str]] = {"cot": set(), "grpo": set()}
    where = {}
    log = m.log  # log_dict goes through log too

    def recording_log(name, value, *args, **kwargs):
        logged[where["kind"]].add(name)
        return log(name, value, *args, **kwargs)

    m.log = recording_log

    class Where(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            where["kind"] = pl_module.segment.kind

    tiny_trainer(tmp_path, callbacks=[Where()]).fit(m, datamodule=tiny_data())
    assert m.step_count == 2
    assert {"train/loss", "train/cot/loss", "train/stage"} <= logged["cot"]
    assert not any(n.startswith("grpo/") or n == "reward" for n in logged["cot"])
    assert {"grpo/reward_mean", "grpo/groups_kept", "grpo/replay_gap", "reward", "train/loss"} <= logged["grpo"]
    assert "train/cot/loss" not in logged["grpo"] and "train/grpo/loss" not in logged["grpo"]


def test_module_refuses_bad_sizes_and_builds_its_schedule():
    with pytest.raises(ValueError, match=r"batch_size=0 and grpo_prompts=2 must be >= 1"):
        LatentReasoner(backbone=ModelConfig(n_layer=1, n_embd=32, n_head=2), batch_size=0, grpo_prompts=2)
    m = LatentReasoner(backbone=ModelConfig(n_layer=1, n_embd=32, n_head=2),
                       schedule=[{"kind": "cot", "steps": 2}, {"kind": "grpo", "steps": 3, "lr": 2e-5}],
                       grpo_prompts=5, batch_size=7)  # phases as plain dicts (a YAML config)
    assert [(s.kind, s.steps, s.batch_size) for s in m.segments] == [("cot", 2, 7), ("grpo", 3, 5)]
    assert m.segments[1].lr == 2e-5 and m.segments[0].lr == m.optim_cfg.lr
    assert m.eval_stage() == (0, True) and m.automatic_optimization is False


def _one_sft_step(p_train: float, scope: str = "latent", unmasked_share: float = 0.0):
    """One coconut step of a tiny module (``perturb.p_train`` as given): the batch it drew, its logged loss,
    and the weights it started from."""
    import copy

    from lightning_latent.model.perturb import PerturbConfig

    L.seed_everything(0, verbose=False)
    m = LatentReasoner(backbone=ModelConfig(n_layer=1, n_embd=32, n_head=2),
                       curriculum=CurriculumConfig(c_thought=1, max_latent_stage=1), schedule=[Phase("coconut", steps=1,
                                                                                                   stages=[1])],
                       batch_size=4, perturb=PerturbConfig(p=0.1, p_train=p_train, scope=scope,
                                                                 unmasked_share=unmasked_share))
    start = copy.deepcopy(m.model)
    seen = {}

    class Grab(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["batch"] = list(batch)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen["loss"] = float(trainer.callback_metrics["train/loss"])

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tiny_trainer(d, callbacks=[Grab()]).fit(m, datamodule=tiny_data())
    return m, start, seen


def test_a_supervised_phase_trains_under_the_configured_masks():
    """``perturb.p_train``: each training sequence gets one feature mask (seeded by run seed, step and
    record, the same at every position and thought of its head), and the loss is the masked model's."""
    import random

    import torch

    from lightning_latent.data.layout import IGNORE, sft_loss, train_batch
    from lightning_latent.model.perturb import Perturber
    from lightning_latent.rl.rollout import TRAINING_MASK_K, rollout_seed

    plain, _, seen0 = _one_sft_step(0.0)
    m, start, seen = _one_sft_step(0.3)
    assert [r.idx for r in seen["batch"]] == [r.idx for r in seen0["batch"]]
    b = train_batch(m.layout, seen["batch"], 1, False, random.Random("0/0/0"))
    with torch.no_grad():
        unmasked = sft_loss(start(b["input_ids"], b["attention_mask"], b["position_ids"]).logits, b["labels"])
        pert = Perturber(start.lm, m.perturb_cfg.for_training())
        seeds = torch.tensor([rollout_seed(0, 0, int(i), TRAINING_MASK_K) for i in b["idx"]])
        with pert.rows(seeds):
            out = start(b["input_ids"], b["attention_mask"], b["position_ids"], perturber=pert,
                        answer_from=(b["labels"] != IGNORE).int().argmax(1))
        masked = sft_loss(out.logits, b["labels"])
    assert seen0["loss"] == pytest.approx(float(unmasked), abs=1e-6)  # p_train 0: the plain loss
    assert seen["loss"] == pytest.approx(float(masked), abs=1e-6)  # p_train 0.3: exactly these masks
    assert abs(float(masked) - float(unmasked)) > 1e-3  # and they change the loss (the check can fail)


def test_a_share_of_training_sequences_trains_with_the_masks_off():
    """``perturb.unmasked_share``: the sequences whose hashed draw falls below the share carry no mask, the
    others exactly their ``p_train`` mask; the loss is the mean over both kinds, row by row."""
    import random

    import torch

    from lightning_latent.data.layout import IGNORE, train_batch
    from lightning_latent.model.perturb import Perturber
    from lightning_latent.rl.rollout import TRAINING_MASK_K, rollout_seed
    from lightning_latent.supervised import training_rows_masked

    m, start, seen = _one_sft_step(0.3, unmasked_share=0.5)
    b = train_batch(m.layout, seen["batch"], 1, False, random.Random("0/0/0"))
    seeds = torch.tensor([rollout_seed(0, 0, int(i), TRAINING_MASK_K) for i in b["idx"]])
    on = training_rows_masked(seeds, 0.5)
    assert 0 < int(on.sum()) < len(on)  # this batch has both kinds, so the check below can fail
    assert training_rows_masked(seeds, 0.0) is None
    labels, af = b["labels"], (b["labels"] != IGNORE).int().argmax(1)
    with torch.no_grad():
        plain = start(b["input_ids"], b["attention_mask"], b["position_ids"]).logits
        pert = Perturber(start.lm, m.perturb_cfg.for_training())
        with pert.rows(seeds):  # every row masked
            masked = start(b["input_ids"], b["attention_mask"], b["position_ids"], perturber=pert, answer_from=af).logits
    assert pert.cfg.unmasked_share == 0.5
    logits = torch.where(on[:, None, None], masked, plain)  # row by row: its mask, or none
    tok = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE,
                                            reduction="sum")
    expected = float(tok) / int((labels[:, 1:] != IGNORE).sum())
    assert seen["loss"] == pytest.approx(expected, abs=1e-6)
    all_masked = torch.nn.functional.cross_entropy(masked[:, :-1].transpose(1, 2), labels[:, 1:],
                                                   ignore_index=IGNORE, reduction="sum") / int((labels[:, 1:] != IGNORE).sum())
    all_plain = torch.nn.functional.cross_entropy(plain[:, :-1].transpose(1, 2), labels[:, 1:],
                                                  ignore_index=IGNORE, reduction="sum") / int((labels[:, 1:] != IGNORE).sum())
    # neither all rows masked nor none: 100x the tolerance above apart (a tiny model at its init: small gaps)
    assert abs(float(all_masked) - expected) > 1e-4 and abs(float(all_plain) - expected) > 1e-4


def test_unmasked_share_must_be_a_share():
    from lightning_latent.model.perturb import PerturbConfig

    with pytest.raises(ValueError, match="unmasked_share"):
        PerturbConfig(p_train=0.1, unmasked_share=1.0)


def test_rollouts_replays_and_references_apply_only_the_arms_masks():
    """A model that trains under ``p_train`` masks rolls out, replays and takes reference log-probs under
    its arm's masks alone: every rollout tensor equals a ``p_train = 0`` module's with the same weights."""
    import torch

    from lightning_latent.data.synthetic import synthetic_record
    from lightning_latent.rl.reference import Reference
    from lightning_latent.rl.rollout import replay_logprobs, rollout, rollout_seed

    a, _, _ = _one_sft_step(0.0)
    b, _, _ = _one_sft_step(0.3)
    b.model.load_state_dict(a.model.state_dict())  # the same weights; only the training masks differ
    recs = [synthetic_record(a.hparams["synthetic"], "train", i) for i in range(3)]
    seeds = torch.tensor([rollout_seed(0, 5, r.idx, j) for r in recs for j in range(4)])
    outs = []
    for m in (a, b):
        rb = rollout(m.model, m.perturber, m.layout, recs, 2, seeds, 4, 1.0, 4, m.reward_fn, m.tokenizer)
        with torch.no_grad():
            replay, _ = replay_logprobs(m.model, m.perturber, rb, 1.0)
        ref = Reference(m.model, m.perturb_cfg).logprobs(rb, 1.0, True)
        outs.append((rb.tokens, rb.logprobs, replay, ref, rb.mask))
    for x, y in zip(*outs):
        assert torch.equal(x, y)
    tokens, logp, replay, _, mask = outs[1]
    assert ((replay - logp).abs() * mask).max() <= 1e-5  # the replay gap: the arm's masks rebuilt exactly


@pytest.mark.parametrize("arm, answer_t, expected", [("dropout_greedy", 1.0, 0.0), ("none", 0.7, 0.0),
                                                      ("temperature", 0.7, 0.7), ("dropout_shared", 1.0, 1.0)])
def test_evaluation_samples_under_the_arms_own_noise_when_asked(arm, answer_t, expected):
    """``evaluation.temperature`` null with ``evaluation.perturb`` null: the k evaluation samples use the
    arm's rollout temperature (greedy for the greedy arms) and the arm's own perturber (issue 22's pass@8)."""
    from lightning_latent.model.perturb import PerturbConfig

    m = LatentReasoner(backbone=ModelConfig(n_layer=1, n_embd=32, n_head=2), perturb=PerturbConfig(arm=arm, p=0.1),
                       grpo=GRPOConfig(answer_temperature=answer_t), evaluation=EvalConfig(k=4, temperature=None))
    assert m.evaluator.cfg.temperature == expected == m.rollout_temperature
    assert m.evaluator.perturber is m.perturber
    fixed = LatentReasoner(backbone=ModelConfig(n_layer=1, n_embd=32, n_head=2), perturb=PerturbConfig(arm=arm, p=0.1),
                           evaluation=EvalConfig(k=4, perturb={"arm": "dropout_shared", "p": 0.3}))
    assert fixed.evaluator.cfg.temperature == 1.0 and fixed.evaluator.perturber is not fixed.perturber
