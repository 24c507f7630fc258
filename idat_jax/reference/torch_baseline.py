"""PyTorch baselines of the two training steps, written the way the reference code runs them.

timm ViTs + iDAT's gist adapters (JCruan519/iDAT) or WeCoLoRA's LoRA on the six linears
(dianagrigore/WeCoLoRA), torch AdamW, and CUDA AMP (fp16 autocast + GradScalers) when asked.
Used by ``scripts/benchmark.py`` to compare speed on the same device; needs torch and timm
(``pip install -r requirements-test.txt``), which idat-jax itself does not depend on.
"""

from __future__ import annotations

import copy
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def timm_vit(width: int, depth: int, num_heads: int, mlp_dim: int, patch_size: int,
             image_size: int, num_classes: int) -> nn.Module:
  import timm.models.vision_transformer as tv
  return tv.VisionTransformer(
      img_size=image_size, patch_size=patch_size, embed_dim=width, depth=depth,
      num_heads=num_heads, mlp_ratio=mlp_dim / width, qkv_bias=True, num_classes=num_classes,
      global_pool="token", class_token=True)


class GistSeqAdapter(nn.Module):
  """x + fc2(GELU(fc1(x))), hidden 4: iDAT's ``gist_seq_Adapter`` after each block."""

  def __init__(self, dim: int, hidden: int = 4):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

  def forward(self, x):
    return x + self.fc2(F.gelu(self.fc1(x)))


class AdaptedBlock(nn.Module):
  def __init__(self, block: nn.Module, dim: int, hidden: int):
    super().__init__()
    self.block, self.gist_adapter = block, GistSeqAdapter(dim, hidden)

  def forward(self, x):
    return self.gist_adapter(self.block(x))


def add_gist_adapters(model: nn.Module, hidden: int = 4) -> nn.Module:
  """Wraps every block with a sequential adapter; freezes all but adapters and head."""
  model.blocks = nn.Sequential(*[AdaptedBlock(b, model.embed_dim, hidden) for b in model.blocks])
  for name, p in model.named_parameters():
    p.requires_grad = "gist" in name or name.startswith("head.")
  return model


class LoRALinear(nn.Module):
  """y = W x + b + B(A x), no scaling, B zero at init (WeCoLoRA's wrapper)."""

  def __init__(self, base: nn.Linear, rank: int):
    super().__init__()
    self.base = base
    self.a = nn.Linear(base.in_features, rank, bias=False)
    self.b = nn.Linear(rank, base.out_features, bias=False)
    nn.init.zeros_(self.b.weight)

  def forward(self, x):
    return self.base(x) + self.b(self.a(x))


class LoRAQKV(nn.Module):
  """Fused qkv with separate low-rank updates added to the q, k and v output slices."""

  def __init__(self, qkv: nn.Linear, rank: int):
    super().__init__()
    self.qkv, dim = qkv, qkv.in_features
    self.a = nn.ModuleList([nn.Linear(dim, rank, bias=False) for _ in range(3)])
    self.b = nn.ModuleList([nn.Linear(rank, dim, bias=False) for _ in range(3)])
    for b in self.b:
      nn.init.zeros_(b.weight)

  def forward(self, x):
    delta = torch.cat([b(a(x)) for a, b in zip(self.a, self.b)], dim=-1)
    return self.qkv(x) + delta


def weco_student(teacher: nn.Module, reduction: int, rank: int) -> nn.Module:
  """deepcopy(teacher) with blocks [::r], everything frozen, LoRA on the six linears."""
  student = copy.deepcopy(teacher)
  student.blocks = nn.Sequential(*list(student.blocks)[::reduction])
  for p in student.parameters():
    p.requires_grad = False
  for blk in student.blocks:
    blk.attn.qkv = LoRAQKV(blk.attn.qkv, rank)
    blk.attn.proj = LoRALinear(blk.attn.proj, rank)
    blk.mlp.fc1 = LoRALinear(blk.mlp.fc1, rank)
    blk.mlp.fc2 = LoRALinear(blk.mlp.fc2, rank)
  return student


def block_features(model: nn.Module, x):
  """Last block output before the final norm (all tokens)."""
  x = model._pos_embed(model.patch_embed(x))
  return model.blocks(model.norm_pre(x))


def adamw(model: nn.Module, lr: float, weight_decay: float, betas) -> torch.optim.AdamW:
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    if p.requires_grad:
      (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
  return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)


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
  opt_s = adamw(student, 1e-3, 5e-5, (0.9, 0.999))
  opt_t = adamw(teacher, 1e-3, 5e-5, (0.9, 0.999))
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
  opt = adamw(student, 4e-3, 0.05, (0.9, 0.95))
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
