#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (single- or multi-host): create or reuse the slice, install this
# checkout on every worker, and run `python -m launch.train` on all workers at once.
#
#   TPU_NAME=rlhf-v5e ZONE=us-west4-a ACCELERATOR_TYPE=v5litepod-16 BUCKET=gs://my-bucket \
#   EXPERIMENT=dpo_hh MESH_FSDP=16 HF_CHECKPOINT=gs://my-bucket/ckpt/TinyLlama-1.1B \
#   launch/tpu_pod.sh all -- --config.data.path=/mnt/bucket/hh/train.jsonl.gz
#
# Steps (first argument; default `all`):
#   create  create the slice unless it exists (then reuse it)
#   setup   copy this checkout (tracked + untracked, not ignored files) to every worker, pip-install it
#           with jax[tpu], mount BUCKET at /mnt/bucket (gcsfuse), copy HF_CHECKPOINT to local disk
#   run     run the experiment on every worker; arguments after `--` go to launch.train
#   all     create, setup, run
#   delete  delete the slice
#
# Variables (required: TPU_NAME, ZONE, BUCKET, EXPERIMENT for `run`):
#   TPU_NAME          slice name
#   ZONE              e.g. us-west4-a (v5e), us-central2-b (v4)
#   PROJECT           gcloud project (default: gcloud's configured one)
#   ACCELERATOR_TYPE  v5litepod-16 (16 v5e chips, 4 hosts) by default; v4-32 is 16 v4 chips on 4 hosts
#   RUNTIME_VERSION   TPU VM image; default by generation (v5e: v2-alpha-tpuv5-lite, v4:
#                     tpu-ubuntu2204-base, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e)
#   SPOT=1            create a Spot (preemptible) slice; rerunning `run` resumes from the checkpoints
#   BUCKET            gs://BUCKET[/PREFIX] holding data and receiving the workdir, mounted with gcsfuse
#                     on every worker at /mnt/bucket (launch.train and the metrics writer use local file
#                     APIs, so the workdir is a mounted path, not a gs:// URL):
#                     the workdir is /mnt/bucket/workdirs/$RUN_NAME; give data paths under /mnt/bucket
#   EXPERIMENT        NAME[:VARIANT] from experiments/
#   RUN_NAME          workdir name under the bucket (default: the experiment name, ':' -> '_')
#   MESH_DATA, MESH_FSDP, MESH_TENSOR   mesh axis sizes (default -1, 1, 1); see README "TPU pods"
#   HF_CHECKPOINT     optional gs://... or /mnt/bucket/... HF checkpoint directory, copied to each worker's
#                     local disk and passed as --config.model.init_from_hf
#   JAX_VERSION       jax[tpu] version to install (default 0.10.2, the version the tests ran with)
#   DETACH=1          run under nohup on each worker (log: ~/train.log) instead of streaming output
#
# Multi-host: every worker runs the same command; launch.train calls jax.distributed.initialize(),
# which on a TPU VM finds the process count and index itself. The coordinator is worker 0, whose
# internal IP is passed as JAX_COORDINATOR_ADDRESS (that variable is also what launch.train looks for
# before initialising).
set -euo pipefail

STEP="${1:-all}"
if [[ $# -gt 0 ]]; then shift; fi
if [[ "${1:-}" == "--" ]]; then shift; fi
EXTRA_ARGS=("$@")

: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-16}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"
MESH_DATA="${MESH_DATA:--1}"
MESH_FSDP="${MESH_FSDP:-1}"
MESH_TENSOR="${MESH_TENSOR:-1}"
MOUNT=/mnt/bucket
# shellcheck disable=SC2088  # expanded by the remote shell, on each worker
REMOTE_DIR='~/rlhf_jax'
HF_LOCAL=/tmp/hf_checkpoint
if [[ -z "${RUNTIME_VERSION:-}" ]]; then
  case "$ACCELERATOR_TYPE" in
    v5litepod-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    *) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
  esac
fi
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then WHERE+=(--project="$PROJECT"); fi

on_all() {  # runs a command on every worker of the slice, in parallel
  "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command="$1"
}

