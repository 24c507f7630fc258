"""Loading the repository's scripts and config files (not importable packages) in tests."""

import importlib.util
import os
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_file(relpath: str, name: str | None = None) -> types.ModuleType:
  """Executes ``REPO/relpath`` (e.g. ``configs/idat_vtab.py``) as a fresh module."""
  name = name or "repo_" + os.path.splitext(relpath)[0].replace(os.sep, "_").replace("/", "_")
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, relpath))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
