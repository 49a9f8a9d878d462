#!/usr/bin/env bash
# Cloud TPU job driver for freeanimate-jax: create a TPU VM or pod slice (on demand, spot or a
# queued resource), install, sync this checkout, run a command on every host (jax.distributed
# joins them), train with checkpoints that survive preemption, follow logs, stop, delete.
#
#   TPU_NAME=fa-v5e ZONE=us-west4-a ACCELERATOR=v5litepod-8 ./run_tpu.sh create
#   ./run_tpu.sh setup            # venv + `pip install -e .[tpu,train]` on every worker
#   ./run_tpu.sh sync             # this checkout's tracked files -> ~/freeanimate-jax on every worker
#   ./run_tpu.sh run animate --reference ref.png --poses poses/ --out out.mp4
#   ./run_tpu.sh train --out gs://bucket/runs/v3 --config configs/train_motion_v3.yaml [k=v ...]
#   ./run_tpu.sh babysit --out gs://bucket/runs/v3 --config configs/train_motion_v3.yaml
#                                 # create + setup + sync + train, then re-create the slice and
#                                 # restart the same command after a preemption (it resumes
#                                 # from the run's last checkpoint) until training completes
#   ./run_tpu.sh logs             # follow a worker's log (WORKER=0 by default)
#   ./run_tpu.sh stop | delete
#
# SPOT=1 asks for a spot slice; QUEUED=1 creates it as a queued resource. DRY_RUN=1 prints
# every command instead of running it. Check that a job fits first:
#   freeanimate fit animate --topology v5e-8 --frames 16 --size 512
#   freeanimate fit train --topology v5e-8 --frames 16 --size 256
set -euo pipefail

TPU_NAME=${TPU_NAME:-freeanimate}
ZONE=${ZONE:-us-west4-a}
ACCELERATOR=${ACCELERATOR:-v5litepod-8}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5-lite}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REMOTE_DIR=${REMOTE_DIR:-freeanimate-jax}
VENV=${VENV:-'~/venv'}  # on the workers (~ expands there)
LOG=${LOG:-freeanimate.log}
DONE=${DONE:-freeanimate.done}  # the training command's ending, written on each worker
WORKER=${WORKER:-0}
POLL=${POLL:-60}  # babysit: seconds between checks

