"""A real `FrozenBatchNorm2d`: batch norm with fixed statistics and affine parameters.

timm uses it in `freeze_batch_norm_2d` / `unfreeze_batch_norm_2d` and its norm-layer registry,
so it must behave like torchvision's: four buffers (no parameters), eval-mode batch-norm output.
"""

import torch
from torch import nn


class FrozenBatchNorm2d(nn.Module):
  """y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, per channel (NCHW)."""

  def __init__(self, num_features: int, eps: float = 1e-5):
    super().__init__()
    self.num_features = num_features
    self.eps = eps
    self.register_buffer("weight", torch.ones(num_features))
    self.register_buffer("bias", torch.zeros(num_features))
    self.register_buffer("running_mean", torch.zeros(num_features))
    self.register_buffer("running_var", torch.ones(num_features))

  def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                            unexpected_keys, error_msgs):
    # BatchNorm2d state dicts carry a step counter that a frozen norm has no use for.
    state_dict.pop(prefix + "num_batches_tracked", None)
    super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    scale = self.weight * torch.rsqrt(self.running_var + self.eps)
    shift = self.bias - self.running_mean * scale
    return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

  def extra_repr(self) -> str:
    return f"{self.num_features}, eps={self.eps}"
