"""Carry a long experiment's work directory from one machine to the next, through the repository.

A session's machine may not come back (issue 22's runs in ``/work/runs/paper`` were lost with one), and the
study's cells name their checkpoints by absolute path. ``save`` packs what a resumed pipeline needs into one
tar file: every cell record, log, summary, TensorBoard event file and Optuna database, and of the
checkpoints only those that cost hours and cannot be rebuilt by rerunning a short cell:

- every checkpoint a cell record names (starts, extensions, repairs, a train cell whose test has not run);
  a finished train cell's checkpoint is left out (its test cell holds the result; ``Study`` retrains a
  missing one, deterministically, if it is ever needed);
- ``last.ckpt`` and ``phase-cot.ckpt`` of every supervised start run (``tb/{coconut,extend,repair}/*``):
  those of a start still training resume from there (``cot_grpo`` starts from ``phase-cot.ckpt``).

RL runs still in progress are not kept: they are not resumable and rerun from scratch.
``restore`` unpacks it at the directory it was saved from (the cells' paths) and refuses to overwrite one.

    python scripts/work_state.py save /work/runs/paper experiments/runs_state/paper.tar
    python scripts/work_state.py restore experiments/runs_state/paper.tar
"""
from __future__ import annotations

import argparse
import json
import sys
import tarfile
import zipfile
from pathlib import Path

START_RUNS = ("coconut", "extend", "repair")
START_CKPTS = ("last.ckpt", "phase-cot.ckpt")


def _ckpts_named(obj) -> set[str]:
    """Every string ending in .ckpt inside a cell record."""
    if isinstance(obj, str):
        return {obj} if obj.endswith(".ckpt") else set()
    if isinstance(obj, dict):
        return set().union(*(_ckpts_named(v) for v in obj.values())) if obj else set()
    if isinstance(obj, list):
        return set().union(*(_ckpts_named(v) for v in obj)) if obj else set()
    return set()


def kept_checkpoints(work: Path) -> set[Path]:
    """The checkpoints ``save`` keeps (module doc)."""
    keep: set[Path] = set()
    for f in work.rglob("cells/*.json"):
        if f.name.startswith("train_") and (f.parent / ("test_" + f.name[len("train_"):])).exists():
            continue
        try:
            keep |= {Path(p) for p in _ckpts_named(json.loads(f.read_text()))}
        except json.JSONDecodeError as e:
            raise SystemExit(f"{f}: not a readable cell record ({e}); fix or move it before saving") from e
    for run in START_RUNS:
        for d in work.rglob(f"tb/{run}/*/checkpoints"):
            keep |= {d / n for n in START_CKPTS}
    return {p.resolve() for p in keep if p.exists() and work.resolve() in p.resolve().parents}


def save(work: Path, out: Path) -> dict:
    work = work.resolve()
    keep = kept_checkpoints(work)
    for p in sorted(keep):  # a checkpoint caught mid-write (a run killed while saving) would resume nothing
        if not zipfile.is_zipfile(p) or zipfile.ZipFile(p).testzip() is not None:
            raise SystemExit(f"{p} is not a whole checkpoint (torch saves a zip archive): stop its run, and remove "
                             "the file to rerun from the one before, or rerun the save once the run has saved again")
    files = [p for p in sorted(work.rglob("*")) if p.is_file() and (p.suffix != ".ckpt" or p.resolve() in keep)]
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest = {"work": str(work), "files": len(files), "checkpoints": sorted(str(p.relative_to(work)) for p in keep),
                "bytes": sum(p.stat().st_size for p in files)}
    with tarfile.open(out, "w") as tar:
        for p in files:
            tar.add(p, arcname=str(p.relative_to(work)))
    out.with_suffix(".json").write_text(json.dumps(manifest, indent=1))
    return manifest


def restore(tar_path: Path, work: Path | None = None) -> Path:
    manifest = json.loads(tar_path.with_suffix(".json").read_text())
    work = (work or Path(manifest["work"])).resolve()
    if str(work) != manifest["work"]:
        raise SystemExit(f"the cells name their checkpoints under {manifest['work']}; restore there, not {work}")
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"{work} is not empty: move it aside first (restore never overwrites a run)")
    work.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path) as tar:
        tar.extractall(work, filter="data")
    return work


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save")
    s.add_argument("work", type=Path)
    s.add_argument("out", type=Path)
    r = sub.add_parser("restore")
    r.add_argument("tar", type=Path)
    a = ap.parse_args(argv)
    if a.cmd == "save":
        m = save(a.work, a.out)
        print(json.dumps({k: m[k] for k in ("work", "files", "bytes")} | {"checkpoints": len(m["checkpoints"])}))
    else:
        print(restore(a.tar))


if __name__ == "__main__":
    sys.exit(main())
