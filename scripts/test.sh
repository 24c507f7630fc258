#!/usr/bin/env bash
# Installs everything the tests need into .venv and runs the whole test suite (CPU).
#   bash scripts/test.sh                 # everything (CI)
#   bash scripts/test.sh -m "not slow"   # the fast tier: no end-to-end runs, no PyTorch parity
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
exec "${VENV:-.venv}/bin/python" -m pytest -q tests "$@"
