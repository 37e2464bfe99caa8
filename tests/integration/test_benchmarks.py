"""The benchmark scripts run end to end in their ``--tiny`` mode and print one JSON object last.

The scripts start together (most of their time is interpreter and library start-up) and are
checked one by one.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO as ROOT

BENCH = ROOT / "benchmarks"
SCRIPTS = ("rollout", "train_step", "ddp", "memory", "compile")
MACHINE_KEYS = {"platform", "cpu_count", "torch_threads"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs = {
        name: subprocess.Popen([sys.executable, str(BENCH / f"{name}.py"), "--tiny"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in SCRIPTS
    }
    out = {}
    for name, p in procs.items():
        try:
            stdout, stderr = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
            pytest.fail(f"{name}.py --tiny timed out; stderr tail:\n{stderr[-2000:]}")
        assert p.returncode == 0, f"{name}.py --tiny failed (rc={p.returncode}):\n{stderr[-3000:]}"
        lines = [ln for ln in stdout.splitlines() if ln.strip()]
        assert lines, f"{name}.py printed nothing"
        out[name] = json.loads(lines[-1])
    return out


def _common(r: dict, name: str) -> None:
    assert r["benchmark"] == name
    assert r["tiny"] is True
    assert r["shapes"] == "default" and r["dtype"] == "fp32"
    assert MACHINE_KEYS <= set(r["machine"])


def test_rollout_tiny(results):
    r = results["rollout"]
    _common(r, "rollout")
    for key in ("speedup", "rollouts_per_s", "reference_rollouts_per_s", "identical_outputs",
                "tokens_generated_ours", "tokens_generated_reference", "prompts", "k", "latent_steps"):
        assert key in r, key
    assert r["identical_outputs"] is True
    assert r["latent_steps"] == 6
    assert r["speedup"] > 0 and r["rollouts_per_s"] > 0


def test_train_step_tiny(results):
    r = results["train_step"]
    _common(r, "train_step")
    for key in ("latent_overhead", "coconut_step_s", "plain_step_s", "grpo_step_s", "mfu", "achieved_flops",
                "matmul_peak_flops", "peak_rss_mib", "flops_formula", "identical_outputs"):
        assert key in r, key
    assert set(r["mfu"]) == {"coconut", "plain", "grpo"}
    assert r["latent_steps"] == 6
    assert r["identical_outputs"] is True  # replayed log-probs equal the rollout's
    assert r["latent_overhead"] > 0


def test_ddp_tiny(results):
    r = results["ddp"]
    _common(r, "ddp")
    for key in ("scaling_efficiency", "t1_s", "t2_s", "threads_per_process", "identical_outputs"):
        assert key in r, key
    assert r["threads_per_process"] == 1
    assert r["identical_outputs"] is True  # same rollouts and same parameters on 1 and 2 processes
    assert r["scaling_efficiency"] > 0


def test_memory_tiny(results):
    r = results["memory"]
    _common(r, "memory")
    rows = r["rows"]
    assert [(x["k"], x["micro_batch_rows"], x["checkpoint_latents"]) for x in rows] == [
        (2, None, False), (4, None, False), (4, 2, False), (4, None, True)]
    for x in rows:
        assert x["peak_mib"] > 0 and x["peak_increase_mib"] >= 0 and x["step_s"] > 0
        assert x["rows"] == x["k"]


def test_compile_tiny(results):
    r = results["compile"]
    _common(r, "compile")
    (t,) = r["targets"]
    assert t["target"] == "mlp"
    assert "error" not in t, t.get("error")  # inductor needs a C++ compiler: the image has one
    assert t["same_result"] == {"coconut": True, "plain": True, "grpo": True, "rollout": True}
    for key in ("eager_s", "compiled_s", "compile_s", "speedup"):
        assert set(t[key]) == {"coconut", "plain", "grpo", "rollout"}, key
    assert t["unique_graphs"] >= 1  # something was really compiled


def test_gpu_script_is_valid_bash():
    p = subprocess.run(["bash", "-n", str(BENCH / "gpu_run.sh")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
