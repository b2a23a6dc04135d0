#!/usr/bin/env bash
# One process: `python -m mmjax.train` with the flags given, on whatever this
# machine has (CPU, one or more GPUs, a single-host TPU VM).
#
#   launch/local.sh --config=experiments/clip_shapes.py --workdir=runs/clip_shapes
#   DEVICES=8 launch/local.sh --config=... --workdir=...   # 8 fake CPU devices
#   MMJAX_MODULE=mmjax.evaluate launch/local.sh --config=... --workdir=...
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if [[ -n "${DEVICES:-}" ]]; then
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES}"
fi
exec "$PYTHON" -m "${MMJAX_MODULE:-mmjax.train}" "$@"
