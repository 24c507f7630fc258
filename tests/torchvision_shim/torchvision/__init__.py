"""Test-only torchvision stand-in: just the names timm 1.0 imports (see ../README.md)."""

from . import datasets, ops, transforms  # noqa: F401

__version__ = "0.0.0+idat_jax_test_shim"
IS_IDAT_JAX_SHIM = True
