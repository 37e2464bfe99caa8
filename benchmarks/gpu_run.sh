#!/usr/bin/env bash
# One prepared pass on a lent GPU machine (see docs/performance.md, "GPU"): the benchmarks at gpt2-small
# shapes in bf16 on CUDA, the CPU-side figures the 2-core dev machine cannot give cleanly (DDP scaling on
# idle cores, peak RSS of a K=32 GRPO step at gpt2-small shapes), then the quickstart.
# Usage: OUT=/some/dir bash benchmarks/gpu_run.sh     (each step's JSON line -> $OUT/results.jsonl)
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
LOG="$OUT/bench.log"
step() {  # step NAME TIMEOUT_S CMD...: run, keep the whole output in the log, the last line in results.jsonl
  local name=$1 t=$2; shift 2
  echo "=== $name: $* ($(date -u +%T))" | tee -a "$LOG"
  local s=$SECONDS
  local f="$OUT/$name.out"
  timeout "$t" "$@" > "$f" 2>&1
  local rc=$?
  local last; last=$(grep '^{' "$f" | tail -1)
  echo "--- $name rc=$rc $((SECONDS - s))s" | tee -a "$LOG"
  [ -n "$last" ] && [ $rc -eq 0 ] && echo "{\"step\": \"$name\", \"result\": $last}" >> "$OUT/results.jsonl" \
    || echo "{\"step\": \"$name\", \"rc\": $rc, \"error\": $(tail -3 "$f" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')}" >> "$OUT/results.jsonl"
  rm -f "$f"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
python3 -c "import torch, transformers, lightning; print(torch.__version__, transformers.__version__, lightning.__version__)" | tee -a "$LOG"
DEV=${DEV:-cuda}          # DEV=cpu TINY=--tiny QUICKSTART_S=5: a seconds-long check of this script itself
TINY=${TINY:-}
G="--shapes gpt2-small --dtype bf16 --device $DEV $TINY"
# Three chains at once (the device lease is short): the quickstart (GPU, one process), the CPU-only steps
# (16 idle cores: DDP scaling, a K=32 GRPO step's peak RSS) and the GPU benchmarks. The quickstart shares
# the GPU with the benchmarks: their timings carry that noise (ours and the reference alike).
echo "=== quickstart: python experiments/run.py fit ($(date -u +%T))" | tee -a "$LOG"
QS=$SECONDS
(timeout "${QUICKSTART_S:-300}" python3 experiments/run.py fit --trainer.enable_progress_bar false > "$OUT/quickstart.log" 2>&1;
 echo "--- quickstart rc=$? $((SECONDS - QS))s" >> "$OUT/quickstart.log") &
QPID=$!
(step train_step_k32_cpu 150 python3 benchmarks/train_step.py --shapes gpt2-small --prompts 1 --k 32 --batch 4 --repeats 1 --threads 4 $TINY
 step ddp_cpu            150 python3 benchmarks/ddp.py $TINY) &
CPID=$!
step rollout_gpu_bf16   90 python3 benchmarks/rollout.py $G --ref-rows 8
step rollout_sweep_gpu  120 python3 benchmarks/rollout.py $G --sweep
step train_step_gpu     90 python3 benchmarks/train_step.py $G --batch 32 --prompts 4 --k 8 --repeats 5
step train_step_k32_gpu 60 python3 benchmarks/train_step.py $G --batch 32 --prompts 1 --k 32 --repeats 3
# activation checkpointing of the latent passes (GPU memory), and whether torch.compile pays on the GPU
step memory_gpu         90 python3 benchmarks/memory.py $G --ks 32 --latents 6 12 --micro
step compile_gpu        150 python3 benchmarks/compile.py $G --targets mlp blocks
wait $CPID
wait $QPID
tail -1 "$OUT/quickstart.log" | tee -a "$LOG"
cp logs/default/version_*/summary.json "$OUT/quickstart_summary.json" 2>/dev/null
