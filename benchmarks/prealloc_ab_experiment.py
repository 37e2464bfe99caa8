import sys, time
sys.path.insert(0, 'benchmarks')
import torch
torch.set_num_threads(1)
from common import build_setup, prompt_layout, records, to_dev
from lightning_latent.data.layout import collate_prompts
from lightning_latent.model.latent_lm import generate
from lightning_latent.model.perturb import PerturbConfig, Perturber
from lightning_latent.rl.rollout import rollout_seed
shapes = sys.argv[1]; P, K = int(sys.argv[2]), int(sys.argv[3]); nl = int(sys.argv[4]) if len(sys.argv) > 4 else 6
s = build_setup(shapes, 0, nl)
pert = Perturber(s.lm, PerturbConfig(arm="dropout_shared", p=0.1, sites=["attn", "mlp"], scope="latent"))
lay = prompt_layout(s, nl)
recs = records(P, 0)
prompts = [s.ids(lay.prompt(r, stage=1)) for r in recs for _ in range(K)]
seeds = torch.tensor([rollout_seed(0, 0, r.idx, j) for r in recs for j in range(K)])
pb = collate_prompts(prompts, s.pad_id)
s.model.eval()
def run(pre):
    with torch.no_grad(), pert.rows(seeds):
        return generate(s.model, pb["input_ids"], pb["attention_mask"], 16, s.eos_id, s.pad_id, 1.0, seeds, pert, preallocate=pre)
a, b = run(False), run(True)
print("tokens equal", torch.equal(a.tokens, b.tokens), "logp maxdiff", (a.logprobs - b.logprobs).abs().max().item())
ts = {False: [], True: []}
for _ in range(int(sys.argv[5]) if len(sys.argv) > 5 else 10):
    for pre in (False, True):
        t = time.perf_counter(); run(pre); ts[pre].append(time.perf_counter() - t)
med = {k: sorted(v)[len(v)//2] for k, v in ts.items()}
print("dynamic", med[False], "prealloc", med[True], "speedup", med[False] / med[True])
