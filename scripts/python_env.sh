# Sourced by the scripts in scripts/: sets PYTHON to the interpreter that runs idat_jax,
# the first of: $PYTHON as given, the project's .venv (made by scripts/setup_env.sh), python3.
# Also sets REPO to the checkout's root, so the scripts can be started from any directory.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/${VENV:-.venv}/bin/python" ]]; then
    PYTHON="$REPO/${VENV:-.venv}/bin/python"
  else
    PYTHON=python3
  fi
fi
