"""Vision Transformer with the official checkpoint parameter tree.

Module names are the pre-Linen names stored in the Google ``.npz`` files (``LayerNorm_0``,
``MultiHeadDotProductAttention_1``, ``LayerNorm_2``, ``MlpBlock_3``), set explicitly, so an
official file loads by tree lookup and our trees export back to files timm reads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from idat_jax.errors import ConfigError
from idat_jax.models.layers import DropPath, Norm, PatchEmbedding, Projection, attention
from idat_jax.models.peft import NO_PEFT, PeftConfig

Dtype = Any


def _settings(cls: type[nn.Module], module: nn.Module) -> dict[str, Any]:
  """``module``'s values of the fields declared by ``cls`` (one of its bases), as keywords."""
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(cls)
          if f.name not in ("parent", "name")}


class BlockSettings(nn.Module):
  """Hyper-parameters every encoder block shares, declared once for block, encoder and ViT."""
  num_heads: int = 12
  mlp_dim: int = 3072
  dropout: float = 0.0
  attention_dropout: float = 0.0
  peft: PeftConfig = NO_PEFT
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32


class EncoderSettings(BlockSettings):
  """The encoder's own hyper-parameters on top of the blocks' (drop_path is the last block's)."""
  depth: int = 12
  drop_path: float = 0.0
  remat: bool = False


class MlpBlock(nn.Module):
  mlp_dim: int
  dropout: float = 0.0
  peft: PeftConfig = NO_PEFT
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    d = x.shape[-1]
    bias_init = nn.initializers.normal(stddev=1e-6)
    x = Projection(features=(self.mlp_dim,), bias_init=bias_init, lora_target="fc1",
                   peft=self.peft, dtype=self.dtype, name="Dense_0")(x)
    x = nn.gelu(x, approximate=False)
    x = nn.Dropout(rate=self.dropout)(x, deterministic=deterministic)
    x = Projection(features=(d,), bias_init=bias_init, lora_target="fc2", peft=self.peft,
                   dtype=self.dtype, name="Dense_1")(x)
    return nn.Dropout(rate=self.dropout)(x, deterministic=deterministic)


class SelfAttention(nn.Module):
  num_heads: int
  attention_dropout: float = 0.0
  peft: PeftConfig = NO_PEFT
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    d = x.shape[-1]
    if d % self.num_heads:
      raise ConfigError(f"width {d} is not divisible by {self.num_heads} heads")
    heads = (self.num_heads, d // self.num_heads)

    def proj(target, name, features, in_dims=1):
      return Projection(features=features, in_dims=in_dims, lora_target=target, peft=self.peft,
                        dtype=self.dtype, name=name)

    q = proj("q", "query", heads)(x)
    k = proj("k", "key", heads)(x)
    v = proj("v", "value", heads)(x)
    rng = None
    if not deterministic and self.attention_dropout > 0:
      rng = self.make_rng("dropout")
    y = attention(q, k, v, dropout_rate=self.attention_dropout, deterministic=deterministic,
                  dropout_rng=rng, implementation=self.attention_impl)
    return proj("out", "out", (d,), in_dims=2)(y)


class Adapter(nn.Module):
  """``up(GELU(down(x)))`` with biases; weights trunc-normal(std), biases zero (as iDAT)."""
  hidden_dim: int
  init_std: float = 0.02
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # timm's trunc_normal_(std) cuts at +-2 in absolute value: effectively untruncated.
    init = nn.initializers.truncated_normal(self.init_std, lower=-2.0 / self.init_std,
                                            upper=2.0 / self.init_std)
    h = Projection(features=(self.hidden_dim,), kernel_init=init, dtype=self.dtype,
                   name="down")(x)
    h = nn.gelu(h, approximate=False)
    return Projection(features=(x.shape[-1],), kernel_init=init, dtype=self.dtype, name="up")(h)


class EncoderBlock(BlockSettings):
  """Pre-LN block with iDAT's three adapter placements (docs/methods.md, section 2)."""
  drop_path: float = 0.0
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    det = self.deterministic
    cfg = self.peft.adapter
    adapter = None
    if cfg is not None:
      adapter = Adapter(hidden_dim=cfg.hidden_dim, init_std=cfg.init_std, dtype=self.dtype,
                        name="adapter")
      scale = jnp.asarray(cfg.effective_scale, self.dtype)
    kind = cfg.kind if cfg is not None else None
    drop_path = DropPath(rate=self.drop_path)

    y = Norm(peft=self.peft, dtype=self.dtype, name="LayerNorm_0")(x)
    y = SelfAttention(num_heads=self.num_heads, attention_dropout=self.attention_dropout,
                      peft=self.peft, attention_impl=self.attention_impl, dtype=self.dtype,
                      name="MultiHeadDotProductAttention_1")(y, det)
    y = nn.Dropout(rate=self.dropout)(y, deterministic=det)
    x1 = x + drop_path(y, det)
    if kind == "gist_shared_par_adapter":
      x1 = x1 + scale * adapter(x)

    y = Norm(peft=self.peft, dtype=self.dtype, name="LayerNorm_2")(x1)
    y = MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout, peft=self.peft, dtype=self.dtype,
                 name="MlpBlock_3")(y, det)
    x2 = x1 + drop_path(y, det)
    if kind in ("gist_shared_par_adapter", "adaptformer"):
      x2 = x2 + scale * adapter(x1)
    elif kind == "gist_seq_adapter":
      x2 = x2 + scale * adapter(x2)
    return x2


