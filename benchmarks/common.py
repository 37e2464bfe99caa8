"""Shared set-up for the benchmark scripts: shapes, model, prompts, timing, machine info.

Every script prints ONE JSON object as its last stdout line. Timings of our code and of its comparison
are always taken in the same run, interleaved, over several repeats; medians are reported.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass

import torch

# lightning_latent / transformers are imported inside the functions that need them, so that a parent
# process that only spawns workers (ddp.py) starts quickly.

SHAPES = ("default", "gpt2-small")
DTYPES = ("fp32", "bf16")


def base_parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--shapes", choices=SHAPES, default="default",
                    help="default: the embedded GPT-2 (4 layers x 128); gpt2-small: GPT2Config() (124M, random init)")
    ap.add_argument("--dtype", choices=DTYPES, default="fp32", help="bf16: torch.autocast(device, bfloat16)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the model and batches live")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long smoke mode (for the tests)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (median reported)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads for both sides (default 1: on a shared, oversubscribed 2-core "
                         "machine OpenMP with 2 threads stalls at every op barrier; 0 = torch's own default)")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def apply_threads(args) -> None:
    global DEVICE
    if args.threads and args.threads > 0:
        torch.set_num_threads(args.threads)
    DEVICE = torch.device(getattr(args, "device", "cpu"))
    if DEVICE.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible")
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on both sides


DEVICE = torch.device("cpu")


def sync() -> None:
    """Wait for queued device work, so wall-clock timings mean what they say (no-op on CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def to_dev(x):
    """A tensor, or a dict / list of them, moved to the benchmark device."""
    if isinstance(x, torch.Tensor):
        return x.to(DEVICE)
    if isinstance(x, dict):
        return {k: to_dev(v) for k, v in x.items()}
    return x


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "device": str(DEVICE),
        "device_name": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else None,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def autocast(dtype: str):
    if dtype == "bf16":
        return torch.autocast(DEVICE.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -- peak memory ---------------------------------------------------------------------------------------
def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where unsupported.

    On CUDA the figures are the device allocator's instead (``torch.cuda.max_memory_allocated``).
    """
    if DEVICE.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(DEVICE)
        return True
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Peak resident set size since the last reset (VmHWM), else since start (ru_maxrss); CUDA: peak allocated."""
    if DEVICE.type == "cuda":
        sync()
        return torch.cuda.max_memory_allocated(DEVICE) / 2**20
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mib() -> float:
    if DEVICE.type == "cuda":
        return torch.cuda.memory_allocated(DEVICE) / 2**20
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


# -- timing --------------------------------------------------------------------------------------------
def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def median(xs):
    return float(statistics.median(xs)) if xs else float("nan")


def matmul_peak_flops(dtype: str, n: int | None = None, repeats: int = 5) -> float:
    """Dense matmul FLOP/s (2 n^3 per [n,n]x[n,n]) in ``dtype``, best of ``repeats`` (this run, these threads).

    n = 1024 on CPU; 8192 on CUDA, where a 1024 matmul is too short to reach the device's peak.
    """
    n = n or (8192 if DEVICE.type == "cuda" else 1024)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(n, n, device=DEVICE).to(dt)
    b = torch.randn(n, n, device=DEVICE).to(dt)
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        sync()
        dtm = time.perf_counter() - t0
        best = max(best, 4 * 2 * n**3 / dtm)
    return best


# -- model and data ------------------------------------------------------------------------------------
@dataclass
class Setup:
    shapes: str
    model: "torch.nn.Module"  # LatentLM
    lm: torch.nn.Module
    layout: object  # Layout: the synthetic layout (its ids are remapped for gpt2-small by ``remap``)
    latent_id: int
    start_id: int
    end_id: int
    eos_id: int
    pad_id: int
    vocab_size: int
    remap: dict  # synthetic id -> model id (only the special tokens differ; empty for default)

    def ids(self, seq: list[int]) -> list[int]:
        return [self.remap.get(t, t) for t in seq]

    def n_params(self) -> int:
        return sum(p.numel() for p in self.lm.parameters())

    def n_params_non_embedding(self) -> int:
        emb = {id(self.lm.get_input_embeddings().weight)}
        wpe = getattr(getattr(self.lm, "transformer", None), "wpe", None)
        if wpe is not None:
            emb.add(id(wpe.weight))
        return sum(p.numel() for p in self.lm.parameters() if id(p) not in emb)


def build_setup(shapes: str, seed: int = 0, n_latent: int = 6) -> Setup:
    """The model (random init, eval mode, no base dropout) and the synthetic layout with ``n_latent`` thoughts.

    Prompts use ``CurriculumConfig(c_thought=n_latent, max_latent_stage=1)`` at stage 1 (one step replaced
    by ``n_latent`` thoughts); training examples use the same config at stage 1 (the remaining steps and
    the answer are supervised text).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_latent.data.layout import CurriculumConfig, Layout
    from lightning_latent.model.build import ModelConfig, build_model, build_tokenizer
    from lightning_latent.model.latent_lm import LatentLM

    torch.manual_seed(seed)
    tok = build_tokenizer(ModelConfig())
    cfg = CurriculumConfig(c_thought=n_latent, max_latent_stage=1)
    if shapes == "default":
        lm, ids = build_model(ModelConfig(), tok)
        layout = Layout(tok, cfg)
        remap = {}
        latent_id, start_id, end_id = ids["<|latent|>"], ids["<|start-latent|>"], ids["<|end-latent|>"]
        eos_id, pad_id = layout.eos_id, layout.pad_id
    elif shapes == "gpt2-small":
        # GPT2Config() defaults: 12 layers, 768 wide, 12 heads, 1024 positions, vocab 50257 (+3 Coconut
        # tokens). Random init, no hub download; token ids are the synthetic task's word ids (all < 50257)
        # with EOS/pad/latent markers moved to GPT-2's ids.
        _ = build_model(ModelConfig(), tok)  # adds the Coconut tokens to the word tokenizer
        layout = Layout(tok, cfg)
        gcfg = GPT2Config(vocab_size=50257 + 3, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        gcfg._attn_implementation = "sdpa"
        lm = GPT2LMHeadModel(gcfg)
        eos_id = pad_id = 50256
        latent_id, start_id, end_id = 50257, 50258, 50259
        remap = {layout.latent_id: latent_id, layout.start_id: start_id, layout.end_id: end_id,
                 layout.eos_id: eos_id, layout.pad_id: pad_id}
    else:
        raise ValueError(shapes)
    lm.eval()
    lm.to(DEVICE)
    model = LatentLM(lm, latent_id, start_id, end_id)
    model.set_base_dropout(False)
    model.eval()
    return Setup(shapes, model, lm, layout, latent_id, start_id, end_id, eos_id, pad_id,
                 lm.get_input_embeddings().weight.shape[0], remap)


def records(n: int, seed: int = 0, offset: int = 0):
    from lightning_latent.data.synthetic import SyntheticConfig, synthetic_record

    cfg = SyntheticConfig(seed=seed)
    return [synthetic_record(cfg, "train", offset + i) for i in range(n)]


def prompt_layout(setup: Setup, n_latent: int):
    from lightning_latent.data.layout import CurriculumConfig, Layout

    return Layout(setup.layout.tok, CurriculumConfig(c_thought=n_latent, max_latent_stage=1))


def emit(result: dict) -> None:
    """Print the result as the last stdout line (one JSON object)."""
    sys.stdout.flush()
    print(json.dumps(result, sort_keys=False))
    sys.stdout.flush()
