"""PyTorch ViT state dicts (timm, DeiT, MAE) -> our tree.

Name map (timm `VisionTransformer`, also MAE's and DeiT's subclasses of it):

=============================== =====================================================
``patch_embed.proj.{weight,bias}`` ``embedding/{kernel,bias}`` (OIHW -> HWIO)
``cls_token``, ``pos_embed``       ``cls``, ``Transformer/posembed_input/pos_embedding``
``blocks.i.norm1`` / ``norm2``     ``encoderblock_i/LayerNorm_0`` / ``LayerNorm_2``
``blocks.i.attn.qkv``              ``MultiHeadDotProductAttention_1/{query,key,value}``
                                   (fused rows q|k|v, each head-major -> kernel (D, H, Dh))
``blocks.i.attn.proj``             ``MultiHeadDotProductAttention_1/out`` (kernel (H, Dh, D))
``blocks.i.mlp.fc1`` / ``fc2``     ``MlpBlock_3/Dense_0`` / ``Dense_1``
``norm``                           ``Transformer/encoder_norm``
``pre_logits.fc``, ``head``        ``pre_logits``, ``head`` (Linear weights transposed)
=============================== =====================================================

Why ``num_heads`` is an argument: a fused qkv weight is (3D, D) for any head count, so the
split into (H, Dh) cannot be read off the file. By default it comes from the width of the
standard variants (192->3, 384->6, 768->12, 1024->16, 1280->16); pass it for anything else.

MAE pre-training extras (``mask_token``, ``decoder_*``) are dropped and reported. ``fc_norm``
(MAE / timm global-pool models: mean over patch tokens, *then* LayerNorm, class token still in
the sequence) has no equivalent in our ViT, whose ``gap`` pooling normalises *before* pooling
and has no class token; by default it is an error, ``fc_norm='drop'`` drops it (the encoder
blocks still load exactly, e.g. for block-feature distillation). A ``pos_embed`` without a
class slot (timm ``no_embed_class``) gets a zero class slot, which is the same function.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from idat_jax.checkpoints.npz import POSEMB
from idat_jax.errors import CheckpointError

HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
MAE_EXTRAS = (r"mask_token", r"decoder_.*")
_STATE_KEYS = ("state_dict", "model")


def read_torch_file(path: str) -> dict[str, np.ndarray]:
  """Tensors of a `.pth`/`.pt`/`.bin`, read with ``torch.load(weights_only=True)``.

  ``weights_only`` refuses to unpickle anything but tensors and plain containers, so a file
  carrying arbitrary objects (an ``argparse.Namespace`` of training args, say) is rejected
  rather than executed. A wrapper dict is unwrapped via ``state_dict`` or ``model``.
  """
  try:
    import torch
  except ImportError:
    raise CheckpointError(f"{path}: reading PyTorch files needs `torch` (CPU build is enough); "
                          "install it, or convert the file to .safetensors") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    hint = (" (it holds objects other than tensors; re-save only the state dict)"
            if "weights_only" in str(e) or "Unsupported global" in str(e) else
            " (truncated or corrupt?)")
    raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint{hint}: "
                          f"{type(e).__name__}: {msg}") from e
  state = _unwrap(obj, path)
  out = {}
  for k, v in state.items():
    if not isinstance(v, torch.Tensor):
      raise CheckpointError(f"{path}: state-dict entry {k!r} is a {type(v).__name__}, not a "
                            "tensor")
    v = v.detach().cpu()
    if v.dtype == torch.bfloat16:
      out[k] = v.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    else:
      out[k] = v.numpy().copy()
  return out


def _unwrap(obj: Any, path: str) -> Mapping[str, Any]:
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path}: expected a state dict (a mapping of names to tensors), got "
                          f"{type(obj).__name__}")
  for key in _STATE_KEYS:
    if isinstance(obj.get(key), Mapping):
      return _unwrap(obj[key], path)
  if not obj:
    raise CheckpointError(f"{path}: the state dict is empty")
  return obj


def infer_num_heads(width: int, path: str = "<state dict>") -> int:
  """Head count of the standard ViT of this width (Ti/S/B/L/H); an error for other widths."""
  if width not in HEADS_BY_WIDTH:
    raise CheckpointError(f"{path}: cannot infer the number of attention heads for width "
                          f"{width} (known widths: {HEADS_BY_WIDTH}); pass num_heads=...")
  return HEADS_BY_WIDTH[width]


def _strip_module_prefix(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], bool]:
  if state and all(k.startswith("module.") for k in state):
    return {k[len("module."):]: v for k, v in state.items()}, True
  return dict(state), False


def convert_torch_state(state: Mapping[str, np.ndarray], *, num_heads: int | None = None,
                        fc_norm: str = "error", ignore: Sequence[str] = (),
                        path: str = "<state dict>"
                        ) -> tuple[dict[str, np.ndarray], dict[str, str], list[str]]:
  """timm-style names -> our flat names. Returns (params, ignored {key: reason}, notes).

  Every key must be converted, be a known MAE extra, or full-match an ``ignore`` regex;
  anything else (distillation tokens, layer scale, registers, q/k norms, ...) is an error
  listing the keys, because silently dropping them would change the model.
  """
  if fc_norm not in ("error", "drop"):
    raise ValueError(f"fc_norm must be 'error' or 'drop', got {fc_norm!r}")
  state, stripped = _strip_module_prefix(state)
  notes = ["stripped the DDP 'module.' prefix"] if stripped else []
  ignore_res = [re.compile(p) for p in ignore]
  mae_res = [re.compile(p) for p in MAE_EXTRAS]
  ignored: dict[str, str] = {}
  out: dict[str, np.ndarray] = {}
  unknown: list[str] = []

  if "patch_embed.proj.weight" in state:
    width = state["patch_embed.proj.weight"].shape[0]
  elif "cls_token" in state:
    width = state["cls_token"].shape[-1]
  else:
    raise CheckpointError(f"{path}: not a ViT state dict (no 'patch_embed.proj.weight' or "
                          f"'cls_token'; first keys: {sorted(state)[:8]})")
  heads = num_heads if num_heads is not None else infer_num_heads(width, path)
  if heads < 1 or width % heads:
    raise CheckpointError(f"{path}: width {width} is not divisible by num_heads={heads}")
  head_dim = width // heads

  def linear(prefix: str, key: str, dest: str, out_shape: tuple[int, ...] | None = None,
             in_shape: tuple[int, ...] | None = None) -> None:
    w = state[key]
    if w.ndim != 2:
      raise CheckpointError(f"{path}: {key!r} has shape {w.shape}, expected a Linear weight")
    kernel = w.T
    if in_shape or out_shape:
      kernel = kernel.reshape((in_shape or kernel.shape[:1]) + (out_shape or kernel.shape[1:]))
    out[f"{dest}/kernel"] = np.ascontiguousarray(kernel)
    bias_key = f"{prefix}.bias"
    if bias_key in state:
      b = state[bias_key]
      out[f"{dest}/bias"] = b.reshape(out_shape) if out_shape else b
    else:
      out[f"{dest}/bias"] = np.zeros(out_shape or kernel.shape[-1:], kernel.dtype)
      notes.append(f"{prefix} has no bias; using zeros")

  done: set[str] = set()
  blocks = sorted({int(m.group(1)) for k in state
                   if (m := re.match(r"blocks\.(\d+)\.", k))})
  # Weights before biases, so a Linear's weight branch claims its bias.
  for k in sorted(state, key=lambda name: name.endswith(".bias")):
    v = state[k]
    if k in done:
      continue
    if any(r.fullmatch(k) for r in ignore_res):
      ignored[k] = "matched an ignore pattern"
    elif k == "cls_token":
      out["cls"] = v
    elif k == "pos_embed":
      out[POSEMB] = v
    elif k == "patch_embed.proj.weight":
      out["embedding/kernel"] = np.ascontiguousarray(v.transpose(2, 3, 1, 0))
    elif k == "patch_embed.proj.bias":
      out["embedding/bias"] = v
    elif k in ("norm.weight", "norm.bias"):
      out[f"Transformer/encoder_norm/{'scale' if k.endswith('weight') else 'bias'}"] = v
    elif k in ("head.weight", "pre_logits.fc.weight"):
      prefix = k[:-len(".weight")]
      linear(prefix, k, "head" if prefix == "head" else "pre_logits")
      done.add(prefix + ".bias")
    elif k in ("fc_norm.weight", "fc_norm.bias"):
      if fc_norm == "error":
        raise CheckpointError(
            f"{path}: has {k!r}: a global-pool head (mean of patch tokens, then LayerNorm, with "
            "the class token still in the sequence) that idat_jax's ViT cannot represent. Pass "
            "fc_norm='drop' to load the encoder without it.")
      ignored[k] = "fc_norm dropped (fc_norm='drop')"
    elif any(r.fullmatch(k) for r in mae_res):
      ignored[k] = "MAE pre-training extra (decoder / mask token), not part of the encoder"
    elif (m := re.fullmatch(r"blocks\.(\d+)\.(.+)", k)):
      i, rest = int(m.group(1)), m.group(2)
      blk = f"Transformer/encoderblock_{i}"
      mha = f"{blk}/MultiHeadDotProductAttention_1"
      if rest in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"):
        ln = "LayerNorm_0" if rest.startswith("norm1") else "LayerNorm_2"
        out[f"{blk}/{ln}/{'scale' if rest.endswith('weight') else 'bias'}"] = v
      elif rest == "attn.qkv.weight":
        if v.shape != (3 * width, width):
          raise CheckpointError(f"{path}: {k!r} has shape {v.shape}, expected "
                                f"{(3 * width, width)}")
        bias = state.get(f"blocks.{i}.attn.qkv.bias")
        if bias is None:
          bias = np.zeros((3 * width,), v.dtype)
          notes.append(f"blocks.{i}.attn.qkv has no bias; using zeros")
        for j, name in enumerate(("query", "key", "value")):
          w = v[j * width:(j + 1) * width]
          out[f"{mha}/{name}/kernel"] = np.ascontiguousarray(w.T.reshape(width, heads, head_dim))
          out[f"{mha}/{name}/bias"] = bias[j * width:(j + 1) * width].reshape(heads, head_dim)
        done.add(f"blocks.{i}.attn.qkv.bias")
      elif rest == "attn.proj.weight":
        linear(f"blocks.{i}.attn.proj", k, f"{mha}/out", in_shape=(heads, head_dim))
        done.add(f"blocks.{i}.attn.proj.bias")
      elif rest in ("mlp.fc1.weight", "mlp.fc2.weight"):
        dense = "Dense_0" if rest.startswith("mlp.fc1") else "Dense_1"
        linear(f"blocks.{i}.{rest[:-len('.weight')]}", k, f"{blk}/MlpBlock_3/{dense}")
        done.add(f"blocks.{i}.{rest[:-len('.weight')]}.bias")
      else:
        unknown.append(k)
    else:
      unknown.append(k)
    done.add(k)

  if unknown:
    raise CheckpointError(
        f"{path}: {len(unknown)} state-dict entries have no place in idat_jax's ViT: "
        f"{sorted(unknown)[:20]}{' ...' if len(unknown) > 20 else ''}. If they are safe to drop, "
        "pass ignore=[regex, ...].")
  if blocks and blocks != list(range(len(blocks))):
    raise CheckpointError(f"{path}: block indices {blocks} are not 0..{len(blocks) - 1}")

  pe = out.get(POSEMB)
  if pe is not None and "cls" in out:
    grid = pe.shape[1]
    if int(round(grid ** 0.5)) ** 2 == grid:
      out[POSEMB] = np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1)
      notes.append("pos_embed has no class slot (timm no_embed_class); prepended a zero slot")
  notes.append(f"split fused qkv with num_heads={heads} (head_dim {head_dim})")
  return out, ignored, notes
