"""The cell worker's own loop: what it does when the driver that asked for a cell is gone."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_worker_whose_driver_is_gone_exits_quietly(tmp_path):
    """A stopped driver (the long runs are stopped and resumed) leaves its workers to finish a cell with
    nobody to answer: they exit 0 without a traceback in the driver's log."""
    proc = subprocess.Popen([sys.executable, "-m", "lightning_latent.experiments.cell_worker"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=ROOT, text=True)
    log = tmp_path / "cell.log"
    proc.stdin.write(json.dumps({"argv": ["fit", "--help"], "log": str(log)}) + "\n")
    proc.stdin.flush()
    proc.stdout.close()  # the driver goes away before the answer
    proc.stdin.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert "--config" in log.read_text()  # the cell itself ran
