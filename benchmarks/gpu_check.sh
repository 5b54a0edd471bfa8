#!/usr/bin/env bash
# One prepared device run (H100/H200; torch, transformers, triton preinstalled; nothing installed):
# engine correctness against transformers, the decode-step and merge-step A/B benchmarks, then the
# 7B bench matrix. Every stage has its own timeout and writes into $OUT, so a slow stage loses only itself.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)" | tee -a "$OUT/device.txt"
timeout 60 python benchmarks/gpu_engine_check.py "$OUT/engine_check.json" 2>&1 | tail -5
timeout 90 python benchmarks/decode_step.py --out "$OUT/decode_step.json" 2>&1 | tail -8
timeout 60 python benchmarks/merge_step.py --out "$OUT/merge_step.json" 2>&1 | tail -12
timeout "${BENCH_TIMEOUT:-240}" python jobs/bench.py --shape qwen2-audio-7b --device cuda --audio-seconds 240 \
    --batch 1 8 --max-new-tokens "${NEW_TOKENS:-32}" --methods none fastadasp --levels 0.5 --fit \
    --out "$OUT/bench-7b" 2>&1 | tail -20
