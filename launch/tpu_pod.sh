#!/usr/bin/env bash
# mmjax on a Cloud TPU VM pod slice: the same command on every worker, through
# `gcloud compute tpus tpu-vm ssh --worker=all`.
#
#   launch/tpu_pod.sh setup   # clone or update the repo on every worker, install '.[tpu]'
#   launch/tpu_pod.sh train --config=experiments/clip_vit_l14.py:data=coco_captions \
#       --workdir=gs://BUCKET/clip_l14 --config.mesh.preset=fsdp --config.data_shards=64
#   (--config.data_shards=64: the same batches on every process count that divides
#   64, so a run resumed on another number of hosts keeps its data order)
#   launch/tpu_pod.sh logs    # every worker's log into ./logs/TPU_NAME/
#   launch/tpu_pod.sh stop    # SIGTERM to the training processes: they save, then exit
#
# Settings (environment): TPU_NAME, ZONE, PROJECT (default: gcloud's),
# REPO (git URL to clone, default this checkout's origin), BRANCH (default the
# current one), REMOTE_DIR (default ~/mmjax). The workdir should be a gs://
# bucket (or storage every worker mounts): every process writes checkpoints.
#
# Each worker runs training in the background (nohup), logging to
# ~/mmjax_logs/train.log; `train` returns once all have started. Worker I learns
# its index and worker 0's address from the TPU VM metadata server (the source
# jax.distributed.initialize() also reads) and gets them as MMJAX_PROCESS_ID and
# MMJAX_COORDINATOR, which mmjax.distributed passes on.
set -euo pipefail
cmd=${1:-}
shift || true
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}" "${ZONE:?set ZONE, e.g. us-east5-a}"
project=()
[[ -n "${PROJECT:-}" ]] && project=(--project "$PROJECT")
repo=${REPO:-$(git -C "$(dirname "$0")/.." remote get-url origin 2>/dev/null || true)}
branch=${BRANCH:-$(git -C "$(dirname "$0")/.." rev-parse --abbrev-ref HEAD 2>/dev/null || echo main)}
remote_dir=${REMOTE_DIR:-mmjax}

on_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${project[@]}" --worker=all \
    --command "$1"
}

case "$cmd" in
  setup)
    on_all "set -e
      if [ ! -d $remote_dir/.git ]; then git clone --branch $branch $repo $remote_dir; fi
      cd $remote_dir && git fetch -q origin && git checkout -q $branch && git pull -q --ff-only
      python3 -m venv ~/mmjax_venv && . ~/mmjax_venv/bin/activate
      pip install -q -U pip && pip install -q -e '.[tpu]'
      python -c 'import jax; print(jax.local_device_count(), \"local TPU devices\")'"
    ;;
  train)
    # Quote every flag for the remote shell.
    flags=$(printf ' %q' "$@")
    on_all "set -e
      meta() { curl -sf -H Metadata-Flavor:Google \
        http://metadata.google.internal/computeMetadata/v1/instance/attributes/\$1; }
      endpoints=\$(meta worker-network-endpoints)   # name:id:ip,... or host,...
      first=\${endpoints%%,*}
      export MMJAX_COORDINATOR=\${first##*:}:8476
      export MMJAX_NUM_PROCESSES=\$(echo \$endpoints | tr ',' '\n' | wc -l)
      export MMJAX_PROCESS_ID=\$(meta agent-worker-number)
      mkdir -p ~/mmjax_logs && cd $remote_dir && . ~/mmjax_venv/bin/activate
      nohup python -m mmjax.train$flags > ~/mmjax_logs/train.log 2>&1 < /dev/null &
      echo \$! > ~/mmjax_logs/train.pid
      echo worker \$MMJAX_PROCESS_ID of \$MMJAX_NUM_PROCESSES started, pid \$!"
    ;;
  logs)
    dest="logs/$TPU_NAME"
    mkdir -p "$dest"
    # Each worker's log gets its worker number in its name, then comes here.
    on_all 'cp ~/mmjax_logs/train.log ~/mmjax_logs/worker_$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number).log'
    gcloud compute tpus tpu-vm scp "$TPU_NAME:~/mmjax_logs/worker_*.log" "$dest/" --zone "$ZONE" \
      "${project[@]}" --worker=all
    echo "logs in $dest/"; tail -n 5 "$dest/worker_0.log" || true
    ;;
  stop)
    on_all 'kill -TERM $(cat ~/mmjax_logs/train.pid) 2>/dev/null || true'
    ;;
  *)
    echo "usage: TPU_NAME=... ZONE=... $0 setup|train [train flags...]|logs|stop" >&2
    exit 2
    ;;
esac
