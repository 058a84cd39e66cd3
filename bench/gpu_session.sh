#!/bin/bash
# One device call that runs benchmarks side by side, with peer rows measured in the same call.
#   TUNELAB_COMMIT=<sha> bash bench/gpu_session.sh [STEP...]    (on the GPU machine)
# Results: $OUT/results.jsonl (one JSON line per benchmark), stderr of all of them: $OUT/err.log.
# Carry: .whl (omegaconf + antlr4 wheels for the GPU image's python) and the peers' folders:
#   .peer      a copy of ../shared/bench (anchors.py, dpo_anchor.py)
#   .site      HF+PEFT peer extras  (../shared/bench/peer_wheels.sh makes it)   for: hf_lora
#   .site-uns  trl + datasets (+ unsloth)                                       for: dpo_peer
# STEP: lora_eager hf_lora qlora dpo dpo_peer nf4 nf4_variants fsdp1 lora_compile lora_fast lora_offload loss_agreement
#       unsloth_lora unsloth_qlora (the best peers of performance.md; carry .site-uns)
#       fsdp2 fsdp1_sweep fsdp2_sweep (two GPUs: nvidia-h200-x2, NCCL_NVLS_ENABLE=0 as KINDS.md says)
#       recipe_<profile of bench/finetune.py: lean eager offload fast qlora packed>
#       attention (SDPA backends, packed flex vs dense mask)
#       pytest_cuda (the CUDA tests: kernels at real sizes, activation offload; log in $OUT/pytest_cuda.log;
#       ~6 min with Triton's first compiles: PYTEST_S=<seconds> sets its limit, 500 by default)
# Env DEADLINE=<epoch seconds> cuts every step short so the lane ends by then.
#       NAME=VALUE sets an environment variable for the steps after it (e.g. TUNELAB_SDPA_BACKEND=cudnn,
#       COMPILE=1, GRAPH=1 (lora/qlora step as one CUDA graph), TRACE=$OUT/breakdown.jsonl: per-phase
#       kernel times and host gaps of lora/qlora/dpo steps), OVERLAP=1 (fsdp steps: compute / NCCL /
#       exposed NCCL / idle GPU ms per step in each line), MEMTRACE=1 (with TRACE: live memory at the peak),
#       SHAPES=1 (with TRACE, without GRAPH: each kernel's launching op and input shapes)
# (default: the single-GPU set without the peers whose folders are not carried).
# Two single-GPU lanes side by side on nvidia-h200-x2: CUDA_VISIBLE_DEVICES=0 RESULTS=$OUT/a.jsonl
# ERRLOG=$OUT/a.err bash bench/gpu_session.sh ... & (the same with 1 / b) & wait.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
mkdir -p /tmp/pkg && ln -sfn "$(pwd -P)" /tmp/pkg/tunelab   # the repo root is the package (its real path: never a link to itself)
[ -d /tmp/site/omegaconf ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
BASE=/tmp/pkg:/tmp/site
export PYTHONPATH=$BASE
R=${RESULTS:-$OUT/results.jsonl}
E=${ERRLOG:-$OUT/err.log}
export TUNELAB_COMMIT=${TUNELAB_COMMIT:-unknown}   # the tree travels without .git: pass the commit in
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
budget() {  # budget SECONDS: SECONDS, cut to what is left before DEADLINE (epoch seconds) if set
  local t=$1
  if [ -n "${DEADLINE:-}" ]; then
    local left=$((DEADLINE - $(date +%s)))
    [ "$left" -lt "$t" ] && t=$left
  fi
  echo "$t"
}
run() {  # run SECONDS CMD...: one benchmark, its JSON line appended to $R, stderr to $E
  local t; t=$(budget "$1"); shift
  [ "$t" -lt 20 ] && { echo "   (skipped, past DEADLINE: $*)"; return; }
  echo "== $* ($(date +%T))" | tee -a "$E"
  timeout "$t" "$@" 2>>"$E" | grep '^{' | tee -a "$R" || echo "   (failed or timed out)"
}
steps=("$@")
if [ ${#steps[@]} -eq 0 ]; then
  steps=(lora_eager qlora dpo nf4 fsdp1 lora_compile lora_fast)
  [ -d .site ] && steps+=(hf_lora)
  [ -d .site-uns ] && steps+=(dpo_peer)
fi
for s in "${steps[@]}"; do
  case $s in
    *=*)          export "$s"; echo "   $s" ;;
    lora_eager)   run 100 python3 bench/lora_step.py --profile lora_lean_eager ;;
    hf_lora)      PYTHONPATH=$PWD/.site run 120 python3 .peer/anchors.py hf_lora ;;
    qlora)        run 120 python3 bench/qlora_step.py ;;
    dpo)          run 100 python3 bench/dpo_step.py ;;
    unsloth_*)    PYTHONPATH=$PWD/.site-uns run 240 python3 .peer/anchors.py "$s" ;;
    dpo_peer)     PYTHONPATH=$PWD/.site-uns run 200 python3 .peer/dpo_anchor.py trl ;;
    nf4)          run 60 python3 bench/nf4_dequant.py ;;
    loss_agreement) run 300 python3 bench/loss_agreement.py ;;
    nf4_variants) run 150 python3 bench/nf4_variants.py ;;
    attention)    run 150 python3 bench/attention_bench.py ;;
    fsdp1)        run 90 torchrun --standalone --nproc_per_node 1 bench/fsdp_step.py ;;
    fsdp2)        run 200 torchrun --standalone --nproc_per_node 2 bench/fsdp_step.py ;;
    fsdp1_sweep)  PREFETCH=0,1,2 RESHARD=1,0 run 200 torchrun --standalone --nproc_per_node 1 bench/fsdp_step.py ;;
    fsdp2_sweep)  PREFETCH=0,1,2 RESHARD=1,0 ROUNDS=2 run 400 torchrun --standalone --nproc_per_node 2 bench/fsdp_step.py ;;
    lora_compile) run 150 python3 bench/lora_step.py --compile --profile lora_lean ;;
    lora_fast)    run 150 python3 bench/lora_step.py --compile --no-ac --profile lora_fast ;;
    lora_offload) run 150 python3 bench/lora_step.py --compile --offload --profile lora_lean_offload ;;
    recipe_*)     run 300 python3 bench/finetune.py --profile "${s#recipe_}" ;;
    pytest_cuda)  (cd /tmp/pkg/tunelab && timeout "$(budget ${PYTEST_S:-500})" python3 -m pytest -p no:cacheprovider -rs --durations=25 tests/kernels \
                     tests/training/test_offload.py tests/training/test_cuda_graph.py tests/modules/test_attention_backends.py) > "$OUT/pytest_cuda.log" 2>&1; tail -3 "$OUT/pytest_cuda.log" ;;
    *) echo "unknown step $s" ;;
  esac
done
