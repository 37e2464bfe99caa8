"""scripts/work_state.py: a work directory packed into the repository keeps what a resumed pipeline needs."""
import importlib.util
import json
import tarfile
from pathlib import Path

import pytest
import torch

spec = importlib.util.spec_from_file_location("work_state", Path(__file__).resolve().parents[2] / "scripts" / "work_state.py")
ws = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ws)


def _touch(p: Path, text: str = "x") -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".ckpt":  # a checkpoint's shape: weights, Adam's moments, the rest
        torch.save({"state_dict": {"model.lm.w": torch.full((4,), float(len(text)))}, "text": text,
                    "optimizer_states": [{"exp_avg": torch.ones(4), "exp_avg_sq": torch.ones(4)}]}, p)
    else:
        p.write_text(text)
    return p


def _load(p: Path) -> dict:
    return torch.load(p, weights_only=False)


def test_save_keeps_starts_and_untested_cells_and_restores_in_place(tmp_path):
    work = tmp_path / "runs" / "paper"
    st = work / "p_train" / "pt0.1"
    start = _touch(st / "tb/coconut/seed0/checkpoints/last.ckpt")
    cot = _touch(st / "tb/coconut/seed0/checkpoints/phase-cot.ckpt")
    _touch(st / "tb/coconut/seed0/checkpoints/phase-coconut.ckpt")  # a phase nobody starts from
    running = _touch(st / "tb/coconut/seed1/checkpoints/last.ckpt")  # a start still training: no cell yet
    tested = _touch(st / "tb/dropout_greedy/seed0/checkpoints/best.ckpt")
    untested = _touch(st / "tb/none/seed0/checkpoints/best.ckpt")
    _touch(st / "tb/temperature/seed0/checkpoints/last.ckpt")  # an RL run in progress: reruns
    events = _touch(st / "tb/coconut/seed0/events.out.tfevents.1")
    cells = st / "cells"
    _touch(cells / "coconut_s0.json", json.dumps({"ckpt": str(start), "seconds": 1.0}))
    _touch(cells / "train_dropout_greedy_s0.json", json.dumps({"ckpt": str(tested)}))
    _touch(cells / "test_dropout_greedy_s0.json", json.dumps({"pass1": 0.3}))
    _touch(cells / "train_none_s0.json", json.dumps({"ckpt": str(untested)}))

    rel = lambda p: str(p.relative_to(work))
    m = ws.save(work, tmp_path / "state" / "paper.tar")
    assert sorted(m["checkpoints"]) == sorted(rel(p) for p in (start, cot, running, untested))
    # the checkpoints sit beside the tar, one file each (git stores an unchanged one once), not inside it
    with tarfile.open(tmp_path / "state" / "paper.tar") as tar:
        assert not [n for n in tar.getnames() if n.endswith(".ckpt")]
    kept = tmp_path / "state" / "paper.ckpts"
    assert sorted(str(f.relative_to(kept)) for f in kept.rglob("*.ckpt")) == sorted(m["checkpoints"])
    # the start still training is kept whole (it resumes); the others are read for their weights: kept slim
    assert (kept / rel(running)).read_bytes() == running.read_bytes()
    assert sorted(m["slim"]) == sorted(rel(p) for p in (start, cot, untested))
    assert "optimizer_states" not in _load(kept / rel(start)) and _load(kept / rel(start))["text"] == "x"
    assert torch.equal(_load(kept / rel(start))["state_dict"]["model.lm.w"], _load(start)["state_dict"]["model.lm.w"])
    stamp = (kept / rel(start)).stat().st_mtime_ns
    assert ws.save(work, tmp_path / "state" / "paper.tar")["slim"] == m["slim"]
    assert (kept / rel(start)).stat().st_mtime_ns == stamp  # its source unchanged: not written again
    # a later save: a changed checkpoint is copied again, one no longer kept leaves the directory
    _touch(running, "a later step")
    untested.unlink()
    (cells / "train_none_s0.json").write_text(json.dumps({"ckpt": str(cot)}))
    m = ws.save(work, tmp_path / "state" / "paper.tar")
    assert (kept / rel(running)).read_bytes() == running.read_bytes() and not (kept / rel(untested)).exists()
    m = ws.save(work, tmp_path / "state" / "paper.tar", exclude=("p_train/*/tb/coconut/seed0/*",))
    assert rel(start) not in m["checkpoints"] and rel(cot) not in m["checkpoints"]
    assert not (kept / rel(start)).exists()
    with tarfile.open(tmp_path / "state" / "paper.tar") as tar:  # checkpoints only: the run's records stay
        assert rel(events) in tar.getnames()
    ws.save(work, tmp_path / "state" / "paper.tar", exclude_files=("*/events.out.tfevents.*",))
    with tarfile.open(tmp_path / "state" / "paper.tar") as tar:
        assert rel(cells / "coconut_s0.json") in tar.getnames() and rel(events) not in tar.getnames()
    m = ws.save(work, tmp_path / "state" / "paper.tar")
    untested = running

    work.rename(tmp_path / "aside")
    assert ws.restore(tmp_path / "state" / "paper.tar") == work.resolve()
    for p in (start, cot, running, untested, events, cells / "test_dropout_greedy_s0.json"):
        assert p.exists(), p
    assert "optimizer_states" not in _load(start) and "optimizer_states" in _load(running)
    slim_before = ws.json.loads((tmp_path / "state" / "paper.json").read_text())["slim"]
    assert ws.save(work, tmp_path / "state" / "paper.tar")["slim"] == slim_before  # saved again from here: as it was
    assert not tested.exists() and not (st / "tb/temperature/seed0/checkpoints/last.ckpt").exists()
    with pytest.raises(SystemExit, match="not empty"):  # never over a run
        ws.restore(tmp_path / "state" / "paper.tar")


