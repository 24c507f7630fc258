#!/usr/bin/env bash
# Installs idat-jax into .venv and runs the embedded digits demo (no download, CPU is fine).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${VENV:-.venv}/bin/python" -m idat_jax.demo --workdir "${WORKDIR:-runs/demo}" "$@"
