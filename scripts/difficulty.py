"""The synthetic task's difficulty for the paper's-setting study (issue 22): a few probes, each a converged start.

    python scripts/difficulty.py --work DIR [--out docs/results/difficulty] [--probes p4_20 p4_40 p5_20]
        [--threads N] [--report-only]

Each probe trains one start with ``experiments/configs/synthetic/converged.yaml`` (dropout-trained at
``perturb.p_train``, plateau rule on 2,000 validation problems, linear decay of the lr at the end of the CoT
phase and of the fully latent stage) on one setting of the task (steps, value range, operators) and reports
the CoT and fully latent test greedy pass@1 (n=1,000), the validation curves, the steps of each stage and
the wall time. The target (issue 22): the converged fully latent model between 25% and 60%, the CoT model
above it, a start within about an hour on the 2-core machine.

Resumable: a finished probe is skipped; an unfinished one continues from its ``last.ckpt``. Progress goes to
``WORK/progress.log``; the table to ``OUT/README.md`` and ``OUT/results.json``, the curves to ``OUT/<probe>/``.
Run it detached, from a fixed commit, e.g. ``nohup python scripts/difficulty.py --work /work/runs/difficulty &``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lightning_latent.experiments.tasks import TASKS, probe_args

REPO = Path(__file__).resolve().parents[1]
PROBES = ("p4_20", "p4_40", "p5_20")  # lightning_latent/experiments/tasks.py: TASKS


def log(work: Path, msg: str) -> None:
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
    print(line, flush=True)
    with open(work / "progress.log", "a") as f:
        f.write(line + "\n")


def run_probe(name: str, work: Path, threads: int) -> Path:
    task, stages = TASKS[name].synthetic(), TASKS[name].stages
    vdir = work / "tb" / name / "v0"
    if (vdir / "summary.json").exists():
        return vdir
    # the study's start at seed 0 (Study.coconut with a converged_<task> budget): the same arguments
    args = [sys.executable, str(REPO / "experiments" / "run.py"), *probe_args(name),
            "--trainer.logger.init_args.save_dir", str(work / "tb"),
            "--trainer.logger.init_args.name", name, "--trainer.logger.init_args.version", "v0",
            "--trainer.enable_progress_bar", "false"]
    last = vdir / "checkpoints" / "last.ckpt"
    if last.exists():
        (vdir / "config.yaml").unlink(missing_ok=True)
        args += ["--ckpt_path", str(last)]
        log(work, f"{name}: resuming from {last}")
    else:
        log(work, f"{name}: starting ({task}, {stages} latent stages, {threads} torch threads)")
    t = time.perf_counter()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(threads)}
    with open(work / f"{name}.log", "a") as out:
        rc = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, cwd=work, env=env).returncode
    if rc != 0:
        raise SystemExit(f"{name} failed (exit {rc}); see {work / f'{name}.log'}")
    log(work, f"{name}: finished this attempt in {time.perf_counter() - t:.0f} s")
    return vdir


def report(work: Path, out: Path) -> list[dict]:
    rows = []
    for name in PROBES:
        task, stages = TASKS[name].synthetic(), TASKS[name].stages
        vdir = work / "tb" / name / "v0"
        if not (vdir / "summary.json").exists():
            continue
        s = json.loads((vdir / "summary.json").read_text())
        phase = {r["phase"]: r for r in s["phases"]}
        env = json.loads((vdir / "env.json").read_text()) if (vdir / "env.json").exists() else {}
        rows.append({"probe": name, **task, "latent_stages": stages,
                     "cot_test": phase.get("cot", {}).get("test_pass@1"),
                     "latent_test": phase.get("coconut_final", {}).get("test_pass@1"),
                     "latent_val": phase.get("coconut_final", {}).get("val_pass@1"),
                     "test_n": phase.get("coconut_final", {}).get("test_n"),
                     "segment_steps": [(x["phase"], x["stage"], x["steps"]) for x in s.get("segment_steps", [])],
                     "seconds": s.get("seconds"), "cpu_capability": env.get("cpu_capability"),
                     "matmul_gflops": env.get("matmul_1024_fp32_gflops"), "commit": env.get("git_commit")})
        subprocess.run([sys.executable, str(REPO / "scripts" / "plateau_curves.py"), str(vdir), str(out / name)],
                       capture_output=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    lines = ["# The synthetic task's difficulty (issue 22)", "",
             "Each probe is one start from `experiments/configs/synthetic/converged.yaml` (seed 0): dropout-trained "
             "(`p_train` 0.1), plateau rule on 2,000 validation problems, lr decay at the end of CoT and of the fully "
             "latent stage. Test greedy pass@1 on 1,000 problems (95% interval about ±3 points). Target: fully "
             "latent 25-60%, CoT above, about an hour per start on 2 cores. Written by `scripts/difficulty.py`.", "",
             "| probe | steps | numbers / values | CoT test | fully latent test | latent val | wall | CPU |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = (lambda v: f"{100 * v:.1f}%" if v is not None else "-")  # noqa: E731
        lines.append(f"| {r['probe']} | {r['min_steps']} | {r['max_number']} / {r['max_value']} | {f(r['cot_test'])} | "
                     f"{f(r['latent_test'])} | {f(r['latent_val'])} | {(r['seconds'] or 0) / 60:.0f} min | "
                     f"{r['cpu_capability']}, {r['matmul_gflops']} GFLOP/s |")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="runs and checkpoints (outside the repository)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "difficulty")
    ap.add_argument("--probes", nargs="+", default=list(PROBES), choices=list(PROBES))
    ap.add_argument("--threads", type=int, default=2, help="torch threads per probe (OMP_NUM_THREADS)")
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if not a.report_only:
        for name in a.probes:
            run_probe(name, a.work, a.threads)
            report(a.work, a.out)
    for r in report(a.work, a.out):
        print(json.dumps(r))


if __name__ == "__main__":
    main()
