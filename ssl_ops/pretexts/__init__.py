"""Pretext registry: every module in this package registers a self-supervised pretext with
:func:`register_pretext`, exactly as ``ssl_ops.methods`` registers methods. ``ssl-ops pretrain <name>``,
params validation (one top-level section per pretext), the DVC ``pretrain`` stage and the
registry-parametrized tests find a new pretext with no other edit.
"""

from __future__ import annotations

import importlib
import pkgutil

from ssl_ops.pretexts.base import PRETEXTS, Pretext, PretextParams, register_pretext

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base" and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["PRETEXTS", "Pretext", "PretextParams", "register_pretext"]
