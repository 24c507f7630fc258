"""Slash-joined views of nested parameter dicts (the key format of the official `.npz` files)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not fit the model; the message names what."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{'a': {'b': x}}`` -> ``{'a/b': x}`` (insertion order kept)."""
  out: dict[str, Any] = {}
  for key, value in tree.items():
    if not isinstance(key, str) or "/" in key or not key:
      raise CheckpointError(f"parameter tree key {prefix}{key!r} must be a non-empty str "
                            "without '/'")
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, name + "/"))
    else:
      out[name] = value
  return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """``{'a/b': x}`` -> ``{'a': {'b': x}}``; a name that is both a leaf and a scope is an error."""
  out: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = out
    for i, part in enumerate(parents):
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise CheckpointError(f"{'/'.join(parents[:i + 1])!r} is both a parameter and a scope")
    if leaf in node:
      raise CheckpointError(f"duplicate parameter {name!r}")
    node[leaf] = value
  return out
