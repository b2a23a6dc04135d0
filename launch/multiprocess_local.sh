#!/usr/bin/env bash
# N JAX processes on this machine, each with D CPU devices: a multi-host run in
# miniature (the coordinator on 127.0.0.1, CPU collectives over gloo).
#
#   launch/multiprocess_local.sh N D [train flags...]
#   launch/multiprocess_local.sh 2 4 --config=experiments/clip_shapes.py:runlocal=true \
#       --workdir=runs/mp --config.mesh.data=2 --config.mesh.fsdp=4
#
# Every process runs `python -m ${MMJAX_MODULE:-mmjax.train} [flags]` with
# MMJAX_COORDINATOR / MMJAX_NUM_PROCESSES / MMJAX_PROCESS_ID set, which
# mmjax.distributed hands to jax.distributed.initialize. Process 0 prints to this
# terminal; every process logs to $MMJAX_LOG_DIR/process_I.log (default: a new
# temporary folder, printed). MMJAX_PORT picks the coordinator port (default: a
# free one).
#
# A run given by --config reads its data as N*D shards (--config.data_shards)
# unless the flags say otherwise, so that its batches are those of every run on
# N*D devices, whatever the process count (1 x 8 = 2 x 4), and either resumes
# the other's checkpoint.
#
# When one process fails the others get SIGTERM, and SIGKILL
# MMJAX_STOP_GRACE seconds later (default 30); the exit status is the first
# failure's. A process that loses a peer without this launcher (a pod, a
# cluster) exits by itself once JAX's coordination service misses the peer's
# heartbeats for MMJAX_HEARTBEAT_TIMEOUT seconds (default here 30; JAX's 100
# elsewhere), naming the peer.
set -euo pipefail
if [[ $# -lt 2 || ! "$1" =~ ^[0-9]+$ || ! "$2" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS [train flags...]" >&2
  exit 2
fi
num=$1 devices=$2
shift 2
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
port=${MMJAX_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
logs=${MMJAX_LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/mmjax-mp.XXXXXX")}
mkdir -p "$logs"
echo "multiprocess_local: $num processes x $devices CPU devices, coordinator 127.0.0.1:$port, logs in $logs" >&2

args=("$@")
if printf '%s\n' "${args[@]}" | grep -q -- '^--config=' &&
   ! printf '%s\n' "${args[@]}" | grep -q -- '^--config\.data_shards='; then
  args+=("--config.data_shards=$((num * devices))")
fi
export MMJAX_HEARTBEAT_TIMEOUT=${MMJAX_HEARTBEAT_TIMEOUT:-30}
grace=${MMJAX_STOP_GRACE:-30}

pids=()
killer=
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  if [[ -z "$killer" ]]; then
    # A process blocked in a collective with a dead peer may not act on SIGTERM.
    # Its output goes nowhere, so that once every process is gone nothing holds
    # this launcher's stdout and stderr open (a caller reading them sees the end).
    (sleep "$grace"; for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done) \
      >/dev/null 2>&1 &
    killer=$!
  fi
}
trap 'stop_all; exit 143' TERM INT

for ((i = 0; i < num; i++)); do
  log="$logs/process_$i.log"
  (
    export MMJAX_COORDINATOR="127.0.0.1:$port" MMJAX_NUM_PROCESSES="$num" MMJAX_PROCESS_ID="$i"
    export JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
    export XLA_FLAGS="--xla_force_host_platform_device_count=$devices"
    if [[ $i -eq 0 ]]; then
      exec "$PYTHON" -m "${MMJAX_MODULE:-mmjax.train}" "${args[@]}" > >(tee "$log") 2>&1
    else
      exec "$PYTHON" -m "${MMJAX_MODULE:-mmjax.train}" "${args[@]}" > "$log" 2>&1
    fi
  ) &
  pids+=($!)
done

status=0
running=("${pids[@]}")
while [[ ${#running[@]} -gt 0 ]]; do
  wait -n -p done_pid "${running[@]}" && rc=0 || rc=$?
  still=()
  for pid in "${running[@]}"; do [[ "$pid" != "$done_pid" ]] && still+=("$pid"); done
  running=("${still[@]}")
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
    how="status $rc"
    if [[ $rc -gt 128 ]]; then how="status $rc (killed by SIG$(kill -l $((rc - 128))))"; fi
    for ((i = 0; i < num; i++)); do
      if [[ "${pids[$i]}" == "$done_pid" ]]; then
        echo "multiprocess_local: process $i exited with $how; stopping the others." \
          "The end of $logs/process_$i.log:" >&2
        tail -n 30 "$logs/process_$i.log" >&2
      fi
    done
    stop_all
  fi
done
if [[ -n "$killer" ]]; then kill "$killer" 2>/dev/null || true; fi
exit $status
