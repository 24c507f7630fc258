#!/usr/bin/env bash
# Runs the same idat_jax command on every worker of a Cloud TPU VM slice.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b bash scripts/run_tpu.sh \
#     --config configs/idat_vtab.py:task=dtd,backend=tfds --workdir gs://bucket/runs/dtd \
#     --config.data.tfds_data_dir=gs://bucket/tensorflow_datasets \
#     --config.models.student.checkpoint=gs://bucket/ckpt/B_16-...npz ...
#
# Every worker must hold the same checkout in $REPO_DIR (default ~/idat-jax) with
# `pip install -e .` and jax[tpu] done (see README, "Cloud TPU"). The command is started on all
# workers at once (--worker=all): jax.distributed.initialize() waits for every host, so a
# command started on one worker alone hangs. Process 0 writes metrics; all write checkpoints.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
REPO_DIR="${REPO_DIR:-~/idat-jax}"
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project "$PROJECT"); fi
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all \
  --command "cd $REPO_DIR && python3 -m idat_jax.main --config.distributed=True $ARGS"
