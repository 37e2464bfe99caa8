"""The path of one GRPO batch through the package, from the data module to the optimiser step.

    python scripts/grpo_step_path.py [--json]

Runs one GRPO step of a tiny model (beta > 0, mu = 2, so the reference and both inner iterations are on
the path) under ``sys.setprofile`` and records the package's call stack (frames in ``lightning_latent/``
only; Lightning and torch frames in between are skipped) at each milestone of the step:

    the loader is planned -> the batch leaves the data module -> rollouts generated -> reference log-probs -> each inner
    iteration's replay, loss and backward -> each optimiser step

A reader following the batch goes from one milestone's stack to the next: back up to the frames the two
stacks share, then down the new frames. A frame is a place in the code (its function and the line that
called it), so the second inner iteration, which runs the same lines again, adds nothing. A *move* is a
step down into a frame of another file than the frame above it, the first time the reader gets there
(going back up is not counted: the reader returns to where they were; nor is a place already read). Only milestones inside the training step count (not the validation after it). The script prints
the moves in order, their number, and how often each file is entered. It measures any commit of the
package (the API it uses has not changed), so the figure before and after a refactor comes from one
definition. Prints one JSON object last (``--json``: only that).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter

import lightning as L
import torch

PKG = "lightning_latent" + ("/" if sys.platform != "win32" else "\\")
# (file suffix, function) -> milestone name; the first frame outside the package that matches ends the stack
MILESTONES = {
    ("lightning_latent/schedule.py", "data_plan"): "loader planned",
    ("lightning_latent/data/datamodule.py", "__iter__"): "batch",
    ("lightning_latent/model/latent_lm.py", "generate"): "rollout",
    ("lightning_latent/rl/reference.py", "logprobs"): "reference",
    ("lightning_latent/rl/rollout.py", "replay_logprobs"): "replay",
    ("lightning_latent/rl/loss.py", "grpo_loss"): "loss",
    ("lightning_latent/rl/grpo.py", "grpo_loss"): "loss",  # the loss's file before it was renamed
    ("torch/_tensor.py", "backward"): "backward",
    ("torch/optim/adamw.py", "step"): "optimiser step",
    ("torch/optim/adam.py", "step"): "optimiser step",  # AdamW's step where AdamW subclasses Adam
}


def _short(path: str) -> str:
    i = path.rfind(PKG)
    return path[i + len(PKG):] if i >= 0 else path


def trace_one_grpo_step() -> list[tuple[str, list[tuple]]]:
    """[(milestone, [(file, function, first line, calling line), ...] package frames outermost first)] in
    the order they happened."""
    from lightning_latent.data.datamodule import LatentDataModule
    from lightning_latent.data.layout import CurriculumConfig
    from lightning_latent.model.build import ModelConfig
    from lightning_latent.module import LatentReasoner
    from lightning_latent.rl.update import GRPOConfig
    from lightning_latent.schedule import Phase

    L.seed_everything(0, verbose=False)
    module = LatentReasoner(backbone=ModelConfig(n_layer=1, n_embd=32, n_head=2),
                            curriculum=CurriculumConfig(c_thought=1, max_latent_stage=2),
                            schedule=[Phase("grpo", steps=1)], grpo_prompts=2,
                            grpo=GRPOConfig(group_size=2, max_new_tokens=4, beta=0.05, mu=2))
    events: list[tuple[str, list[tuple]]] = []
    seen: set[str] = set()

    def profiler(frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        key = next((k for k in MILESTONES if code.co_filename.endswith(k[0]) and code.co_name == k[1]), None)
        if key is None:
            return
        name = MILESTONES[key]
        frames, f = [], frame
        while f is not None:
            if PKG in f.f_code.co_filename:
                frames.append(f)
            f = f.f_back
        frames = frames[::-1]
        if name in ("loader planned", "batch"):
            if name in seen:
                return
            seen.add(name)
        elif not any(fr.f_code.co_name == "training_step" for fr in frames):
            return
        # a place in the code: (file, function, its first line, the line of the package frame that called it)
        stack = [(_short(fr.f_code.co_filename), fr.f_code.co_qualname, fr.f_code.co_firstlineno,
                  frames[i - 1].f_lineno if i > 0 else None) for i, fr in enumerate(frames)]
        events.append((name, stack))

    with tempfile.TemporaryDirectory() as d:
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=-1, reload_dataloaders_every_n_epochs=1,
                            check_val_every_n_epoch=None, val_check_interval=1000, num_sanity_val_steps=0,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=d)
        sys.setprofile(profiler)
        try:
            trainer.fit(module, datamodule=LatentDataModule(val_limit=2, test_limit=2, eval_batch_size=2))
        finally:
            sys.setprofile(None)
    return events


def moves(events: list[tuple[str, list[tuple]]]) -> list[dict]:
    """The moves of a reader walking from each milestone's stack to the next (see the docstring)."""
    out, prev, read = [], [], set()
    for name, stack in events:
        common = 0
        while common < min(len(prev), len(stack)) and prev[common] == stack[common]:
            common += 1
        above = stack[common - 1][0] if common > 0 else "(Lightning / data loader)"
        for depth in range(common, len(stack)):
            file, fn, *_ = stack[depth]
            place = tuple(stack[:depth + 1])
            if file != above and place not in read:
                out.append({"to": f"{file}:{fn}", "from": above, "milestone": name})
            read.add(place)
            above = file
        prev = stack
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print only the JSON summary")
    a = ap.parse_args()
    torch.set_num_threads(1)
    mv = moves(trace_one_grpo_step())
    if not a.json:
        for i, m in enumerate(mv, 1):
            print(f"{i:2d}. {m['from']} -> {m['to']}   ({m['milestone']})")
    entered = Counter(m["to"].split(":")[0] for m in mv)
    print(json.dumps({"moves": len(mv), "entered": dict(entered.most_common()),
                      "module_py_entered": entered.get("module.py", 0)}))


if __name__ == "__main__":
    main()
