"""GRPO data-parallel scaling on CPU: the same global batch (prompts x K) on 1 and on 2 processes.

Each iteration: rollout of this rank's share of the global prompts (one batched ``generate`` under
dropout_shared masks, 6 thoughts, T=1 answers) -> synthetic rewards -> ``replay_logprobs`` +
``grpo_loss`` + backward -> gradients averaged over ranks with one flat ``all_reduce`` (what the
LightningModule does, ``distributed.sync_grads``) -> SGD step. torch.distributed with gloo, two processes started
with ``torch.multiprocessing.spawn``; torch threads = 1 per process in BOTH settings (the machine has
2 cores: 1 process x 1 thread vs 2 processes x 1 thread).

Setting 1: rank 0 alone runs the whole global batch on its own model replica (no collective) while
rank 1 waits, idle, in a gloo barrier. Setting 2: both ranks, half the prompts each, on a second
replica. The two settings alternate iteration by iteration (1,2 then 2,1, ...) in the same processes,
after a warm-up iteration each; process start-up is not timed.

``scaling_efficiency = t1 / (2 * t2)`` (t = median seconds per global-batch iteration).
``identical_outputs``: every rollout's tokens (warm-up iteration) agree between the settings and the
parameters after all iterations agree to 1e-5 (fp32).
Prints one JSON object as the last stdout line.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from common import autocast, base_parser, emit, machine_info, median  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, cfg: dict, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from common import build_setup, prompt_layout, records
    from lightning_latent.data.layout import collate_prompts
    from lightning_latent.model.latent_lm import generate
    from lightning_latent.model.perturb import PerturbConfig, Perturber
    from lightning_latent.distributed import sync_grads
    from lightning_latent.rl.loss import group_advantages
    from lightning_latent.rl.rollout import RolloutBatch, rollout_seed
    from lightning_latent.rl.update import GRPOConfig, backward_micro_batches

    n_prompts, k = cfg["prompts"], cfg["k"]

    class Replica:
        """One model + optimiser that processes ``1/n_ranks`` of every global batch."""

        def __init__(self, n_ranks: int, my_rank: int):
            self.n_ranks, self.rank = n_ranks, my_rank
            self.setup = build_setup(cfg["shapes"], cfg["seed"], cfg["latent"])  # same weights everywhere
            self.pert = Perturber(self.setup.lm, PerturbConfig(arm="dropout_shared", p=0.1, sites=["attn", "mlp"],
                                                               scope="latent"))
            self.opt = torch.optim.SGD(self.setup.model.parameters(), lr=1e-3)
            self.lay = prompt_layout(self.setup, cfg["latent"])
            assert n_prompts % n_ranks == 0, "the global prompt count must divide evenly over ranks"
            self.tokens: dict[int, list[int]] = {}

        def iteration(self, it: int) -> None:
            setup, model, pert = self.setup, self.setup.model, self.pert
            share = n_prompts // self.n_ranks
            recs = records(n_prompts, cfg["seed"], offset=it * n_prompts)[self.rank * share:(self.rank + 1) * share]
            prompts = [setup.ids(self.lay.prompt(r, stage=1)) for r in recs for _ in range(k)]
            seeds = torch.tensor([rollout_seed(cfg["seed"], it, r.idx, j) for r in recs for j in range(k)])
            pb = collate_prompts(prompts, setup.pad_id)
            model.eval()
            with torch.no_grad(), pert.rows(seeds), autocast(cfg["dtype"]):
                gen = generate(model, pb["input_ids"], pb["attention_mask"], cfg["max_new"], setup.eos_id,
                               setup.pad_id, 1.0, seeds, pert)
            if it == 0:
                for i in range(len(prompts)):
                    self.tokens[self.rank * share * k + i] = gen.tokens[i, : int(gen.mask[i].sum())].tolist()
            rewards = (seeds % 3 == 0).float().view(share, k)  # synthetic, a pure function of the seed
            rb = RolloutBatch(pb["input_ids"], pb["attention_mask"], seeds, gen.tokens, gen.logprobs, gen.mask,
                              rewards, [None] * len(prompts), [r.answer for r in recs], gen.final_thought)
            adv = group_advantages(rewards, "mean").flatten()
            model.train()
            self.opt.zero_grad(set_to_none=True)
            with autocast(cfg["dtype"]):
                backward_micro_batches(model, pert, rb, adv, None, GRPOConfig(max_new_tokens=cfg["max_new"]), 1.0,
                                       1.0, torch.Tensor.backward)
            if self.n_ranks > 1:  # equal shares: the rank average is the global-batch gradient
                sync_grads(model.parameters())
            self.opt.step()

        def params(self) -> torch.Tensor:
            return torch.cat([p.detach().flatten() for p in self.setup.model.parameters()])

    # setting "1": rank 0 alone does the whole global batch (rank 1 waits in a barrier, idle);
    # setting "2": both ranks, half each, gradients all-reduced.
    one = Replica(1, 0) if rank == 0 else None
    two = Replica(world, rank)
    dist.barrier()
    if one is not None:
        one.iteration(0)  # warm-up; its rollouts are the ones compared
    dist.barrier()
    two.iteration(0)
    times = {1: [], 2: []}
    for it in range(1, cfg["iters"] + 1):
        for setting in ((1, 2) if it % 2 else (2, 1)):  # alternate the order
            dist.barrier()
            t0 = time.perf_counter()
            if setting == 1:
                if one is not None:
                    one.iteration(it)
                    times[1].append(time.perf_counter() - t0)
            else:
                two.iteration(it)
                dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)
                times[2].append(float(dt))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"times": times, "tokens1": one.tokens if one else {}, "tokens2": two.tokens}, f)
    if rank == 0:
        torch.save({"1": one.params(), "2": two.params()}, os.path.join(out_dir, "params.pt"))
    dist.barrier()
    dist.destroy_process_group()


def run_spawn(cfg: dict) -> dict:
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(worker, args=(2, cfg, _free_port(), d), nprocs=2, join=True)
        parts = [json.load(open(os.path.join(d, f"rank{r}.json"))) for r in range(2)]
        tok2 = {}
        for p in parts:
            tok2.update({int(i): t for i, t in p["tokens2"].items()})
        tok1 = {int(i): t for i, t in parts[0]["tokens1"].items()}
        return {"times": {int(w): v for w, v in parts[0]["times"].items()}, "tokens1": tok1, "tokens2": tok2,
                "params": torch.load(os.path.join(d, "params.pt"))}


def main(argv=None) -> dict:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=None, help="global prompts per iteration")
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--latent", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per spawn")
    args = ap.parse_args(argv)
    if args.tiny:
        args.prompts, args.k, args.iters = args.prompts or 2, args.k or 2, args.iters or 1
        args.max_new_tokens = min(args.max_new_tokens, 4)
        args.repeats = args.repeats or 1
    else:
        small = args.shapes == "gpt2-small"
        args.prompts, args.k = args.prompts or (2 if small else 8), args.k or 8
        args.iters = args.iters or 6
        args.repeats = args.repeats or 1
    cfg = {"shapes": args.shapes, "dtype": args.dtype, "seed": args.seed, "latent": args.latent,
           "prompts": args.prompts, "k": args.k, "max_new": args.max_new_tokens, "iters": args.iters}
    t_start = time.perf_counter()
    runs = [run_spawn(cfg) for _ in range(args.repeats)]
    t = {w: [x for r in runs for x in r["times"][w]] for w in (1, 2)}
    t1, t2 = median(t[1]), median(t[2])
    tok_same = all(r["tokens1"] == r["tokens2"] == runs[0]["tokens1"] for r in runs)
    pdiff = max(float((r["params"]["1"] - r["params"]["2"]).abs().max()) for r in runs)
    rows = args.prompts * args.k
    return {
        "benchmark": "ddp", "shapes": args.shapes, "dtype": args.dtype, "tiny": args.tiny,
        "global_batch": {"prompts": args.prompts, "k": args.k, "rows": rows},
        "latent_steps": args.latent, "max_new_tokens": args.max_new_tokens,
        "iters_per_setting_per_spawn": args.iters, "spawns": args.repeats,
        "threads_per_process": 1, "backend": "gloo", "start_method": "spawn",
        "t1_s": t1, "t2_s": t2, "t1_all": t[1], "t2_all": t[2],
        "scaling_efficiency": t1 / (2 * t2),
        "speedup_2_vs_1": t1 / t2,
        "rollouts_per_s_1": rows / t1, "rollouts_per_s_2": rows / t2,
        "identical_outputs": tok_same and pdiff <= (1e-5 if args.dtype == "fp32" else 1e-2),
        "rollout_tokens_identical": tok_same, "param_max_abs_diff": pdiff,
        "wall_s": time.perf_counter() - t_start,
        "machine": machine_info() | {"torch_threads": 1},
    }


if __name__ == "__main__":
    emit(main())
