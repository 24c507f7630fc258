"""`torchvision.datasets` stand-in: the six names timm imports unconditionally.

The parity tests never build a torchvision data set; constructing one says so clearly instead
of failing somewhere deep inside timm.
"""


class _NeedsRealTorchvision:
  def __init__(self, *args, **kwargs):
    raise RuntimeError(
        f"torchvision.datasets.{type(self).__name__} is not available: this is idat_jax's "
        "test-only torchvision stand-in (tests/torchvision_shim). Install the real torchvision "
        "to use timm's data sets.")


class CIFAR10(_NeedsRealTorchvision):
  pass


class CIFAR100(_NeedsRealTorchvision):
  pass


class MNIST(_NeedsRealTorchvision):
  pass


class KMNIST(_NeedsRealTorchvision):
  pass


class FashionMNIST(_NeedsRealTorchvision):
  pass


class ImageFolder(_NeedsRealTorchvision):
  pass
