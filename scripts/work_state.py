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

RL runs still in progress are not kept: on the same machine (the directory stays) they resume from their
``last.ckpt``; on a new one they rerun from scratch (about 20 minutes each; their two checkpoints would add
about 25 MB to the repository at every save).
The checkpoints go beside the tar, each as its own file under ``<tar stem>.ckpts/`` at its path in the work
directory, not inside the tar: a checkpoint that did not change between two saves (a finished start) is then
the same git blob, stored once in the repository's history, where a tar holding it would store it again at
every save (about 10 MB each; the repository must stay under its size limit). A save removes the files of
checkpoints it no longer keeps from that directory. ``restore`` unpacks the tar and copies the checkpoints back
at the directory they were saved from (the cells' paths), and refuses to overwrite one. (A tar of the first
format, its checkpoints inside, restores as well.)

Only a start's ``last.ckpt`` that no cell names yet (a start still training) is a point a run resumes from. Every
other kept checkpoint is read for its weights only: ``--model.init_from`` (extensions, converged checks, the arms,
``cot_grpo`` from ``phase-cot.ckpt``) reads ``state_dict`` and the tokenizer, and ``test --ckpt_path`` restores no
optimizer (Lightning restores optimizers only when fitting). Those are stored **slim**, without
``optimizer_states`` (two thirds of a checkpoint: Adam's two moments per weight), which the manifest lists with
the digest of the full file they came from; a full checkpoint already stored stays as it is (it is in git's
history anyway). A fit asked to resume from a slim one stops with Lightning's "contains only the model" error
rather than train on without its moments; in a study that can only happen to a start whose cell record was moved
aside, and ``Study._run`` then retrains that cell from scratch (its run folder removed), as for any failed resume.

    python scripts/work_state.py save /work/runs/paper experiments/runs_state/paper.tar
    python scripts/work_state.py restore experiments/runs_state/paper.tar
"""
from __future__ import annotations

import argparse
import filecmp
import fnmatch
import hashlib
import json
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
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


def resume_points(work: Path, keep: set[Path]) -> set[Path]:
    """The kept checkpoints a run resumes from: a start run's ``last.ckpt`` that no cell record names (module doc).
    ``keep``: resolved paths (:func:`kept_checkpoints`)."""
    named: set[Path] = set()
    for f in work.rglob("cells/*.json"):
        named |= {Path(p).resolve() for p in _ckpts_named(json.loads(f.read_text()))}
    return {p for p in keep if p.name == "last.ckpt" and p.parent.name == "checkpoints"
            and p.parent.parent.parent.name in START_RUNS and p not in named}


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def slim_checkpoint(src: Path, dst: Path) -> None:
    """``src`` without ``optimizer_states`` at ``dst`` (module doc); the rest, weights included, unchanged."""
    import torch

    if str(REPO) not in sys.path:  # the checkpoint's hyper-parameters unpickle into lightning_latent's classes
        sys.path.insert(0, str(REPO))
    ck = torch.load(src, map_location="cpu", weights_only=False)
    ck.pop("optimizer_states", None)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    torch.save(ck, tmp)
    tmp.replace(dst)


def save(work: Path, out: Path, exclude: tuple[str, ...] = (), exclude_files: tuple[str, ...] = ()) -> dict:
    """Pack ``work`` (module doc). ``exclude``: glob patterns of checkpoints (relative to ``work``) not to keep
    although the rule would, e.g. the starts of the ``p_train`` rates not chosen, whose every cell is done (their
    cell records and logs stay). ``exclude_files``: the same for the other files, e.g. the test runs'
    ``predictions_test.jsonl`` (1.4 MB each; their cells hold the per-problem results)."""
    work = work.resolve()
    keep = {p for p in kept_checkpoints(work)
            if not any(fnmatch.fnmatch(str(p.relative_to(work)), pat) for pat in exclude)}
    for p in sorted(keep):  # a checkpoint caught mid-write (a run killed while saving) would resume nothing
        if not zipfile.is_zipfile(p) or zipfile.ZipFile(p).testzip() is not None:
            raise SystemExit(f"{p} is not a whole checkpoint (torch saves a zip archive): stop its run, and remove "
                             "the file to rerun from the one before, or rerun the save once the run has saved again")
    files = [p for p in sorted(work.rglob("*")) if p.is_file() and p.suffix != ".ckpt"
             and not any(fnmatch.fnmatch(str(p.relative_to(work)), pat) for pat in exclude_files)]
    out.parent.mkdir(parents=True, exist_ok=True)
    rels = sorted(str(p.relative_to(work)) for p in keep)
    resume = {str(p.relative_to(work)) for p in resume_points(work, keep)}
    manifest_file = out.with_suffix(".json")
    before = json.loads(manifest_file.read_text()).get("slim", {}) if manifest_file.exists() else {}
    dest = ckpt_dir(out)
    slim: dict[str, str] = {}
    for rel in rels:
        d, src = dest / rel, work / rel
        if d.exists() and filecmp.cmp(d, src, shallow=False):  # unchanged (a slim one restored here is slim)
            if rel in before:
                slim[rel] = before[rel]
            continue
        if rel in resume:
            d.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, d)
            continue
        slim[rel] = digest(src)
        if not (d.exists() and before.get(rel) == slim[rel]):
            slim_checkpoint(src, d)
    manifest = {"work": str(work), "files": len(files) + len(keep), "checkpoints": rels,
                "checkpoint_dir": dest.name, "slim": slim,
                "bytes": sum(p.stat().st_size for p in (*files, *(dest / r for r in rels)))}  # as stored
    with tarfile.open(out, "w") as tar:
        for p in files:
            tar.add(p, arcname=str(p.relative_to(work)))
    for old in [f for f in dest.rglob("*.ckpt") if str(f.relative_to(dest)) not in rels] if dest.exists() else []:
        old.unlink()  # a checkpoint no longer kept (its history stays in git)
    manifest_file.write_text(json.dumps(manifest, indent=1))
    return manifest


def ckpt_dir(tar_path: Path) -> Path:
    """Where ``save`` puts the checkpoints of ``tar_path``: ``<stem>.ckpts/`` beside it."""
    return tar_path.with_suffix(".ckpts")


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
    src = tar_path.parent / manifest["checkpoint_dir"] if "checkpoint_dir" in manifest else None
    for rel in manifest["checkpoints"] if src else []:
        if not (src / rel).exists():
            raise SystemExit(f"{src / rel} is missing: the save of {tar_path} kept it (see its manifest)")
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, work / rel)
    return work


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save")
    s.add_argument("work", type=Path)
    s.add_argument("out", type=Path)
    s.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="checkpoints (paths relative to WORK) not to keep, e.g. 'p_train/pt0.1/*'")
    s.add_argument("--exclude-file", action="append", default=[], metavar="GLOB",
                   help="other files (paths relative to WORK) not to pack, e.g. '*/predictions_test.jsonl'")
    r = sub.add_parser("restore")
    r.add_argument("tar", type=Path)
    a = ap.parse_args(argv)
    if a.cmd == "save":
        m = save(a.work, a.out, tuple(a.exclude), tuple(a.exclude_file))
        print(json.dumps({k: m[k] for k in ("work", "files", "bytes")} | {"checkpoints": len(m["checkpoints"]),
                                                                             "slim": len(m["slim"])}))
    else:
        print(restore(a.tar))


if __name__ == "__main__":
    sys.exit(main())
