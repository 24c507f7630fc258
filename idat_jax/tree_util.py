"""Slash-joined views of nested parameter dicts: the key format of the official `.npz` files,
of the trainable rules and of the PEFT subtrees."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

SEP = "/"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{'a': {'b': x}}`` -> ``{'a/b': x}`` (insertion order kept, empty scopes dropped)."""
  if not isinstance(tree, Mapping):
    raise TypeError(f"expected a nested dict of parameters, got {type(tree).__name__}")
  out: dict[str, Any] = {}
  for key, value in tree.items():
    if not isinstance(key, str) or SEP in key or not key:
      raise ValueError(f"parameter tree key {prefix}{key!r} must be a non-empty str "
                       f"without {SEP!r}")
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, name + SEP))
    else:
      out[name] = value
  return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """``{'a/b': x}`` -> ``{'a': {'b': x}}``; a name that is both a leaf and a scope is an error."""
  out: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split(SEP)
    node = out
    for i, part in enumerate(parents):
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ValueError(f"{SEP.join(parents[:i + 1])!r} is both a parameter and a scope")
    if leaf in node:
      raise ValueError(f"duplicate parameter {name!r}")
    node[leaf] = value
  return out


def select(tree: Mapping[str, Any], pattern: str) -> dict[str, Any]:
  """The subtree of leaves whose slash-joined name full-matches ``pattern``."""
  regex = re.compile(pattern)
  return unflatten({k: v for k, v in flatten(tree).items() if regex.fullmatch(k)})
