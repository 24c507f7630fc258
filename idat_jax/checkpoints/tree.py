"""Slash-joined views of nested parameter dicts (the key format of the official `.npz` files)."""

from __future__ import annotations

from idat_jax.tree_util import flatten, unflatten  # noqa: F401  (re-exported)


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not fit the model; the message names what."""
