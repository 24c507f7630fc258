"""The PyTorch side of the comparisons: the two reference training steps, re-expressed once.

timm ViTs with iDAT's ``gist_seq`` adapters (JCruan519/iDAT) or WeCoLoRA's LoRA on the six
linear maps (dianagrigore/WeCoLoRA), torch AdamW with timm's weight-decay groups, and the
reference steps (docs/methods.md sections 3 and 6): the iDAT step with two GradScalers and two
backward passes, the WeCoLoRA step with the teacher under ``no_grad``. Used by the parity tests
(``test_idat_step_torch.py``, ``test_wecolora.py``, ``test_synthetic_and_benchmark.py``) and by
``scripts/benchmark.py`` for the speed baseline. Needs torch and timm (the ``test`` extra plus
``pip install --no-deps timm``); idat-jax itself never imports this module.
"""

from __future__ import annotations

import copy
import functools
import time
from typing import Callable

import numpy as np
import timm.models.vision_transformer as timm_vit_lib
import torch
import torch.nn.functional as F
from torch import nn


def timm_vit(*, width: int, depth: int, num_heads: int, mlp_dim: int, patch_size: int,
             image_size: int, num_classes: int) -> nn.Module:
  """timm's ViT with the settings both references use: class token, qkv bias, LayerNorm eps
  1e-6, exact GELU, no dropout or drop-path (``num_classes=0``: no head)."""
  return timm_vit_lib.VisionTransformer(
      img_size=image_size, patch_size=patch_size, in_chans=3, num_classes=num_classes,
      global_pool="token", embed_dim=width, depth=depth, num_heads=num_heads,
      mlp_ratio=mlp_dim / width, qkv_bias=True, class_token=True, fc_norm=False, drop_rate=0.0,
      pos_drop_rate=0.0, proj_drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
      norm_layer=functools.partial(nn.LayerNorm, eps=1e-6), act_layer=nn.GELU)


def load_npz(model: nn.Module, path: str) -> nn.Module:
  """Fills a timm ViT from a Google-format ``.npz`` with timm's own loader."""
  timm_vit_lib._load_weights(model, path)  # pylint: disable=protected-access
  return model


# ---------------------------------------------------------------------------------------------
# iDAT: sequential gist adapters after every block.

class GistSeqAdapter(nn.Module):
  """The reference's ``gist_seq_Adapter``: ``x + linear2(GELU(linear1(x)))``."""

  def __init__(self, dim: int, hidden: int = 4):
    super().__init__()
    self.linear1 = nn.Linear(dim, hidden)
    self.act = nn.GELU()
    self.linear2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return x + self.linear2(self.act(self.linear1(x)))


class GistSeqBlock(nn.Module):
  """A timm block followed by the sequential adapter (after the whole block)."""

  def __init__(self, block: nn.Module, dim: int, hidden: int = 4):
    super().__init__()
    self.block = block
    self.gist_adapter = GistSeqAdapter(dim, hidden)

  def forward(self, x):
    return self.gist_adapter(self.block(x))


def add_gist_adapters(model: nn.Module, hidden: int = 4) -> nn.Module:
  """Wraps every block with a sequential adapter; only adapters and head stay trainable
  (the reference's filter: ``"head."`` or ``"gist"`` in the parameter name)."""
  model.blocks = nn.Sequential(*[GistSeqBlock(b, model.embed_dim, hidden) for b in model.blocks])
  for name, p in model.named_parameters():
    p.requires_grad_(name.startswith("head.") or "gist" in name)
  return model


# ---------------------------------------------------------------------------------------------
# WeCoLoRA: weight-copied student with LoRA on q, k, v, attn.proj, mlp.fc1, mlp.fc2.

