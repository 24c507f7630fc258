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
import pytest  # noqa: E402
from jax.experimental.compilation_cache import compilation_cache  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session", autouse=True)
def no_pretrained_downloads(tmp_path_factory):
  """Tests never reach the internet: a registered checkpoint (e.g. the iDAT recipe's default
  ckpt_dir/<AugReg file>) comes from an empty cache, offline. The download tests serve their
  own files and lift this per test (tests/test_pretrained_download.py)."""
  os.environ["IDAT_JAX_CACHE"] = str(tmp_path_factory.mktemp("pretrained_cache"))
  os.environ["IDAT_JAX_OFFLINE"] = "1"
  yield


@pytest.fixture(scope="session", autouse=True)
def xla_compilation_cache(tmp_path_factory):
  """A persistent XLA cache for the test session: every trainer run builds fresh jitted
  functions, and on 2 CPU cores compiling identical programs again dominates the suite."""
  path = str(tmp_path_factory.mktemp("xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  compilation_cache.set_cache_dir(path)
  compilation_cache.reset_cache()
  yield path
