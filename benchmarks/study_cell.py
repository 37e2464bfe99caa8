"""Where a study seed's time goes, and two commits side by side on the same cells.

    python benchmarks/study_cell.py --start CKPT [--old REF] [--new REF] [--budget plateau] [--arms ARM ...]
        [--parts start,cells] [--out DIR] [--jobs 1] [--new-jobs N] [--eval-batch-size N]

For each commit (``--old``, default the commit before issue 21; ``--new``, default the working tree) it runs,
as a subprocess of that commit's own code (a git worktree, ``PYTHONPATH`` pointing at it):

* ``cells``: the study's cells of one seed with the given arms (default one, ``dropout_shared``), through the
  study's own entry point (``Study.run`` with ``seeds=1``, no diversity curve): the start's test cell, each
  arm's RL cell and test cell, from the checkpoint ``--start`` (the study's start cell is pre-filled with it);
* ``start``: a fixed slice of a start, ``experiments/run.py fit --config <budget's start config>
  --trainer.max_steps 500`` (its first 500 steps, its plateau evaluations and checkpoint writes).

Every Python process of a run is profiled by part (``benchmarks/cell_profiler.py``, loaded through
``benchmarks/cell_profile/sitecustomize.py``: process start, imports, model build, checkpoint reads and
writes, data, rollouts, replay + loss + backward, reference, optimiser, validation, phase-end
evaluations, test greedy and sampled decoding, other). The seed figure (``--jobs 1`` only) adds to the
measured cells what a 7-arm seed repeats: the missing (RL + test) pairs at the first arm's cost, less what a
seed computes once (the start's validation) (``seed_seconds``). ``--new-jobs`` runs the new side at another
``--jobs`` (1 thread per job: its numbers may differ from ``--jobs 1``'s, which the comparison then shows). ``identical`` is true when both commits' cells give the same numbers: the RL cell's
validation and reward curves, its start validation, the chosen checkpoint's step and weights (bit for
bit), and the test cells' per-problem correctness, pass@1, sampled pass@1, pass@k and maj@k; for the
start slice, its final weights and plateau evaluations.

Prints one JSON object last (also written to ``OUT/study_cell.json``), with the CPU's kernel level and a
1024x1024 fp32 matmul's GFLOP/s. Timings compare only within one run on one machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROFILE_SITE = REPO / "benchmarks" / "cell_profile"
OLD_DEFAULT = "6187983"  # the last commit before issue 20 and 21 (2026-12-05)
# The start's schedule: the default run's curriculum (its phase-coconut.ckpt is a trained latent start)
START_SCHEDULE = '[{"kind":"cot","steps":700},{"kind":"coconut","steps":[200,300,800],"stages":[1,2,3]}]'
SEED_ARMS = 7  # arms per seed in the study (study_arms())


def cpu_facts(threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    n, t = 20, time.perf_counter()
    for _ in range(n):
        a @ b
    dt = time.perf_counter() - t
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": threads,
            "matmul_1024_fp32_gflops": round(2 * 1024 ** 3 * n / dt / 1e9, 1), "cpu_count": os.cpu_count(),
            "torch": torch.__version__}


def checkout(ref: str | None, work: Path, name: str) -> Path:
    """The source tree of ``ref`` (a worktree under ``work``); None: this working tree."""
    if ref is None:
        return REPO
    dest = work / f"src_{name}"
    if not dest.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(dest), ref], check=True,
                       capture_output=True)
    return dest


def commit_of(src: Path) -> str:
    out = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def side_env(src: Path, prof: Path, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{PROFILE_SITE}", "LL_CELL_PROFILE": str(prof),
           "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    return env


def profile_sum(prof: Path) -> dict:
    """The parts of every profiled process under ``prof``, summed (seconds)."""
    parts: dict[str, float] = {}
    procs = 0
    for f in sorted(prof.glob("*.json")):
        d = json.loads(f.read_text())
        procs += 1
        for k in ("process_start_to_site", "imports", "other"):
            parts[f"({k})"] = parts.get(f"({k})", 0.0) + d[k]
        for k, v in d["parts"].items():
            parts[k] = parts.get(k, 0.0) + v
    total = sum(parts.values())
    return {"processes": procs, "seconds": round(total, 1),
            "parts": {k: {"s": round(v, 1), "share": round(v / total, 3) if total else 0.0}
                      for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}}


# -- one side (runs inside the side's own source tree) ---------------------------------------------------
def run_cells_side(a: argparse.Namespace) -> None:
    """Inside a subprocess with PYTHONPATH = the side's tree: one seed's cells through Study.run."""
    import dataclasses
    import importlib

    # Only the side's own tree: an editable install's finder would fill in modules the tree lacks from the
    # installed checkout (the old tree has no lightning_latent/experiments/), mixing two commits' code.
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in str(getattr(f, "__module__", "")).lower()]
    new_layout = (Path.cwd() / "lightning_latent" / "experiments").is_dir()
    study_mod = importlib.import_module("lightning_latent.experiments.study" if new_layout else "lightning_latent.study")
    assert Path(study_mod.__file__).resolve().is_relative_to(Path.cwd().resolve()), study_mod.__file__
    budget = dataclasses.replace(study_mod.BUDGETS[a.budget], coconut_args=["--model.schedule", START_SCHEDULE])
    if a.eval_batch_size:  # --data.eval_batch_size in every cell (a study option tried in issue 21: slower)
        budget = dataclasses.replace(budget, common=[*budget.common, "--data.eval_batch_size", str(a.eval_batch_size)])
    kw = {"jobs": a.jobs} if "jobs" in study_mod.Study.__init__.__code__.co_varnames else {}
    st = study_mod.Study(a.side_out / "out", seeds=1, arms=tuple(a.arms), budget=budget, diversity=False,
                         work=a.side_out / "work", **kw)
    (st.cells / "coconut_s0.json").write_text(json.dumps({"ckpt": str(a.start), "seconds": None}))
    times: dict[str, float] = {}
    for name in ("train_arm", "evaluate"):  # each cell's wall time (cells run one at a time with --jobs 1)
        orig = getattr(study_mod.Study, name)

        def timed(self, seed, tag, *rest, _orig=orig, _name=name):
            t0 = time.perf_counter()
            r = _orig(self, seed, tag, *rest)
            times[f"{_name}:{tag}"] = round(time.perf_counter() - t0, 2)
            return r

        setattr(study_mod.Study, name, timed)
    t = time.perf_counter()
    st.run()
    (a.side_out / "cells_seconds.json").write_text(json.dumps({"seconds": time.perf_counter() - t, "cells": times}))


def side_cells(src: Path, out: Path, a: argparse.Namespace) -> dict:
    prof = out / "profile_cells"
    prof.mkdir(parents=True, exist_ok=True)
    env = side_env(src, prof, a.threads)
    jobs = a.new_jobs if (a.new_jobs and out.name == "new") else a.jobs
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side-cells", "--side-out", str(out), "--start",
           str(a.start), "--budget", a.budget, "--arms", *a.arms, "--jobs", str(jobs), "--threads", str(a.threads)]
    if a.eval_batch_size and out.name == "new":
        cmd += ["--eval-batch-size", str(a.eval_batch_size)]
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"cells of {src} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    per_cell = json.loads((out / "cells_seconds.json").read_text())["cells"]
    return {"wall_seconds": round(wall, 1), "cells": per_cell, "profile": profile_sum(prof)}


def side_start(src: Path, out: Path, a: argparse.Namespace, start_config: str) -> dict:
    prof = out / "profile_start"
    prof.mkdir(parents=True, exist_ok=True)
    env = side_env(src, prof, a.threads)
    cmd = [sys.executable, "experiments/run.py", "fit", "--config", f"experiments/configs/synthetic/{start_config}",
           "--trainer.max_steps", str(a.start_steps), "--seed_everything", "0", "--data.seed", "0",
           "--trainer.default_root_dir", str(out / "start_run"), "--trainer.enable_progress_bar", "false"]
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"start slice of {src} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return {"wall_seconds": round(wall, 1), "profile": profile_sum(prof)}


# -- comparing the numbers --------------------------------------------------------------------------------------
def _load(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def same_weights(a: Path, b: Path) -> bool:
    import torch

    sa, sb = _load(a)["state_dict"], _load(b)["state_dict"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def compare_cells(old: Path, new: Path) -> dict:
    """Field by field: what differs between the two sides' cell records (timings left out)."""
    out: dict[str, object] = {}
    names = sorted({f.stem for f in (old / "work" / "cells").glob("*.json")} |
                   {f.stem for f in (new / "work" / "cells").glob("*.json")})
    for name in names:
        if name.startswith("coconut_s"):
            continue
        fa, fb = old / "work" / "cells" / f"{name}.json", new / "work" / "cells" / f"{name}.json"
        if name.startswith("val_start_") and not fa.exists():
            continue  # computed once per seed since issue 21: compared as the train cells' start_val
        if not (fa.exists() and fb.exists()):
            out[name] = "missing on one side"
            continue
        ca, cb = json.loads(fa.read_text()), json.loads(fb.read_text())
        diffs = [k for k in sorted(set(ca) | set(cb)) if k not in ("seconds", "ckpt") and ca.get(k) != cb.get(k)]
        if name.startswith("train_"):
            ka, kb = _load(Path(ca["ckpt"])), _load(Path(cb["ckpt"]))
            if ka["schedule_state"]["step_count"] != kb["schedule_state"]["step_count"]:
                diffs.append("chosen checkpoint step")
            if not same_weights(Path(ca["ckpt"]), Path(cb["ckpt"])):
                diffs.append("chosen checkpoint weights")
        out[name] = diffs
    return out


