"""Methods are plug-ins of the generic trainer; importing this package registers them.

Every module of this package is imported here, so a new ``methods/<name>.py`` whose class is
decorated with ``@register`` is available as ``config.method`` without editing any other file.
"""

import importlib
import pkgutil

from idat_jax.methods.base import Method, ModelSpec, build_method, register

for _module in pkgutil.iter_modules(__path__):
  importlib.import_module(f"{__name__}.{_module.name}")  # runs each module's @register

__all__ = ["Method", "ModelSpec", "build_method", "register"]
