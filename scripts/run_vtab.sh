#!/usr/bin/env bash
# Runs the 19 VTAB-1K tasks (and seeds) of one method, skipping runs that already finished.
#
#   bash scripts/run_vtab.sh runs/idat "idat" "42 43 44" --config.data.root=/data/vtab-1k
#   bash scripts/run_vtab.sh runs/adapter "adapter" "42" --config.data.root=/data/vtab-1k
#   python scripts/vtab_table.py runs/idat runs/adapter --out runs/table
#
# TASKS="dtd cifar" restricts the sweep to those task folders (default: the 19 VTAB-1K tasks;
# any folder task under data.root works, with its own lr/wd flags or :recipe=custom in CONFIG_ARGS).
# CONFIG_ARGS="recipe=custom,dtype=float32" appends arguments to every run's config string.
# The interpreter is $PYTHON, else the project's .venv, else python3 (scripts/python_env.sh).
#
# A run is finished when its work dir has results.csv (written after the last epoch); an
# interrupted run resumes from its last checkpoint when the script is started again.
set -euo pipefail
ROOT="${1:?usage: run_vtab.sh OUT_DIR METHOD SEEDS [extra flags]}"
METHOD="${2:-idat}"
SEEDS="${3:-42}"
shift 3 || true
source "$(dirname "${BASH_SOURCE[0]}")/python_env.sh"
# The 19 task folder names, from the registry (idat_jax.data.vtab), unless TASKS is given.
TASKS="${TASKS:-$("$PYTHON" -c 'from idat_jax.data import vtab; print(" ".join(vtab.VTAB_TASKS))')}"
EXTRA="${CONFIG_ARGS:+,$CONFIG_ARGS}"
for seed in $SEEDS; do
  for task in $TASKS; do
    workdir="$ROOT/$task/seed$seed"
    if [[ -f "$workdir/results.csv" ]]; then
      echo "skip $task seed $seed (finished)"; continue
    fi
    echo "=== $METHOD $task seed $seed -> $workdir"
    "$PYTHON" -m idat_jax.main \
      --config "$REPO/configs/idat_vtab.py:task=$task,method=$METHOD,seed=$seed$EXTRA" \
      --workdir "$workdir" --config.progress_bar=False "$@"
  done
done
