#!/usr/bin/env bash
# One process: `python -m mmjax.train` with the flags given, on whatever this
# machine has (CPU, one or more GPUs, a single-host TPU VM).
#
#   launch/local.sh --config=experiments/clip_shapes.py --workdir=runs/clip_shapes
#   DEVICES=8 launch/local.sh --config=... --workdir=...   # 8 fake CPU devices
#   MMJAX_MODULE=mmjax.evaluate launch/local.sh --config=... --workdir=...
#
# With DEVICES, a run given by --config reads its data as DEVICES shards
# (--config.data_shards) unless the flags say otherwise: the batches of
# launch/multiprocess_local.sh on as many devices in all (8 = 2 x 4).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
args=("$@")
if [[ -n "${DEVICES:-}" ]]; then
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES}"
  if printf '%s\n' "${args[@]}" | grep -q -- '^--config=' &&
     ! printf '%s\n' "${args[@]}" | grep -q -- '^--config\.data_shards='; then
    args+=("--config.data_shards=${DEVICES}")
  fi
fi
exec "$PYTHON" -m "${MMJAX_MODULE:-mmjax.train}" "${args[@]}"
