"""`torchvision.transforms.functional` stand-in: `InterpolationMode` and `to_tensor`."""

import enum

import numpy as np
import torch


class InterpolationMode(enum.Enum):
  """Interpolation names; timm maps these to strings and PIL filters at import time."""
  NEAREST = "nearest"
  NEAREST_EXACT = "nearest-exact"
  BILINEAR = "bilinear"
  BICUBIC = "bicubic"
  BOX = "box"
  HAMMING = "hamming"
  LANCZOS = "lanczos"


def to_tensor(pic) -> torch.Tensor:
  """PIL image or HWC/HW numpy array -> CHW float tensor (uint8 scaled by 1/255)."""
  arr = np.array(pic, copy=True)
  if arr.ndim == 2:
    arr = arr[:, :, None]
  if arr.ndim != 3:
    raise TypeError(f"to_tensor expects an HW or HWC image, got shape {arr.shape}")
  out = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
  if arr.dtype == np.uint8:
    return out.float().div_(255.0)
  return out.float() if not torch.is_floating_point(out) else out


def __getattr__(name: str):
  # Anything beyond what timm needs at import time is absent; say why instead of a bare error.
  raise AttributeError(
      f"torchvision.transforms.functional.{name} is not provided by idat_jax's test-only torchvision stand-in "
      "(tests/torchvision_shim); install the real torchvision for timm's data transforms.")
