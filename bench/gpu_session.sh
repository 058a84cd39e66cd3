#!/bin/bash
# One device call that runs this session's benchmarks side by side with a peer row
# (HF transformers + PEFT, ../shared/bench/anchors.py copied to the ignored .peer/ folder).
# Carry: .whl (omegaconf + antlr4 wheels for the GPU image's python) and .peer.
#   TUNELAB_COMMIT=<sha> bash bench/gpu_session.sh   (on the GPU machine; results under $OUT/results.jsonl)
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/tunelab   # the repo root is the package
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/pkg:/tmp/site
R=$OUT/results.jsonl
export TUNELAB_COMMIT=${TUNELAB_COMMIT:-unknown}   # the tree travels without .git: pass the commit in
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
run() {  # run SECONDS CMD...: one benchmark, its JSON line appended to $R, stderr to err.log
  local t=$1; shift
  echo "== $*" | tee -a "$OUT/err.log"
  timeout "$t" "$@" 2>>"$OUT/err.log" | grep '^{' | tee -a "$R" || echo "   (failed or timed out)"
}
run 100 python3 bench/lora_step.py --profile lora_lean_eager
run 100 python3 .peer/anchors.py hf_lora
run 120 python3 bench/qlora_step.py
run 90 python3 bench/dpo_step.py
run 45 python3 bench/nf4_dequant.py
run 90 torchrun --standalone --nproc_per_node 1 bench/fsdp_step.py
run 150 python3 bench/lora_step.py --compile --profile lora_lean
run 150 python3 bench/lora_step.py --compile --no-ac --profile lora_fast
