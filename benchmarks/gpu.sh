#!/usr/bin/env bash
# GPU readiness: CLIP ViT-B/16 + B text tower (bfloat16, cuDNN flash
# attention, the largest batch that fits) and a LLaVA stage-2 step with a ~1B
# LLM on one GPU; prints examples/s and MFU against the chip's bf16 peak
# (989 TFLOP/s on H100). Finishes within 8 minutes or is stopped.
#
#   bash benchmarks/gpu.sh [--out=FILE.json]      # one H100 / H200, jax[cuda12]
#   bash benchmarks/gpu.sh --smoke                # tiny models: checks it on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
# The batch search reads the device's memory limit: let XLA take most of it.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
exec timeout --signal=INT "${GPU_BENCH_TIMEOUT_S:-480}" "${PYTHON:-python}" -m benchmarks.gpu "$@"