def compare_start(old: Path, new: Path) -> list[str]:
    import torch

    def last(d: Path) -> Path:
        return next((d / "start_run").rglob("last.ckpt"))

    diffs = []
    if not same_weights(last(old), last(new)):
        diffs.append("final weights")
    pa = _load(last(old))["schedule_state"].get("plateau", {}).get("history")
    pb = _load(last(new))["schedule_state"].get("plateau", {}).get("history")
    if pa != pb:
        diffs.append("plateau evaluations")
    del torch
    return diffs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--start", type=Path, help="the start checkpoint of the cells (a trained latent model whose "
                                               "schedule is START_SCHEDULE: the default run's phase-coconut.ckpt)")
    ap.add_argument("--old", default=OLD_DEFAULT, help="the commit to compare against (git ref)")
    ap.add_argument("--new", default=None, help="the new commit (git ref; default: this working tree)")
    ap.add_argument("--budget", default="plateau")
    ap.add_argument("--arms", nargs="+", default=["dropout_shared"],
                    help="the arms of the seed (the first is the one whose cost the seed figure repeats)")
    ap.add_argument("--parts", default="start,cells")
    ap.add_argument("--start-steps", type=int, default=500)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--new-jobs", type=int, default=None,
                    help="the new side's --jobs (default: --jobs); more than 1 sets 1 thread per job, so the numbers "
                         "may differ from --jobs 1 (float rounding depends on the thread count)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per process (OMP_NUM_THREADS)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--sides", default="old,new", help="which sides to run (old, new or both)")
    ap.add_argument("--eval-batch-size", type=int, default=None,
                    help="the new side's cells evaluate in batches of this many problems (default: the configs' 64)")
    ap.add_argument("--side-cells", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--side-out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side_cells:
        return run_cells_side(a)
    if "cells" in a.parts and (a.start is None or not a.start.exists()):
        ap.error("--start CKPT is needed for the cells (e.g. logs/default/version_0/checkpoints/phase-coconut.ckpt "
                 "of `python experiments/run.py fit`)")
    out = (a.out or Path(tempfile.mkdtemp(prefix="study_cell_"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if a.start is not None:
        a.start = a.start.resolve()
    start_config = "plateau.yaml"
    result: dict = {"budget": a.budget, "arms": a.arms, "jobs": a.jobs, "new_jobs": a.new_jobs or a.jobs,
                    "new_eval_batch_size": a.eval_batch_size,
                    **cpu_facts(a.threads), "sides": {}}
    refs = {"old": a.old, "new": a.new}
    for side in a.sides.split(","):
        src = checkout(refs[side], out, side)
        d = out / side
        r: dict = {"commit": commit_of(src)}
        if "cells" in a.parts:
            r["cells"] = side_cells(src, d, a)
            c = r["cells"]["cells"]
            arm = a.arms[0]
            per_arm = c.get(f"train_arm:{arm}", 0.0) + c.get(f"evaluate:{arm}", 0.0)
            once = d / "work" / "cells" / "val_start_latent_s0.json"  # once per seed, inside the first train_arm
            if once.exists():
                per_arm -= json.loads(once.read_text()).get("seconds") or 0.0
            jobs = a.new_jobs if (a.new_jobs and side == "new") else a.jobs
            r["jobs"] = jobs
            if jobs == 1:  # (with parallel cells the cells' own times do not add up to a wall time)
                r["cells"]["seed_seconds"] = round(r["cells"]["wall_seconds"] + (SEED_ARMS - len(a.arms)) * per_arm, 1)
        if "start" in a.parts:
            r["start"] = side_start(src, d, a, start_config)
        result["sides"][side] = r
        print(json.dumps({side: {k: (v["wall_seconds"] if isinstance(v, dict) else v) for k, v in r.items()}}),
              flush=True)
    if set(result["sides"]) == {"old", "new"}:
        so, sn = result["sides"]["old"], result["sides"]["new"]
        identical = True
        if "cells" in a.parts:
            diffs = compare_cells(out / "old", out / "new")
            result["cells_differences"] = diffs
            identical &= all(v == [] for v in diffs.values())
            result["cells_speedup"] = round(so["cells"]["wall_seconds"] / sn["cells"]["wall_seconds"], 2)
            if "seed_seconds" in so["cells"] and "seed_seconds" in sn["cells"]:
                result["seed_cells_speedup"] = round(so["cells"]["seed_seconds"] / sn["cells"]["seed_seconds"], 2)
        if "start" in a.parts:
            diffs = compare_start(out / "old", out / "new")
            result["start_differences"] = diffs
            identical &= not diffs
            result["start_speedup"] = round(so["start"]["wall_seconds"] / sn["start"]["wall_seconds"], 2)
        result["identical"] = identical
    (out / "study_cell.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