create() {
  if "${GCLOUD[@]}" describe "$TPU_NAME" "${WHERE[@]}" >/dev/null 2>&1; then
    echo "[tpu_pod] reusing $TPU_NAME"
    return
  fi
  local spot=()
  if [[ "${SPOT:-0}" == 1 ]]; then spot=(--spot); fi
  echo "[tpu_pod] creating $TPU_NAME ($ACCELERATOR_TYPE, $RUNTIME_VERSION)"
  "${GCLOUD[@]}" create "$TPU_NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" "${spot[@]}"
}

setup() {
  : "${BUCKET:?set BUCKET=gs://...}"
  local tarball repo bucket_name bucket_dir fuse_args
  bucket_name="${BUCKET#gs://}"
  bucket_name="${bucket_name%%/*}"
  bucket_dir="${BUCKET#gs://"$bucket_name"}"
  bucket_dir="${bucket_dir#/}"
  # Orbax finalises a checkpoint by renaming its temporary directory; gcsfuse needs a limit for that.
  fuse_args="--implicit-dirs --rename-dir-limit=100000"
  if [[ -n "$bucket_dir" ]]; then fuse_args+=" --only-dir=$bucket_dir"; fi
  repo="$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)"
  tarball="$(mktemp -t rlhf_jax.XXXXXX.tgz)"
  (cd "$repo" && git ls-files -z --cached --others --exclude-standard | tar --null -czf "$tarball" -T -)
  "${GCLOUD[@]}" scp "$tarball" "$TPU_NAME":rlhf_jax.tgz "${WHERE[@]}" --worker=all
  rm -f "$tarball"
  on_all "set -e
    rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf ~/rlhf_jax.tgz -C $REMOTE_DIR
    python3 -m pip install -q --upgrade pip
    python3 -m pip install -q -e $REMOTE_DIR 'jax[tpu]==$JAX_VERSION'
    if ! command -v gcsfuse >/dev/null; then
      echo 'deb https://packages.cloud.google.com/apt gcsfuse-jammy main' |
        sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
      curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - >/dev/null 2>&1
      sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
    fi
    sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT
    mountpoint -q $MOUNT || gcsfuse $fuse_args $bucket_name $MOUNT"
  if [[ -n "${HF_CHECKPOINT:-}" ]]; then
    # Every host memory-maps the checkpoint and reads only its own shards: local disk, not FUSE.
    on_all "set -e; rm -rf $HF_LOCAL && mkdir -p $HF_LOCAL
      if [[ '$HF_CHECKPOINT' == gs://* ]]; then gcloud storage cp -r '$HF_CHECKPOINT/*' $HF_LOCAL/
      else cp -r '$HF_CHECKPOINT'/. $HF_LOCAL/; fi"
  fi
}

run() {
  : "${EXPERIMENT:?set EXPERIMENT=NAME[:VARIANT]}"
  local coordinator run_name args
  coordinator="$("${GCLOUD[@]}" describe "$TPU_NAME" "${WHERE[@]}" \
    --format='value(networkEndpoints[0].ipAddress)')"
  run_name="${RUN_NAME:-${EXPERIMENT//:/_}}"
  args="--experiment=$EXPERIMENT --workdir=$MOUNT/workdirs/$run_name"
  args+=" --config.mesh.data=$MESH_DATA --config.mesh.fsdp=$MESH_FSDP --config.mesh.tensor=$MESH_TENSOR"
  if [[ -n "${HF_CHECKPOINT:-}" ]]; then args+=" --config.model.init_from_hf=$HF_LOCAL"; fi
  for a in "${EXTRA_ARGS[@]}"; do args+=" $(printf '%q' "$a")"; done
  local cmd="cd $REMOTE_DIR && JAX_COORDINATOR_ADDRESS=$coordinator:8476 python3 -m launch.train $args"
  echo "[tpu_pod] on all workers: $cmd"
  if [[ "${DETACH:-0}" == 1 ]]; then
    on_all "nohup bash -c $(printf '%q' "$cmd") > ~/train.log 2>&1 < /dev/null & echo started on \$(hostname)"
  else
    on_all "$cmd"
  fi
}

case "$STEP" in
  create) create ;;
  setup) setup ;;
  run) run ;;
  all) create && setup && run ;;
  delete) "${GCLOUD[@]}" delete "$TPU_NAME" "${WHERE[@]}" --quiet ;;
  *) echo "usage: $0 [create|setup|run|all|delete] [-- launch.train args]" >&2; exit 2 ;;
esac