class LoraQKV(nn.Module):
  """The reference's qkv wrapper: ``qkv(x)`` plus B_q A_q x, B_k A_k x, B_v A_v x in its q, k
  and v output slices (no scale; B starts at zero)."""

  def __init__(self, qkv: nn.Linear, rank: int):
    super().__init__()
    self.qkv, self.dim = qkv, qkv.in_features
    d = self.dim
    self.a_q, self.b_q = nn.Linear(d, rank, bias=False), nn.Linear(rank, d, bias=False)
    self.a_k, self.b_k = nn.Linear(d, rank, bias=False), nn.Linear(rank, d, bias=False)
    self.a_v, self.b_v = nn.Linear(d, rank, bias=False), nn.Linear(rank, d, bias=False)
    for b in (self.b_q, self.b_k, self.b_v):
      nn.init.zeros_(b.weight)

  def forward(self, x):
    qkv = self.qkv(x)  # (B, N, 3D): q | k | v, each head-major.
    qkv[:, :, :self.dim] += self.b_q(self.a_q(x))
    qkv[:, :, self.dim:-self.dim] += self.b_k(self.a_k(x))
    qkv[:, :, -self.dim:] += self.b_v(self.a_v(x))
    return qkv


class LoraLinear(nn.Module):
  """``W x + b + B(A x)`` around a frozen ``nn.Linear`` (no scale; B starts at zero)."""

  def __init__(self, base: nn.Linear, rank: int):
    super().__init__()
    self.base = base
    self.a = nn.Linear(base.in_features, rank, bias=False)
    self.b = nn.Linear(rank, base.out_features, bias=False)
    nn.init.zeros_(self.b.weight)

  def forward(self, x):
    return self.base(x) + self.b(self.a(x))


ATTN = "MultiHeadDotProductAttention_1"
# Our LoRA scope inside a block -> (torch module path inside a wrapped block, A attr, B attr).
TORCH_LORA = {
    f"{ATTN}/query": ("attn.qkv", "a_q", "b_q"),
    f"{ATTN}/key": ("attn.qkv", "a_k", "b_k"),
    f"{ATTN}/value": ("attn.qkv", "a_v", "b_v"),
    f"{ATTN}/out": ("attn.proj", "a", "b"),
    "MlpBlock_3/Dense_0": ("mlp.fc1", "a", "b"),
    "MlpBlock_3/Dense_1": ("mlp.fc2", "a", "b"),
}


def weco_student(teacher: nn.Module, reduction: int, rank: int) -> nn.Module:
  """``deepcopy(teacher)`` with ``blocks[::r]``, LoRA on the six linear maps of each kept block;
  everything but the LoRA matrices frozen, in the student and in the teacher."""
  student = copy.deepcopy(teacher)
  student.blocks = nn.Sequential(*list(student.blocks)[::reduction])
  for p in list(teacher.parameters()) + list(student.parameters()):
    p.requires_grad_(False)
  for blk in student.blocks:
    blk.attn.qkv = LoraQKV(blk.attn.qkv, rank)
    blk.attn.proj = LoraLinear(blk.attn.proj, rank)
    blk.mlp.fc1 = LoraLinear(blk.mlp.fc1, rank)
    blk.mlp.fc2 = LoraLinear(blk.mlp.fc2, rank)
  return student


def lora_parameters(student: nn.Module) -> dict[str, nn.Parameter]:
  """Our LoRA leaf name (``Transformer/encoderblock_{i}/<scope>/lora/{a,b}``) -> the torch
  parameter holding it (a torch ``Linear.weight``: A is (r, in), B is (out, r))."""
  out = {}
  for i, blk in enumerate(student.blocks):
    for scope, (path, a, b) in TORCH_LORA.items():
      module = blk.get_submodule(path)
      prefix = f"Transformer/encoderblock_{i}/{scope}/lora/"
      out[prefix + "a"] = getattr(module, a).weight
      out[prefix + "b"] = getattr(module, b).weight
  return out


def block_features(model: nn.Module, x):
  """The last block's output before the final norm, all tokens (WeCoLoRA's distillation target)."""
  x = model._pos_embed(model.patch_embed(x))  # pylint: disable=protected-access
  x = model.patch_drop(x)
  return model.blocks(model.norm_pre(x))


