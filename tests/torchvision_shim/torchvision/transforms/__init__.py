"""`torchvision.transforms` stand-in: `ToTensor` (timm subclasses it at import time)."""

from . import functional  # noqa: F401
from .functional import InterpolationMode  # noqa: F401


class ToTensor:
  """PIL image or HWC array -> CHW float tensor; uint8 input is scaled to [0, 1]."""

  def __call__(self, pic):
    return functional.to_tensor(pic)

  def __repr__(self) -> str:
    return f"{self.__class__.__name__}()"


def __getattr__(name: str):
  # Anything beyond what timm needs at import time is absent; say why instead of a bare error.
  raise AttributeError(
      f"torchvision.transforms.{name} is not provided by idat_jax's test-only torchvision stand-in "
      "(tests/torchvision_shim); install the real torchvision for timm's data transforms.")
