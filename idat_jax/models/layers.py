"""Building blocks whose parameter names match the official ViT checkpoints.

Every projection is a :class:`Projection` (kernel ``in_shape + out_shape``, like Flax's
``DenseGeneral``), so query/key/value keep the checkpoint's ``(D, heads, head_dim)`` kernels
and loading a ``.npz`` is a plain tree lookup. PEFT weights are extra sub-scopes of the
module they modify (``lora/{a,b}``, ``ssf/{scale,shift}``) and never collide with
checkpoint keys. Modules that can carry them take the model's one ``peft`` option
(:class:`~idat_jax.models.peft.PeftConfig`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from idat_jax.errors import ConfigError
from idat_jax.models.peft import NO_PEFT, PeftConfig

Dtype = Any
Initializer = Callable[..., jax.Array]


def kaiming_uniform_fan_in(key, shape, dtype=jnp.float32, *, fan_in: int):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch's ``kaiming_uniform_(a=sqrt(5))`` on a Linear."""
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def normal_around(mean: float, stddev: float) -> Initializer:
  def init(key, shape, dtype=jnp.float32):
    return mean + stddev * jax.random.normal(key, shape, dtype)
  return init


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def low_rank_update(x: jax.Array, a: jax.Array, b: jax.Array, n_in: int) -> jax.Array:
  """``(x A) B`` over the trailing ``n_in`` axes of ``x``; A is ``in_shape + (r,)``, B is
  ``(r,) + out_shape``.

  The custom backward pass fixes the operand order of the weight-gradient products so that
  the large activation ``x`` is used as it lies and only the rank-r tensors are transposed:
  ``dA^T = dh^T x``. Plain autodiff gives ``dA = x^T dh``; XLA:CPU then copies a transposed
  ``x`` for every LoRA matrix (a third of the WeCoLoRA step; docs/performance.md). The values
  are the same products, so the gradients are those of autodiff.
  """
  return _low_rank_fwd(x, a, b, n_in)[0]


def _low_rank_fwd(x, a, b, n_in):
  contract_in = tuple(range(x.ndim - n_in, x.ndim))
  h = lax.dot_general(x, a, ((contract_in, tuple(range(n_in))), ((), ())))
  y = lax.dot_general(h, b, (((h.ndim - 1,), (0,)), ((), ())))
  return y, (x, a, b, h)


def _low_rank_bwd(n_in, residuals, g):
  x, a, b, h = residuals
  lead = tuple(range(x.ndim - n_in))
  dh = lax.dot_general(g, b, ((tuple(range(len(lead), g.ndim)), tuple(range(1, b.ndim))),
                              ((), ())))
  db = lax.dot_general(h, g, ((lead, lead), ((), ())))
  da = jnp.moveaxis(lax.dot_general(dh, x, ((lead, lead), ((), ()))), 0, -1)
  dx = lax.dot_general(dh, a, (((dh.ndim - 1,), (a.ndim - 1,)), ((), ())))
  return dx, da, db


low_rank_update.defvjp(_low_rank_fwd, _low_rank_bwd)


class LoraBranch(nn.Module):
  """The low-rank update ``scale * (x A) B`` of a projection; B starts at zero."""
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  rank: int
  scale: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = math.prod(self.in_shape)
    a = self.param("a", lambda k, s: kaiming_uniform_fan_in(k, s, fan_in=fan_in),
                   self.in_shape + (self.rank,))
    b = self.param("b", nn.initializers.zeros, (self.rank,) + self.out_shape)
    y = low_rank_update(x, a.astype(self.dtype), b.astype(self.dtype), len(self.in_shape))
    return y * jnp.asarray(self.scale, self.dtype)


class Ssf(nn.Module):
  """SSF's learnable per-feature scale and shift (dongzelian/SSF), applied to an output."""
  features: tuple[int, ...]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y: jax.Array) -> jax.Array:
    scale = self.param("scale", normal_around(1.0, 0.02), self.features)
    shift = self.param("shift", normal_around(0.0, 0.02), self.features)
    return y * scale.astype(y.dtype) + shift.astype(y.dtype)


