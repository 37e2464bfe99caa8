"""How far the frozen GRPO reference scores rollouts from the policy at a phase's start, where both are the same
weights: the largest |log-prob difference| over the answer tokens and the gradient norm of each inner iteration
of the first GRPO steps. On a correct build both are exactly 0 for an arm without signal (``none``: every
advantage 0), on any CPU; before the fix in ``LatentLM`` (a contiguous slice into the output embedding) an Intel
AVX-512 CPU gave a few 1e-6 and a gradient that Adam turned into lr-sized steps (``docs/design.md#hazards``).

    python scripts/reference_gap.py OUT.json -- fit --config experiments/configs/synthetic/dropout_grpo.yaml \\
        --config experiments/configs/synthetic/arms/none.yaml --model.init_from START.ckpt \\
        --model.schedule '[{"kind": "grpo", "steps": 2, "name": "none"}]' ...

Everything after ``--`` is ``experiments/run.py``'s command line, run with the ``lightning_latent`` on
``sys.path`` (``PYTHONPATH=OTHER_CHECKOUT`` measures another commit); the run's own outputs go where its
arguments say. Prints and writes one JSON object: the commit, the CPU's kernel level and one row per inner
iteration.
"""
from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import torch

import lightning_latent
from lightning_latent.rl import update


def main() -> None:
    if "--" not in sys.argv or sys.argv.index("--") != 2:
        sys.exit(__doc__)
    out, run_args = Path(sys.argv[1]), sys.argv[3:]
    root = Path(lightning_latent.__file__).resolve().parents[1]
    rows: list[dict] = []
    original = update.backward_micro_batches

    def measured(model, perturber, batch, advantages, ref_logp, *args, **kwargs):
        result = original(model, perturber, batch, advantages, ref_logp, *args, **kwargs)
        grads = [p.grad.double() for p in model.parameters() if p.grad is not None]
        m = batch.mask.bool()
        rows.append({"iteration": len(rows),
                     "max_abs_advantage": float(advantages.abs().max()),
                     "max_abs_logp_minus_ref": None if ref_logp is None else float((result[1] - ref_logp).abs()[m].max()),
                     "grad_norm": float(torch.sqrt(sum((g ** 2).sum() for g in grads))) if grads else 0.0})
        return result

    update.backward_micro_batches = measured
    sys.argv = ["run.py", *run_args]
    try:
        runpy.run_path(str(root / "experiments" / "run.py"), run_name="__main__")
    except SystemExit as e:  # LightningCLI's own exit
        if e.code not in (0, None):
            raise
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()  # "" outside a git checkout
    report = {"commit": commit, "package": str(root), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "iterations": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
