#!/usr/bin/env bash
# One pass of every GPU measurement the issues ask for, sized for a short lease on one H100/H200
# (about 8 minutes). Each section runs under its own time limit and a failing section does not stop
# the others; logs and JSON land in $OUT (default runs/gpu_check). Run from the repository root on a
# machine whose python3 has a CUDA torch, transformers, tokenizers, safetensors (no install needed):
#
#     bash benchmarks/gpu_check.sh [sections]     # default: env tests fp8gemm step serve model mtp train
#
# Figures from it go into BENCHMARKS.md with the card named.
set -u
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-/tmp/frugalm-cache}
SECTIONS=${1:-env tests fp8gemm step serve model mtp train}
PY=${PY:-python3}

run() {  # run NAME LIMIT_S CMD...: log to $OUT/NAME.log, print its tail and how it ended
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-25}" "$OUT/$name.log"
  echo "=== $name: rc=$rc, $((SECONDS - t0)) s"
}

# A ~0.75B-total MoE (112M activated; 8 layers, d=1024, 64 experts of 512 + 2 shared, top-6), 16k tokens/step.
STEP_MODEL=(--set model.hidden_size=1024 --set model.num_hidden_layers=8 --set model.intermediate_size=2816
  --set model.moe_intermediate_size=512 --set model.n_routed_experts=64 --set model.n_shared_experts=2
  --set model.num_experts_per_tok=6 --set model.n_group=8 --set model.topk_group=4
  --set model.num_attention_heads=8 --set model.num_key_value_heads=8 --set model.q_lora_rank=384
  --set model.kv_lora_rank=256 --set model.qk_nope_head_dim=64 --set model.qk_rope_head_dim=32
  --set model.v_head_dim=64 --set model.max_position_embeddings=4096
  --set data.vocab_size=4096 --set model.vocab_size=4096
  --set train.batch_size=8 --set train.seq_len=2048 --set train.device=cuda)

for s in $SECTIONS; do
  case $s in
    env) run env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv;
           $PY -c 'import torch, transformers; print(torch.__version__, torch.version.cuda, transformers.__version__,
           torch.cuda.get_device_name(), torch.cuda.get_device_capability())'" ;;
    tests) run tests 150 $PY -m pytest -q -s -p no:cacheprovider -m gpu -rs tests/fp8/test_fp8_backends.py \
             tests/fp8/test_fp8_quantize.py tests/parallel/test_pipeline_executor.py ;;
    train) run train 100 $PY -m frugalm train --out "$OUT/tiny" --set train.max_steps=60 --set train.device=cuda \
             --set train.eval_every=60 --set train.checkpoint_every=0 --no-progress ;;
    fp8gemm) run fp8gemm 120 $PY benchmarks/fp8_gemm_speed.py --device cuda \
               --json "$OUT/fp8_gemm_speed.json" ;;
    step) run step 170 $PY benchmarks/fp8_vs_bf16.py --runs "" --speed bf16,fp8 --speed-backends blockwise \
            "${STEP_MODEL[@]}" --out "$OUT/step" --figure "$OUT/step.png" ;;
    model) run model 110 $PY benchmarks/model_vs_transformers.py --device cuda --dtype bfloat16 --batch 8 \
             --seq 1024 --rounds 3 --no-eager-hf ;;
    serve) run serve 110 $PY benchmarks/serve_decode.py --device cuda --dtype bfloat16 --batches 1,16,32 \
             --new 128 --repeats 2 --skip mtp,synthetic --json "$OUT/serve_decode.json" ;;
    serve32) run serve32 90 $PY benchmarks/serve_decode.py --device cuda --dtype float32 --batches 1,16 \
               --new 64 --skip mtp,synthetic --json "$OUT/serve_decode_fp32.json" ;;
    mtp) run mtp 80 $PY benchmarks/serve_decode.py --device cuda --dtype bfloat16 --model runs/tiny/final \
           --skip decode,synthetic --mtp-k 1,2 --mtp-batches 1,16 --json "$OUT/serve_mtp.json" ;;
    *) echo "unknown section $s" ;;
  esac
done