class AddPositionEmbedding(nn.Module):
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1,) + x.shape[1:])
    return x + pos.astype(x.dtype)


class Encoder(EncoderSettings):

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> tuple[jax.Array, list[jax.Array]]:
    x = AddPositionEmbedding(name="posembed_input")(x)
    x = nn.Dropout(rate=self.dropout)(x, deterministic=deterministic)
    block_cls = nn.remat(EncoderBlock) if self.remat else EncoderBlock
    # Stochastic depth rises linearly with depth: block i drops with rate drop_path * i/(L-1).
    rates = np.linspace(0.0, self.drop_path, self.depth) if self.depth else []
    blocks = []
    for i in range(self.depth):
      x = block_cls(**_settings(BlockSettings, self), drop_path=float(rates[i]),
                    deterministic=deterministic, name=f"encoderblock_{i}")(x)
      blocks.append(x)
    return Norm(peft=self.peft, dtype=self.dtype, name="encoder_norm")(x), blocks


class VisionTransformer(EncoderSettings):
  """ViT classifier (``num_classes=0``: a feature extractor with no head).

  ``__call__(images, train=False)`` returns float32 logits (the pooled features when
  ``num_classes=0``); with ``features=True`` it returns
  a dict with ``blocks`` (each block's output, before the final norm), ``tokens`` (after the
  final norm), ``pooled`` (the pre-logits feature) and ``logits`` (absent without a head).
  ``peft`` (one :class:`PeftConfig`) adds adapters, LoRA or SSF; the encoder fields are
  declared in :class:`EncoderSettings`. Build it with keywords (``idat_jax.models.build_vit``).
  """
  num_classes: int = dataclasses.field(kw_only=True)
  patch_size: int = 16
  width: int = 768
  image_size: int = 224
  pool: str = "token"
  representation_size: int | None = None
  head_init_std: float = 0.0

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False, features: bool = False):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected NHWC RGB images, got shape {images.shape}")
    if images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"model built for {self.image_size}px images, got {images.shape[1:3]}; "
                       "rebuild it with image_size=... (checkpoints resize position embeddings)")
    if self.pool not in ("token", "gap"):
      raise ConfigError(f"pool must be 'token' or 'gap', got {self.pool!r}")
    x = PatchEmbedding(patch_size=self.patch_size, width=self.width, peft=self.peft,
                       dtype=self.dtype, name="embedding")(images)
    if self.pool == "token":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, self.width)), x],
                          axis=1)
    tokens, blocks = Encoder(**_settings(EncoderSettings, self), name="Transformer")(
        x, deterministic=not train)
    pooled = tokens[:, 0] if self.pool == "token" else jnp.mean(tokens, axis=1)
    if self.representation_size:
      pooled = jnp.tanh(Projection(features=(self.representation_size,), dtype=self.dtype,
                                   name="pre_logits")(pooled))
    out = dict(blocks=blocks, tokens=tokens, pooled=pooled)
    if self.num_classes:
      head_init = (nn.initializers.normal(self.head_init_std) if self.head_init_std
                   else nn.initializers.zeros)
      logits = Projection(features=(self.num_classes,), kernel_init=head_init,
                          dtype=self.dtype, name="head")(pooled)
      out["logits"] = logits.astype(jnp.float32)
    if features:
      return out
    # Without a head the model is a feature extractor (as timm's num_classes=0).
    return out["logits"] if self.num_classes else pooled.astype(jnp.float32)
