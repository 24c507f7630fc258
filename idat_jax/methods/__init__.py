"""Methods are plug-ins of the generic trainer; importing this package registers them."""

from idat_jax.methods import classification  # noqa: F401  (registers supervised, idat)
from idat_jax.methods import wecolora  # noqa: F401  (registers wecolora, linear_probe)
from idat_jax.methods.base import Method, ModelSpec, build_method, register

__all__ = ["Method", "ModelSpec", "build_method", "register"]
