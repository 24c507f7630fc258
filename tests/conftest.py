"""Shared test set-up: 8 fake CPU devices (set before jax is imported) and the timm shim."""

import importlib.util
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

_SHIM = os.path.join(os.path.dirname(__file__), "torchvision_shim")
if importlib.util.find_spec("torchvision") is None and os.path.isdir(_SHIM):
  # timm imports a few torchvision modules at import time; the CPU torch build used for the
  # parity tests has no matching torchvision wheel. The shim provides only what timm touches.
  sys.path.insert(0, _SHIM)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