def test_a_checkpoint_caught_mid_write_stops_the_save_by_name(tmp_path):
    ckpt = tmp_path / "w" / "tb/coconut/seed0/checkpoints/last.ckpt"
    _touch(ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:-30])  # truncated
    with pytest.raises(SystemExit, match="last.ckpt is not a whole checkpoint"):
        ws.save(tmp_path / "w", tmp_path / "s.tar")


def test_an_unreadable_cell_stops_the_save_by_name(tmp_path):
    _touch(tmp_path / "w" / "cells" / "coconut_s0.json", "{not json")
    with pytest.raises(SystemExit, match="coconut_s0.json"):
        ws.save(tmp_path / "w", tmp_path / "s.tar")


def test_a_tar_of_the_first_format_restores_with_its_checkpoints_inside(tmp_path):
    """The tar of 2026-12-06's first save held its checkpoints; it must still restore."""
    work = tmp_path / "w"
    ckpt = _touch(work / "tb/coconut/seed0/checkpoints/last.ckpt")
    _touch(work / "cells" / "coconut_s0.json", json.dumps({"ckpt": str(ckpt)}))
    with tarfile.open(tmp_path / "old.tar", "w") as tar:
        for p in (ckpt, work / "cells" / "coconut_s0.json"):
            tar.add(p, arcname=str(p.relative_to(work)))
    (tmp_path / "old.json").write_text(json.dumps({"work": str(work.resolve()), "files": 2,
                                                   "checkpoints": ["tb/coconut/seed0/checkpoints/last.ckpt"]}))
    work.rename(tmp_path / "aside")
    ws.restore(tmp_path / "old.tar")
    assert ckpt.read_bytes() == (tmp_path / "aside" / ckpt.relative_to(work)).read_bytes()


def test_a_slim_checkpoint_tests_and_starts_runs_like_the_full_one(cot_ckpt, tmp_path):
    """What reads a slim checkpoint (module doc): ``test --ckpt_path`` gives the same numbers, ``init_from`` the
    same weights and tokenizer; and a fit that tried to resume from it stops rather than train on without Adam."""
    from conftest import tiny_trainer
    from cot_start import SYN, tiny

    from lightning_latent.data.datamodule import LatentDataModule
    from lightning_latent.model.build import init_state_dict
    from lightning_latent.schedule import Phase

    slim = tmp_path / "slim.ckpt"
    ws.slim_checkpoint(Path(cot_ckpt), slim)
    assert "optimizer_states" not in _load(slim) and slim.stat().st_size < Path(cot_ckpt).stat().st_size / 2

    def test(ckpt):
        dm = LatentDataModule(synthetic=SYN, val_limit=32, test_limit=32, eval_batch_size=32)
        return tiny_trainer(tmp_path).test(tiny([Phase("cot", steps=150)]), datamodule=dm, ckpt_path=str(ckpt),
                                           verbose=False)

    full, thin = test(cot_ckpt), test(slim)
    assert full == thin and full[0]["test/pass@1"] > 0
    (a, ta), (b, tb) = init_state_dict(cot_ckpt), init_state_dict(str(slim))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and ta == tb
    with pytest.raises(KeyError, match="contains only the model"):
        dm = LatentDataModule(synthetic=SYN, val_limit=32, test_limit=32, eval_batch_size=32)
        tiny_trainer(tmp_path).fit(tiny([Phase("cot", steps=160)]), datamodule=dm, ckpt_path=str(slim))
