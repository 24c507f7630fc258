"""`torchvision.ops` stand-in: only `misc.FrozenBatchNorm2d`."""

from . import misc  # noqa: F401
from .misc import FrozenBatchNorm2d  # noqa: F401
