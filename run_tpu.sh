#!/usr/bin/env bash
# Cloud TPU job driver for freeanimate-jax: create a TPU VM or pod slice, install, sync this
# checkout, run a command on every host (jax.distributed joins them), follow logs, stop, delete.
#
#   TPU_NAME=fa-v5e ZONE=us-west4-a ACCELERATOR=v5litepod-8 ./run_tpu.sh create
#   ./run_tpu.sh setup            # venv + `pip install -e .[tpu]` on every worker
#   ./run_tpu.sh sync             # this checkout's tracked files -> ~/freeanimate-jax on every worker
#   ./run_tpu.sh run animate --reference ref.png --poses poses/ --out out.mp4
#   ./run_tpu.sh logs             # follow worker 0's log
#   ./run_tpu.sh stop | delete
#
# DRY_RUN=1 prints the gcloud commands instead of running them. Check that a job fits first:
#   freeanimate fit animate --topology v5e-8 --frames 16 --size 512
#   freeanimate fit generate --topology v5e-8 --frames 16 --size 512   # AnimateDiff, v3 layout
set -euo pipefail

TPU_NAME=${TPU_NAME:-freeanimate}
ZONE=${ZONE:-us-west4-a}
ACCELERATOR=${ACCELERATOR:-v5litepod-8}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5-lite}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REMOTE_DIR=${REMOTE_DIR:-freeanimate-jax}
LOG=${LOG:-freeanimate.log}

run() {
  if [ "${DRY_RUN:-0}" = "1" ]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all \
    --command="$1"
}

cmd=${1:-help}
shift || true
case "$cmd" in
  create)
    run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
    ;;
  setup)
    ssh_all "python3 -m venv ~/venv && ~/venv/bin/pip install -q -U pip && cd ~/$REMOTE_DIR && ~/venv/bin/pip install -q -e '.[tpu]'"
    ;;
  sync)
    # Tracked files only (no virtualenvs, outputs or caches), unpacked on every worker.
    archive=$(mktemp -t freeanimate-XXXXXX.tar.gz)
    run git archive --format=tar.gz -o "$archive" HEAD
    run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:~/freeanimate-src.tar.gz" \
      --zone="$ZONE" $PROJECT_FLAG --worker=all
    ssh_all "mkdir -p ~/$REMOTE_DIR && tar -xzf ~/freeanimate-src.tar.gz -C ~/$REMOTE_DIR"
    ;;
  run)
    [ "$#" -gt 0 ] || { echo "run_tpu.sh: run needs a freeanimate command" >&2; exit 2; }
    args=$(printf '%q ' "$@")
    ssh_all "cd ~/$REMOTE_DIR && FREEANIMATE_DISTRIBUTED=1 nohup ~/venv/bin/freeanimate $args > ~/$LOG 2>&1 &"
    ;;
  logs)
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=0 \
      --command="tail -n 200 -f ~/$LOG"
    ;;
  stop)
    ssh_all "pkill -f 'venv/bin/freeanimate' || true"
    ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --quiet
    ;;
  *)
    sed -n '2,16p' "$0"
    [ "$cmd" = "help" ] || exit 2
    ;;
esac
