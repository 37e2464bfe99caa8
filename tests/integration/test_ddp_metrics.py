"""The evaluation metrics (lightning_latent/metrics.py) under DDP: two gloo processes with different data,
both must see the global value."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_latent.metrics import ExactMatchAccuracy, MajorityAtK, PassAtK


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        acc, pak, maj = ExactMatchAccuracy(), PassAtK(k=2), MajorityAtK()
        if rank == 0:
            acc.update(["1", "2", "3"], ["1", "2", "0"])  # 2 / 3
            pak.update(torch.tensor([[1, 0, 1, 0, 0]], dtype=torch.bool))  # 0.7
            maj.update([["4", "4", "5"]], ["4"])  # 1 / 1
        else:
            acc.update(["9"], ["8"])  # 0 / 1
            pak.update(torch.tensor([[0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))  # 0, 1
            maj.update([["1", "2"], [None, "3", "3"]], ["2", "3"])  # "1" wrong, "3" right
        # compute() syncs, then restores the local states; read the global n in a sync context.
        with acc.sync_context():
            global_n = int(acc.n.item())
        result = {
            "acc": acc.compute().item(),
            "acc_n": global_n,
            "local_n": int(acc.n.item()),
            "pass2": pak.compute().item(),
            "maj": maj.compute().item(),
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_metrics_ddp_sync(tmp_path: Path) -> None:
    world = 2
    mp.spawn(_ddp_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        r = json.loads(Path(tmp_path, f"rank{rank}.json").read_text())
        assert r["acc"] == pytest.approx(2 / 4)  # (2 + 0) / (3 + 1), not a mean of means
        assert r["acc_n"] == 4
        assert r["local_n"] == (3 if rank == 0 else 1)
        assert r["pass2"] == pytest.approx((0.7 + 0.0 + 1.0) / 3)
        assert r["maj"] == pytest.approx(2 / 3)