run() {
  if [ "${DRY_RUN:-0}" = "1" ]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

ssh_one() {  # ssh_one WORKER COMMAND
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker="$1" \
    --command="$2"
}

ssh_all() {
  ssh_one all "$1"
}

create() {
  spot=${SPOT:+--spot}
  if [ "${QUEUED:-0}" = "1" ]; then
    run gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" \
      --zone="$ZONE" $PROJECT_FLAG --accelerator-type="$ACCELERATOR" \
      --runtime-version="$RUNTIME" $spot
  else
    run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME" $spot
  fi
}

delete() {
  if [ "${QUEUED:-0}" = "1" ]; then
    run gcloud compute tpus queued-resources delete "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG \
      --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --quiet
  fi
}

setup() {
  # An existing environment is kept (a re-created slice is bare; a restarted job is not).
  ssh_all "test -x $VENV/bin/freeanimate || { python3 -m venv $VENV && $VENV/bin/pip install -q -U pip && cd ~/$REMOTE_DIR && $VENV/bin/pip install -q -e '.[tpu,train]'; }"
}

sync() {
  # Tracked files only (no virtualenvs, outputs or caches), unpacked on every worker.
  archive=$(mktemp -t freeanimate-XXXXXX.tar.gz)
  run git archive --format=tar.gz -o "$archive" HEAD
  run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:~/freeanimate-src.tar.gz" \
    --zone="$ZONE" $PROJECT_FLAG --worker=all
  ssh_all "mkdir -p ~/$REMOTE_DIR && tar -xzf ~/freeanimate-src.tar.gz -C ~/$REMOTE_DIR"
}

start() {  # start FREEANIMATE-ARGS...: in the background on every worker, logged per worker
  args=$(printf '%q ' "$@")
  ssh_all "cd ~/$REMOTE_DIR && FREEANIMATE_DISTRIBUTED=1 nohup $VENV/bin/freeanimate $args > ~/$LOG 2>&1 &"
}

train_args() {  # --out DIR [args...] -> train run [args...] train.output_dir=DIR
  [ "${1:-}" = "--out" ] && [ -n "${2:-}" ] || {
    echo "run_tpu.sh: $cmd needs --out DIR (a gs:// bucket path or a folder on the workers) first" >&2
    exit 2
  }
  out=$2
  shift 2
  MOUNT=""
  case "$out" in
    gs://*)  # a bucket, mounted with gcsfuse on every worker: it outlives a preempted slice
      bucket=${out#gs://}
      bucket=${bucket%%/*}
      MOUNT=$bucket
      out="../gcs/$bucket${out#gs://$bucket}"
      out=${out%/}
      ;;
  esac
  TRAIN=(train run "$@" "train.output_dir=$out")
}

mount_bucket() {  # the mount command for $MOUNT under ~/gcs (gcsfuse installed if missing)
  [ -n "$MOUNT" ] || return 0
  echo "mkdir -p ~/gcs/$MOUNT && { command -v gcsfuse >/dev/null || { echo 'deb https://packages.cloud.google.com/apt gcsfuse-'\$(lsb_release -c -s)' main' | sudo tee /etc/apt/sources.list.d/gcsfuse.list && curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - && sudo apt-get -q update && sudo apt-get -q install -y gcsfuse; }; } && { mountpoint -q ~/gcs/$MOUNT || gcsfuse --implicit-dirs $MOUNT ~/gcs/$MOUNT; } && "
}

train() {
  # The ending goes to ~/$DONE: the exit status, or "preempted" when SIGTERM stopped the run
  # (it saved a checkpoint and exited 0, but training is not over).
  args=$(printf '%q ' "${TRAIN[@]}")
  inner="FREEANIMATE_DISTRIBUTED=1 $VENV/bin/freeanimate $args; rc=\$?; if grep -q '^SIGTERM: saved' ~/$LOG; then echo preempted; else echo \$rc; fi > ~/$DONE"
  ssh_all "$(mount_bucket)cd ~/$REMOTE_DIR && rm -f ~/$DONE && nohup bash -c $(printf '%q' "$inner") > ~/$LOG 2>&1 &"
}

state() {  # the slice's state (READY, CREATING, PREEMPTED, ...), MISSING when there is none
  if [ "${DRY_RUN:-0}" = "1" ]; then
    run gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG \
      --format='value(state)'
    echo READY
    return
  fi
  gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG \
    --format='value(state)' 2>/dev/null || echo MISSING
}

ending() {  # what ~/$DONE on worker 0 says ("" while the job runs)
  if [ "${DRY_RUN:-0}" = "1" ]; then
    ssh_one 0 "cat ~/$DONE 2>/dev/null || true"
    return
  fi
  ssh_one 0 "cat ~/$DONE 2>/dev/null || true" 2>/dev/null | tail -n 1 || true
}

launch() {  # a fresh slice: create, setup, sync, train
  create
  setup
  sync
  train
}

babysit() {
  s=$(state | tail -n 1)
  if [ "$s" = "MISSING" ]; then
    echo "babysit: no slice $TPU_NAME; creating it"
    launch
  else
    train  # the slice exists: (re)start the command; it resumes from its last checkpoint
  fi
  if [ "${DRY_RUN:-0}" = "1" ]; then  # one check, then one re-creation after a preemption
    ending
    echo "babysit: slice PREEMPTED; re-creating it and restarting the command"
    delete
    launch
    return
  fi
  while true; do
    sleep "$POLL"
    s=$(state | tail -n 1)
    case "$s" in
      READY)
        e=$(ending)
        case "$e" in
          "" | preempted) ;;  # running, or stopped by SIGTERM: the slice is going away
          0) echo "babysit: training completed"; return 0 ;;
          *) echo "babysit: the training command failed (exit $e); not restarting it" >&2
             return 1 ;;
        esac
        ;;
      PREEMPTED | TERMINATED | STOPPED | SUSPENDED | MISSING | FAILED)
        echo "babysit: slice $s; re-creating it and restarting the command"
        [ "$s" = "MISSING" ] || delete
        launch
        ;;
      *) ;;  # CREATING, STARTING, ...: wait
    esac
  done
}

cmd=${1:-help}
shift || true
case "$cmd" in
  create) create ;;
  setup) setup ;;
  sync) sync ;;
  run)
    [ "$#" -gt 0 ] || { echo "run_tpu.sh: run needs a freeanimate command" >&2; exit 2; }
    start "$@"
    ;;
  train)
    train_args "$@"
    train
    ;;
  babysit)
    train_args "$@"
    babysit
    ;;
  logs)
    ssh_one "$WORKER" "tail -n 200 -f ~/$LOG"
    ;;
  stop)
    ssh_all "pkill -f 'bin/freeanimate' || true"
    ;;
  delete) delete ;;
  *)
    sed -n '2,22p' "$0"
    [ "$cmd" = "help" ] || exit 2
    ;;
esac
