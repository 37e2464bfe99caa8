"""lightning_latent/optim.py: what a segment sets on the optimiser (learning rate with the GRPO warm-up,
weight decay, a fresh Adam state at the segment's first step, trainable parameters), the guarded step
(non-finite updates skipped, too many in a row stop), and the settings' checks."""
from __future__ import annotations

import pytest
import torch

from lightning_latent.guards import NonFiniteGuard
from lightning_latent.optim import GuardedOptimizer, NonFiniteStop, OptimConfig, enter_segment
from lightning_latent.schedule import Phase, flatten

from conftest import tiny_gpt2


def _segments(cfg: OptimConfig):
    """cot at steps 0-2 (lr ``cfg.lr``), grpo at 3-8 (lr ``cfg.grpo_lr``)."""
    return flatten([Phase("cot", steps=3), Phase("grpo", steps=6)], 1, {"sft": 4, "grpo": 2},
                   {"sft": cfg.lr, "grpo": cfg.grpo_lr})


def _adam_step(opt, model):
    opt.zero_grad()
    model(torch.ones(1, 3)).sum().backward()
    opt.step()


def test_enter_segment_sets_lr_with_the_grpo_warmup_and_clears_the_state_at_a_segment_start():
    cfg = OptimConfig(lr=1e-3, grpo_lr=4e-4, grpo_warmup_steps=4, weight_decay=0.05, grpo_weight_decay=0.0)
    cot, grpo = _segments(cfg)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    guard = NonFiniteGuard(cfg.max_bad_steps)

    def lr_wd(seg, step):
        enter_segment(opt, cfg, seg, step, model, None, guard)
        return [(g["lr"], g["weight_decay"]) for g in opt.param_groups]

    # supervised: the phase's lr from its first step (no warm-up), its weight decay
    assert lr_wd(cot, 0) == [(1e-3, 0.05)] and lr_wd(cot, 2) == [(1e-3, 0.05)]
    # grpo: a linear warm-up over its first 4 steps, counted from the segment's start (step 3), then flat
    got = [lr_wd(grpo, s)[0] for s in range(3, 9)]
    want = [1e-4, 2e-4, 3e-4, 4e-4, 4e-4, 4e-4]
    assert [wd for _, wd in got] == [0.0] * 6
    assert [lr for lr, _ in got] == pytest.approx(want)
    # Adam's state: kept inside a segment, cleared only at a segment's first step
    enter_segment(opt, cfg, cot, 0, model, None, guard)
    _adam_step(opt, model)
    assert len(opt.state) == 2
    enter_segment(opt, cfg, cot, 1, model, None, guard)
    assert len(opt.state) == 2 and int(opt.state[model.weight]["step"]) == 1
    _adam_step(opt, model)
    enter_segment(opt, cfg, grpo, 4, model, None, guard)  # inside grpo (a resumed run): not its first step
    assert int(opt.state[model.weight]["step"]) == 2
    wrapped = enter_segment(opt, cfg, grpo, 3, model, None, guard)
    assert len(opt.state) == 0 and isinstance(wrapped, GuardedOptimizer)
    assert wrapped.grad_clip == cfg.grad_clip and wrapped.guard is guard


def test_enter_segment_trains_only_the_value_third_of_gpt2s_fused_attention():
    lm = tiny_gpt2(20, n_layer=1, n_embd=8, n_head=2)
    cfg = OptimConfig()
    grpo = _segments(cfg)[1]
    opt = torch.optim.AdamW(lm.parameters())
    guarded = enter_segment(opt, cfg, grpo, 3, lm, "value", NonFiniteGuard(1))
    trained = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert trained == ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias"]
    lm(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    guarded.step(torch.tensor(1.0))  # zeroes the Q and K columns' gradients before the step
    g = lm.transformer.h[0].attn.c_attn.weight.grad
    assert g[:, :16].abs().sum() == 0 and g[:, 16:].abs().sum() > 0


def test_guarded_step_skips_a_non_finite_update_and_stops_after_too_many():
    model = torch.nn.Linear(3, 1)
    opt = GuardedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), list(model.parameters()), [],
                           grad_clip=1.0, guard=NonFiniteGuard(max_bad_steps=2))
    before = model.weight.detach().clone()

    def step(scale: float):
        opt.zero_grad()
        loss = model(torch.ones(1, 3)).sum() * scale
        loss.backward()
        return opt.step(loss.detach())

    stepped, norm = step(float("nan"))
    assert not stepped and norm != norm  # NaN norm reported for a skipped update
    assert torch.equal(model.weight, before) and opt.skipped == 1 and opt.last_skip_count == 1
    assert all(p.grad is None for p in model.parameters())  # the bad gradient is dropped
    stepped, norm = step(1.0)  # a good step updates (clipped to norm 1) and resets the guard's count
    assert stepped and norm == pytest.approx(2.0) and not torch.equal(model.weight, before)
    assert opt.guard.bad_steps == 0 and opt.skipped == 1
    after_good = model.weight.detach().clone()
    assert not step(float("inf"))[0] and not step(float("nan"))[0]  # 2 in a row: still allowed
    with pytest.raises(NonFiniteStop, match="3 non-finite updates in a row"):
        step(float("nan"))  # max_bad_steps + 1 in a row
    assert torch.equal(model.weight, after_good) and opt.skipped == 4


@pytest.mark.parametrize("kw, key", [
    ({"lr": 0}, "optim.lr=0"),
    ({"grpo_lr": -1e-5}, "optim.grpo_lr=-1e-05"),
    ({"grad_clip": 0.0}, "optim.grad_clip=0.0"),
    ({"grpo_warmup_steps": -1}, "optim.grpo_warmup_steps=-1"),
    ({"weight_decay": -0.1}, "optim.weight_decay=-0.1"),
    ({"max_bad_steps": -2}, "optim.max_bad_steps=-2"),
    ({"betas": (0.9, 1.0)}, r"optim.betas=\(0.9, 1.0\)"),
])
def test_optim_config_refuses_bad_values_naming_the_key(kw, key):
    with pytest.raises(ValueError, match=key):
        OptimConfig(**kw)


def test_optim_config_defaults_and_betas_as_a_tuple():
    cfg = OptimConfig(betas=[0.8, 0.9])
    assert cfg.betas == (0.8, 0.9) and cfg.grpo_lr == 5e-5 and cfg.lr == 1e-3 and cfg.max_bad_steps == 5