# ---------------------------------------------------------------------------------------------
# Optimizer and the two reference steps.

def adamw(model: nn.Module, *, lr: float, weight_decay: float, betas=(0.9, 0.999),
          eps: float = 1e-8) -> torch.optim.AdamW:
  """torch AdamW over the trainable parameters with timm's ``param_groups_weight_decay``:
  no decay for ``ndim <= 1`` or names ending in ``.bias``."""
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    if p.requires_grad:
      (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
  return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=lr, betas=betas, eps=eps, amsgrad=False)


def autocast(device: str, amp: bool):
  """The reference's mixed precision: fp16 autocast on CUDA (bf16 where CPU autocast is asked)."""
  dtype = torch.float16 if device == "cuda" else torch.bfloat16
  return torch.autocast(device, dtype=dtype, enabled=amp)


def idat_step_fn(student: nn.Module, teacher: nn.Module, amp: bool,
                 device: str = "cuda") -> Callable:
  """One iDAT step as the reference runs it: CE(s) + CE(t) + MSE(z_s, z_t), an AdamW and a
  GradScaler per model, and two backward passes through one graph.

  With ``amp`` the order is the reference's: backward (graph retained), student step, second
  backward, teacher step. In fp32 that order fails autograd's in-place check (the student
  step changes weights the second backward reads; under autocast it reads their fp16 casts),
  so both backward passes run before the two steps: the same work.
  """
  opt_s = adamw(student, lr=1e-3, weight_decay=5e-5)
  opt_t = adamw(teacher, lr=1e-3, weight_decay=5e-5)
  scaler_s = torch.amp.GradScaler(device, enabled=amp)
  scaler_t = torch.amp.GradScaler(device, enabled=amp)
  student.train()
  teacher.train()

  def step(images, labels):
    opt_s.zero_grad(set_to_none=True)
    opt_t.zero_grad(set_to_none=True)
    with autocast(device, amp):
      z_s, z_t = student(images), teacher(images)
      loss = (F.cross_entropy(z_s, labels) + F.cross_entropy(z_t, labels)
              + F.mse_loss(z_s.float(), z_t.float()))
    if amp:
      scaler_s.scale(loss).backward(retain_graph=True)
      scaler_s.step(opt_s)
      scaler_s.update()
      scaler_t.scale(loss).backward()
      scaler_t.step(opt_t)
      scaler_t.update()
    else:
      loss.backward(retain_graph=True)
      loss.backward()
      opt_s.step()
      opt_t.step()
    return loss

  return step


def wecolora_step_fn(teacher: nn.Module, student: nn.Module, amp: bool,
                     device: str = "cuda") -> Callable:
  """One WeCoLoRA step: teacher under no_grad, L1 on last-block outputs, AdamW (0.9, 0.95).

  The reference distils in fp32; ``amp`` (fp16 autocast) makes the baseline faster, not slower.
  """
  opt = adamw(student, lr=4e-3, weight_decay=0.05, betas=(0.9, 0.95))
  scaler = torch.amp.GradScaler(device, enabled=amp)
  teacher.eval()
  student.train()

  def step(images, labels):
    opt.zero_grad(set_to_none=True)
    with autocast(device, amp):
      with torch.no_grad():
        target = block_features(teacher, images)
      loss = (block_features(student, images).float() - target.float()).abs().mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss

  return step


def time_steps(step: Callable, images, labels, *, warmup: int, steps: int,
               device: str) -> list[float]:
  """Per-step wall times (s) after warm-up, each synchronised with the device."""
  def sync():
    if device == "cuda":
      torch.cuda.synchronize()
  for _ in range(warmup):
    step(images, labels)
  sync()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    step(images, labels)
    sync()
    times.append(time.perf_counter() - t0)
  return times


def state_numpy(model: nn.Module) -> dict[str, np.ndarray]:
  """The state dict as NumPy copies (for comparing with our trees)."""
  return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
