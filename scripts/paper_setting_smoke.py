"""Smoke run of scripts/paper_setting.py on a tiny model: every step end to end (about 8 min on 2 cores).

    python scripts/paper_setting_smoke.py WORKDIR [UNTIL]

The tiny budget (study.BUDGETS["tiny"]) with the task p4_40, and tiny sweep trials (25 RL steps, 8 validation
problems): the numbers mean nothing; what it shows is that every step runs, chooses and hands its choice on.
"""
import json
import logging
import sys
from pathlib import Path
from dataclasses import replace
from lightning_latent.experiments.study import BUDGETS
from lightning_latent.experiments.paper_setting import PaperSetting
from lightning_latent.experiments.tasks import task_args

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
tiny = BUDGETS["tiny"]
budgets = {}
for p in (0.0, 0.05, 0.1, 0.2):
    real = BUDGETS["converged_p4_40" if p == 0.1 else f"converged_p4_40_pt{p:g}"]
    budgets["converged_p4_40" if p == 0.1 else f"converged_p4_40_pt{p:g}"] = replace(
        tiny, common=[*tiny.common, *task_args("p4_40"), "--model.perturb.p_train", str(p)],
        coconut_args=["--model.schedule", '[{"kind":"cot","steps":2},{"kind":"coconut","steps":1,"stages":[1,2,3,4]}]',
                      "--data.test_limit", "8"],
        converged_lr=1e-5, own_noise=True, arm_args=real.arm_args)
sets = ("args.model.backbone.n_layer=1", "args.model.backbone.n_embd=32", "args.model.backbone.n_head=2",
        "args.model.grpo_prompts=2", "args.model.grpo.group_size=2", "args.model.grpo.max_new_tokens=6",
        "args.model.evaluation.max_new_tokens=8", "args.data.val_limit=8", "args.data.test_limit=8",
        "args.trainer.val_check_interval=5", "args.data.eval_batch_size=8", "args.model.batch_size=8")
w = Path(sys.argv[1])
ps = PaperSetting("p4_40", w / "work", w / "out", w / "study", grid_steps=25,
                  seeds=2, max_seeds=3, budgets=budgets, sweep_sets=sets)
print(json.dumps(ps.run(sys.argv[2] if len(sys.argv) > 2 else "extend"), indent=1))
