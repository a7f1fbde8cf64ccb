"""Method registry: every module in this package registers its method with :func:`register_method`.

Modules are discovered with ``pkgutil`` so adding ``ssl_ops/methods/<name>.py`` is all it takes for the
CLI, params validation, the DVC pipeline and the registry-parametrized tests to find a new method.
"""

from __future__ import annotations

import importlib
import pkgutil

from ssl_ops.methods.base import METHODS, Method, MethodParams, register_method

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base" and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["METHODS", "Method", "MethodParams", "register_method"]
