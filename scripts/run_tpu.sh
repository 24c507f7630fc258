#!/usr/bin/env bash
# Runs the same idat_jax command on every worker of a Cloud TPU VM slice.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b bash scripts/run_tpu.sh [--dry_run] \
#     --config configs/idat_vtab.py:task=dtd,backend=tfds --workdir gs://bucket/runs/dtd \
#     --config.data.tfds_data_dir=gs://bucket/tensorflow_datasets \
#     --config.models.student.checkpoint=gs://bucket/ckpt/B_16-...npz ...
#
# --dry_run (or DRY_RUN=1) prints the gcloud command and the exact command every worker runs,
# and starts nothing. Rehearse the same arguments first on one machine with
# `bash scripts/launch_local.sh 4 ARGS...` (4 CPU processes standing in for 4 hosts).
#
# Every worker must hold the same checkout in $REPO_DIR (default ~/idat-jax) with
# `pip install -e ".[gcs]"` and jax[tpu] done (see README, "Cloud TPU"). The command is started on all
# workers at once (--worker=all): jax.distributed.initialize() waits for every host (up to
# config.distributed.initialization_timeout_s), so a command started on one worker alone fails.
# Process 0 writes metrics, results.csv, config.json and exports; all write checkpoints.
set -euo pipefail
DRY_RUN="${DRY_RUN:-0}"
if [[ "${1:-}" == "--dry_run" || "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
if [[ "$DRY_RUN" == "1" ]]; then
  TPU_NAME="${TPU_NAME:-<TPU_NAME>}"
  ZONE="${ZONE:-<ZONE>}"
fi
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
REPO_DIR="${REPO_DIR:-~/idat-jax}"
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project "$PROJECT"); fi
ARGS=""
if [[ $# -gt 0 ]]; then ARGS=$(printf ' %q' "$@"); fi
# The override goes after the arguments: absl rejects --config.x before --config itself.
# Each worker picks its interpreter as scripts/python_env.sh does on this machine: $PYTHON as
# given here (a path on the workers), else its checkout's .venv (scripts/setup_env.sh), else
# python3.
if [[ -n "${PYTHON:-}" ]]; then
  WORKER_PYTHON=$(printf '%q' "$PYTHON")
else
  WORKER_PYTHON='$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )'
fi
WORKER_CMD="cd $REPO_DIR && $WORKER_PYTHON -m idat_jax.main$ARGS --config.distributed.enabled=True"
GCLOUD=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all
        --command "$WORKER_CMD")
if [[ "$DRY_RUN" == "1" ]]; then
  echo "# every worker runs:"
  echo "$WORKER_CMD"
  echo "# started on all workers by:"
  printf '%q ' "${GCLOUD[@]}"
  echo
  exit 0
fi
exec "${GCLOUD[@]}"
