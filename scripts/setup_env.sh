#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv and installs idat-jax into it.
#   bash scripts/setup_env.sh          # runtime only (the demo, training)
#   bash scripts/setup_env.sh test     # + the test extra (pytest, torch CPU, safetensors,
#                                      #   matplotlib) and timm for the parity tests
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
if [[ "${1:-}" == "test" ]]; then
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  # timm's metadata asks for torchvision, which has no wheel matching the CPU torch build;
  # the tests provide the few torchvision pieces timm imports (tests/torchvision_shim).
  "$VENV/bin/python" -m pip install -q --no-deps "timm>=1.0,<1.1"
else
  "$VENV/bin/python" -m pip install -q -e .
fi
