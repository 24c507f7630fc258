"""Helpers shared by several test files."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from idat_jax import tree_util


def random_params(model, seed=0, image_size=None):
  """Random weights in the model's exact tree, without running ``init`` (shapes only).

  Kernels ~ N(0, 1/fan_in), LayerNorm scales near 1 and nonzero biases, class token,
  position embedding, head and LoRA factors, so no parameter is trivially zero or one.
  """
  size = image_size or model.image_size
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  rng = np.random.default_rng(seed)
  out = {}
  for name, leaf in tree_util.flatten(shapes["params"]).items():
    shape = leaf.shape
    if name.endswith("/scale"):
      v = 1.0 + rng.normal(0, 0.1, shape)
    elif name.endswith("/bias") or name == "cls" or name.endswith("pos_embedding"):
      v = rng.normal(0, 0.1, shape)
    elif name.endswith("lora/b"):
      v = rng.normal(0, 0.05, shape)
    else:
      qkv = re.search(r"/(query|key|value)/kernel$", name)
      fan_in = shape[0] if qkv else math.prod(shape[:-1])
      v = rng.normal(0, fan_in ** -0.5, shape)
    out[name] = v.astype(np.float32)
  return tree_util.unflatten(out)
