#!/usr/bin/env bash
# Runs N local processes of `python -m idat_jax.main ARGS...`, each with D fake CPU devices
# (DEVICES_PER_PROCESS, default 4): the multi-host code path of a Cloud TPU slice or a
# multi-node GPU job, rehearsed on one machine. Log lines are prefixed [p0], [p1], ...; the exit
# status is non-zero if any process fails, and the others are stopped then.
#
#   bash scripts/launch_local.sh 2 --config configs/idat_vtab.py:task=dtd --workdir runs/dtd2
#
# See `python -m idat_jax.launch --help` for the timeout and grace options.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: bash scripts/launch_local.sh N [--config ... --workdir ... ARGS]" >&2
  exit 2
fi
N="$1"
shift
source scripts/python_env.sh
exec "$PYTHON" \
  -m idat_jax.launch --num_processes "$N" \
  --devices_per_process "${DEVICES_PER_PROCESS:-4}" -- "$@"