class Projection(nn.Module):
  """Affine map over the trailing ``in_dims`` axes, with optional LoRA and SSF.

  ``lora_target`` names the projection for ``peft.lora.targets`` (q, k, v, out, fc1, fc2);
  ``None`` (adapters, heads) never gets LoRA. SSF follows ``peft.ssf``.
  """
  features: tuple[int, ...]
  in_dims: int = 1
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.zeros
  lora_target: str | None = None
  peft: PeftConfig = NO_PEFT
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_shape = tuple(x.shape[-self.in_dims:])
    n_in, n_out = len(in_shape), len(self.features)
    kernel_init = self.kernel_init
    if n_in + n_out > 2:
      # Fan in/out of the flattened matrix, as for the official DenseGeneral kernels.
      kernel_init = nn.initializers.xavier_uniform(
          in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out)))
    kernel = self.param("kernel", kernel_init, in_shape + self.features)
    bias = self.param("bias", self.bias_init, self.features)
    x = x.astype(self.dtype)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    y = lax.dot_general(x, kernel.astype(self.dtype), (contract, ((), ())))
    y = y + bias.astype(self.dtype)
    rank = self.peft.lora_rank(self.lora_target)
    if rank:
      y = y + LoraBranch(in_shape=in_shape, out_shape=self.features, rank=rank,
                         scale=self.peft.lora_scale, dtype=self.dtype, name="lora")(x)
    if self.peft.ssf:
      y = Ssf(features=self.features, dtype=self.dtype, name="ssf")(y)
    return y


class Norm(nn.Module):
  """LayerNorm (eps 1e-6, statistics in float32) with params ``scale``/``bias`` and optional SSF."""
  epsilon: float = 1e-6
  peft: PeftConfig = NO_PEFT
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,))
    bias = self.param("bias", nn.initializers.zeros, (d,))
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * lax.rsqrt(var + self.epsilon) * scale + bias
    y = y.astype(self.dtype)
    if self.peft.ssf:
      y = Ssf(features=(d,), dtype=self.dtype, name="ssf")(y)
    return y


class PatchEmbedding(nn.Module):
  """Non-overlapping patch projection with the official conv kernel layout (p, p, C, D)."""
  patch_size: int
  width: int
  peft: PeftConfig = NO_PEFT
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    p = self.patch_size
    _, h, w, c = images.shape
    if h % p or w % p:
      raise ConfigError(f"image size {h}x{w} is not divisible by the patch size {p}")
    kernel = self.param("kernel", nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
                        (p, p, c, self.width))
    bias = self.param("bias", nn.initializers.zeros, (self.width,))
    # (b, h, w, c) -> (b, patches, p * p * c) in row-major patch order, each patch flattened
    # as (row, column, channel) to match the (p, p, C, D) conv kernel.
    b = images.shape[0]
    patches = images.astype(self.dtype).reshape(b, h // p, p, w // p, p, c)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // p) * (w // p), p * p * c)
    y = patches @ kernel.reshape(p * p * c, self.width).astype(self.dtype)
    y = y + bias.astype(self.dtype)
    if self.peft.ssf:
      y = Ssf(features=(self.width,), dtype=self.dtype, name="ssf")(y)
    return y


class DropPath(nn.Module):
  """Per-sample stochastic depth, rescaled by 1/keep (timm's ``drop_path``)."""
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, dropout_rate: float,
              deterministic: bool, dropout_rng: jax.Array | None,
              implementation: str) -> jax.Array:
  """Scaled dot-product attention over (batch, tokens, heads, head_dim) inputs.

  Without attention dropout the fused ``jax.nn.dot_product_attention`` is used (cuDNN
  flash attention on GPU when ``implementation='cudnn'``); with it, an explicit einsum.
  """
  if dropout_rate == 0.0 or deterministic:
    impl = None if implementation in ("auto", "xla") else implementation
    if implementation == "xla":
      impl = "xla"
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  keep = 1.0 - dropout_rate
  mask = jax.random.bernoulli(dropout_rng, keep, weights.shape)
  weights = jnp.where(mask, weights / jnp.asarray(keep, weights.dtype), 0)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)

