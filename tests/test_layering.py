"""The package's layer order, checked by walking every import in ``idat_jax/``.

Layers, lowest first; a module may import its own part of the package and any part of a LOWER
layer, never one at its own layer or above (every import counts, also the ones inside functions):

0. ``errors``: the user-facing error types; imports nothing of the project.
1. ``tree_util``, ``fileio``, ``sharding``, ``config_lib``: foundations, independent of each
   other.
2. ``data`` (tasks, readers, pipelines) and ``checkpoints`` (weight files as plain NumPy trees,
   LoRA merging, Orbax run checkpoints read as weights): independent of each other and of any
   model.
3. ``models`` (the Flax ViT and its PEFT options) and ``training`` (the trainer's parts:
   trainable rules, optimizers, schedules, checkpointer, work-dir lock, metrics): independent
   of each other; neither knows any method.
4. ``methods``: what a method computes (models, losses, its inputs), built on models and weights.
5. ``train``: the generic trainer.
6. ``main``, ``demo``, ``launch``, ``export``: programs.

A new top-level module or subpackage must be placed in ``LAYERS`` (the test says so), so the
order stays a decision rather than an accident.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = "idat_jax"
ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE

LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    ("tree_util", "fileio", "sharding", "config_lib"),
    ("data", "checkpoints"),
    ("models", "training"),
    ("methods",),
    ("train",),
    ("main", "demo", "launch", "export"),
]
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}

# Test and tooling dependencies that the runtime package must never import (pyproject extras or
# tests/ only): the PyTorch reference lives in tests/torch_reference.py.
NOT_RUNTIME = ("einops", "matplotlib", "safetensors", "timm", "pytest")


def _modules() -> list[pathlib.Path]:
  return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(ROOT.parent).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _part(module: str) -> str | None:
  """``idat_jax.models.vit`` -> ``models``; the package itself -> None."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 and parts[0] == PACKAGE else None


def project_imports(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line, absolute module) of every ``idat_jax`` import in a file, relative ones resolved."""
  name = _module_name(path)
  package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
  out = []
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == PACKAGE]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")
        base = base[:len(base) - node.level + 1]
        module = ".".join(base + ([node.module] if node.module else []))
      else:
        module = node.module or ""
      if module.split(".")[0] != PACKAGE:
        continue
      if module == PACKAGE:  # from idat_jax import train, sharding
        out += [(node.lineno, f"{PACKAGE}.{a.name}") for a in node.names]
      else:
        out.append((node.lineno, module))
  return out


def third_party_imports(path: pathlib.Path) -> set[str]:
  tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names |= {a.name.split(".")[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
      names.add(node.module.split(".")[0])
  return names


def layer_violations() -> list[str]:
  """Every import of a module at the importer's layer or above (other parts only)."""
  problems = []
  for path in _modules():
    importer = _part(_module_name(path))
    if importer is None:
      continue
    for line, module in project_imports(path):
      target = _part(module)
      if target is None or target == importer:
        continue
      if RANK[target] >= RANK[importer]:
        problems.append(f"{path.relative_to(ROOT.parent)}:{line} ({importer}, layer "
                        f"{RANK[importer]}) imports {module} ({target}, layer {RANK[target]})")
  return problems


def test_every_part_of_the_package_has_a_layer():
  parts = {_part(_module_name(p)) for p in _modules()} - {None}
  unplaced = sorted(parts - set(RANK))
  assert not unplaced, (f"{unplaced} are not in tests/test_layering.py LAYERS: decide which "
                        "layer they belong to")


def test_no_module_imports_its_own_layer_or_above():
  problems = layer_violations()
  assert not problems, "imports against the layer order:\n  " + "\n  ".join(problems)


def test_runtime_package_never_imports_test_or_plotting_dependencies():
  found = {str(p.relative_to(ROOT.parent)): sorted(third_party_imports(p) & set(NOT_RUNTIME))
           for p in _modules()}
  assert not {k: v for k, v in found.items() if v}


def test_the_walk_sees_relative_lazy_and_package_level_imports(tmp_path, monkeypatch):
  """The checker itself: it must catch imports hidden in functions and relative forms."""
  pkg = tmp_path / PACKAGE
  (pkg / "models").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "models" / "__init__.py").write_text("")
  (pkg / "models" / "vit.py").write_text(
      "from idat_jax import tree_util\n"
      "from .. import train\n"
      "from . import layers\n"
      "def f():\n"
      "  import idat_jax.methods.base\n"
      "  from idat_jax.training.optim import adamw\n")
  monkeypatch.setattr(f"{__name__}.ROOT", pkg)
  got = [m for _, m in project_imports(pkg / "models" / "vit.py")]
  assert sorted(got) == sorted(["idat_jax.tree_util", "idat_jax.train", "idat_jax.models",
                                "idat_jax.methods.base", "idat_jax.training.optim"])
  assert len(layer_violations()) == 3  # train, methods and training are above models

