#!/usr/bin/env bash
# The GPU checks, as one prepared script (< 8 minutes on one H200): the CUDA-marked tests, then E2E vs
# MAN++ s/iter and torch.cuda.max_memory_allocated for ResNet-32 K=16 b1024, ResNet-101 K=4 b64 at 224²
# and ViT-B K=4 b64, bf16 (benchmarks/gpu_check.py); blocks in flight 1/2/3 (issue #17) on CUDA streams
# (ResNet-32 K=16, fp32 b128 and bf16 b1024) and the thread version on the machine's CPU cores
# (benchmarks/blocks_in_flight.py); ResNet-50 224² b32 memory plans beside torch.cuda.max_memory_allocated
# (benchmarks/memory_plan.py). Uses the machine's python3 with a CUDA torch; the
# package is taken from src/ (no install). Output rows: benchmarks/results/gpu_check.jsonl (or $OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c 'import torch, sys; ok = torch.cuda.is_available(); print("torch", torch.__version__, "cuda", ok); sys.exit(0 if ok else 1)'
"$PY" -m pip install --quiet --no-deps --no-index pycocotools 2>/dev/null || true   # optional (COCO AP)
timeout 240 "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider
RESULTS=${OUT:+$OUT/gpu_check.jsonl}
timeout 300 "$PY" benchmarks/gpu_check.py --steps 10 --warmup 3 ${RESULTS:+--results "$RESULTS"}
timeout 150 "$PY" benchmarks/blocks_in_flight.py --device cuda --batch 128 --iters 20 --warmup 5 \
    ${OUT:+--results "$OUT/blocks_in_flight_cuda.jsonl"}
timeout 150 "$PY" benchmarks/blocks_in_flight.py --device cuda --amp bf16 --batch 1024 --iters 20 --warmup 5 \
    ${OUT:+--results "$OUT/blocks_in_flight_cuda.jsonl"}
timeout 200 "$PY" benchmarks/memory_plan.py --part targets --device cuda --models resnet50 \
    --results "${OUT:-benchmarks/results}/memory_plan_cuda.jsonl"   # the CUDA allocator peak beside the plan (#24)
timeout 240 "$PY" benchmarks/blocks_in_flight.py --device cpu --batch 128 --iters 6 --warmup 2 \
    ${OUT:+--results "$OUT/blocks_in_flight_cpu.jsonl"}
