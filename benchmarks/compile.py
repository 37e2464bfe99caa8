"""Does ``torch.compile`` pay? The train_step.py steps, eager against compiled, on the same weights.

Targets (what gets compiled, in place, with ``torch.compile(dynamic=True)``):

mlp    : every block's MLP. It never touches the KV cache, so its graph does not depend on the
         cache length: one graph per shape family, no recompilation as the latent window advances.
blocks : every whole transformer block (attention included). The ``DynamicCache`` tensors are graph
         inputs whose length (and, after a ``cat``, strides) change at every latent pass, so dynamo
         recompiles and, past its recompile limit, falls back to eager.

For each target, a fresh model with the same weights is compiled and timed, interleaved with the eager
model, on the coconut / plain / grpo steps of ``train_step.py`` (forward + backward) and on a rollout
(``generate``: prompts x K rows, latent prompt + KV-cached sampled answer). ``speedup`` = eager median /
compiled median (> 1: compiling pays). ``compile_s`` is the first call of every step after compiling
(tracing + code generation). ``same_result``: every step's loss and gradient norm (rollout: its tokens
and summed log-probs) equal the eager model's to 1e-4 relative.
If compilation fails here (no C++ compiler, an unsupported op), the target's ``error`` says why.
Inductor's on-disk caches go to a fresh temporary folder (so ``compile_s`` is a cold compile) unless
``--warm-cache`` or ``TORCHINDUCTOR_CACHE_DIR`` is set. Prints one JSON object as the last stdout line.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if "--warm-cache" not in sys.argv and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="ll-inductor-")  # before torch is imported
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import torch  # noqa: E402

from common import apply_threads, base_parser, build_setup, emit, machine_info, median, sync  # noqa: E402
from lightning_latent.model.perturb import PerturbConfig, Perturber  # noqa: E402
from train_step import add_step_args, make_steps, resolve_step_args, rollout_batch, train_batch  # noqa: E402

TARGETS = ("mlp", "blocks")


def _compile(lm: torch.nn.Module, target: str, mode: str | None) -> None:
    for blk in lm.base_model.h:
        (blk.mlp if target == "mlp" else blk).compile(dynamic=True, mode=mode)


STEPS = ("coconut", "plain", "grpo", "rollout")


def _result(out, model: torch.nn.Module) -> tuple:
    """What must not change when compiling: loss and gradient norm, or a rollout's tokens and log-probs."""
    if hasattr(out, "tokens"):
        return tuple(out.tokens.flatten().tolist()), float(out.logprobs.double().sum())
    loss = out[0] if isinstance(out, tuple) else out
    gn = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters() if p.grad is not None))
    return float(loss.detach()), float(gn)


def _same(a: tuple, b: tuple) -> bool:
    return all(x == y if isinstance(x, tuple) else abs(x - y) <= 1e-4 * max(1.0, abs(x)) for x, y in zip(a, b))


def measure(args, target: str) -> dict:
    import torch._dynamo as dynamo

    dynamo.reset()
    dynamo.utils.counters.clear()
    runs = {}
    for name in ("eager", target):
        setup = build_setup(args.shapes, args.seed, args.latent)  # same seed: same weights
        pert = Perturber(setup.lm, PerturbConfig(arm="dropout_shared", p=0.1, sites=["attn", "mlp"], scope="latent"))
        b = train_batch(setup, args.batch, args.latent, args.seed)
        rb = rollout_batch(setup, pert, args.prompts, args.k, args.latent, args.max_new_tokens, args.seed)
        steps = make_steps(setup, pert, b, rb, args.dtype, args.max_new_tokens)
        steps["rollout"] = (lambda setup=setup, pert=pert: rollout_batch(
            setup, pert, args.prompts, args.k, args.latent, args.max_new_tokens, args.seed))
        runs[name] = (setup, steps)
    _compile(runs[target][0].lm, target, args.mode)
    res: dict = {"target": target}
    losses: dict = {}
    first: dict = {}
    for name, (setup, steps) in runs.items():  # first call: warm-up (eager) / compilation (compiled)
        for step, fn in steps.items():
            t0 = time.perf_counter()
            try:
                losses[(name, step)] = _result(fn(), setup.model)
            except Exception as err:  # noqa: BLE001  (reported, not hidden: the JSON carries it)
                res["error"] = f"{step}: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
                return res
            sync()
            first[(name, step)] = time.perf_counter() - t0
            setup.model.zero_grad(set_to_none=True)
    times = {(name, step): [] for name in runs for step in runs[name][1]}
    for _ in range(args.repeats):  # interleaved: eager and compiled see the same machine load
        for step in STEPS:
            for name, (setup, steps) in runs.items():
                sync()
                t0 = time.perf_counter()
                steps[step]()
                sync()
                times[(name, step)].append(time.perf_counter() - t0)
                setup.model.zero_grad(set_to_none=True)
    stats = dynamo.utils.counters["stats"]
    res.update({
        "eager_s": {s: median(times[("eager", s)]) for s in STEPS},
        "compiled_s": {s: median(times[(target, s)]) for s in STEPS},
        "compile_s": {s: first[(target, s)] for s in STEPS},
        "same_result": {s: _same(losses[("eager", s)], losses[(target, s)]) for s in STEPS},
        "loss_and_grad_norm": {s: [losses[("eager", s)], losses[(target, s)]] for s in STEPS if s != "rollout"},
        "unique_graphs": int(stats.get("unique_graphs", 0)),
        "graph_breaks": int(sum(dynamo.utils.counters["graph_break"].values())),
    })
    res["speedup"] = {s: res["eager_s"][s] / res["compiled_s"][s] for s in STEPS}
    return res


def main(argv=None) -> dict:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--targets", nargs="+", choices=TARGETS, default=None, help="default: mlp blocks")
    ap.add_argument("--warm-cache", action="store_true", help="reuse inductor's on-disk caches (compile_s lower)")
    ap.add_argument("--mode", default=None, help="torch.compile mode (e.g. reduce-overhead on CUDA)")
    add_step_args(ap)
    args = ap.parse_args(argv)
    apply_threads(args)
    resolve_step_args(args)
    targets = args.targets or (["mlp"] if args.tiny else list(TARGETS))
    t_start = time.perf_counter()
    results = [measure(args, t) for t in targets]
    return {"benchmark": "compile", "shapes": args.shapes, "dtype": args.dtype, "tiny": args.tiny,
            "repeats": args.repeats, "mode": args.mode, "latent_steps": args.latent,
            "train_batch_rows": args.batch, "grpo_batch": {"prompts": args.prompts, "k": args.k},
            "torch": torch.__version__, "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
            "targets": results, "wall_s": time.perf_counter() - t_start,
            "machine": machine_info()}


if __name__ == "__main__":
    emit(main())
