"""Triton kernels; each has a pure-torch oracle in ``cdul_fast.ops.reference``.

The launchers are loaded lazily so that ``import cdul_fast.ops.kernels`` (and the shared input checks) work without
Triton, and so that TRITON_INTERPRET, read when a kernel is decorated, can still be set before the first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"cdul_aggregate": "aggregate", "latent_update_": "latent", "wta_pairwise_bce": "pairwise"}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
