#!/usr/bin/env bash
# Runs the 19 VTAB-1K tasks (and seeds) of one method, skipping runs that already finished.
#
#   bash scripts/run_vtab.sh runs/idat "idat" "42 43 44" --config.data.root=/data/vtab-1k
#   bash scripts/run_vtab.sh runs/adapter "adapter" "42" --config.data.root=/data/vtab-1k
#   python scripts/vtab_table.py runs/idat runs/adapter --out runs/table
#
# A run is finished when its work dir has results.csv (written after the last epoch); an
# interrupted run resumes from its last checkpoint when the script is started again.
set -euo pipefail
ROOT="${1:?usage: run_vtab.sh OUT_DIR METHOD SEEDS [extra flags]}"
METHOD="${2:-idat}"
SEEDS="${3:-42}"
shift 3 || true
PYTHON="${PYTHON:-python3}"
# The 19 task folder names, from the registry (idat_jax.data.vtab).
TASKS="$("$PYTHON" -c 'from idat_jax.data import vtab; print(" ".join(vtab.VTAB_TASKS))')"
for seed in $SEEDS; do
  for task in $TASKS; do
    workdir="$ROOT/$task/seed$seed"
    if [[ -f "$workdir/results.csv" ]]; then
      echo "skip $task seed $seed (finished)"; continue
    fi
    echo "=== $METHOD $task seed $seed -> $workdir"
    "$PYTHON" -m idat_jax.main \
      --config "configs/idat_vtab.py:task=$task,method=$METHOD,seed=$seed" \
      --workdir "$workdir" --config.progress_bar=False "$@"
  done
done
