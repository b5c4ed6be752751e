"""Probes for optional accelerators and the compiled extension.

Importing cdul_fast never fails because Triton, DALI, CUDA or the pybind11 extension is missing: each probe
answers True/False, and a missing extension produces exactly one warning naming the fallback in use.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from types import ModuleType


@functools.cache
def has_cuda() -> bool:
    """True when torch sees a CUDA device."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - torch is a hard dependency
        return False


def resolve_device(name: str):
    """``--device`` (auto, cpu, cuda, cuda:N) as a torch.device; asking for CUDA without one is a one-line error."""
    import torch

    from .errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if has_cuda() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from exc
    if dev.type == "cuda" and not has_cuda():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA device")
    return dev


def triton_interpret() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_importable() -> bool:
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
        return True
    except Exception:
        return False


def has_triton() -> bool:
    """True when Triton is importable and can run: a CUDA device, or the CPU interpreter."""
    return _triton_importable() and (has_cuda() or triton_interpret())


@functools.cache
def has_dali() -> bool:
    """True when NVIDIA DALI is importable (CPU pipelines work without a GPU)."""
    try:
        importlib.import_module("nvidia.dali")
        return True
    except Exception:
        return False


STORE_EXT_ABI = 1
"""The ``ABI_VERSION`` this package expects of ``cdul_fast.store._store`` (csrc/store_module.cpp defines it)."""


def _fallback_warning(why: str) -> None:
    if os.environ.get("CDUL_FAST_QUIET_FALLBACK", "0") in ("", "0"):
        warnings.warn(
            f"{why}; using the numpy.memmap fallback for label stores (same format, same zlib checksums) and the torch "
            "path for the CPU latent update (equal up to float rounding, but slower: see bench/RESULTS.md)",
            RuntimeWarning,
            stacklevel=3,
        )


@functools.cache
def store_ext() -> ModuleType | None:
    """The pybind11 label-store extension, or None (with one warning) when it was not built or is stale.

    A stale build (left from an older checkout, with another ``ABI_VERSION``) could lack functions this code calls or
    take other arguments, so it is treated as missing rather than half used.
    """
    try:
        mod = importlib.import_module("cdul_fast.store._store")
    except ImportError as exc:
        _fallback_warning(f"cdul_fast.store._store extension not available ({exc}); rebuild it with `pip install -e .`")
        return None
    found = getattr(mod, "ABI_VERSION", None)
    if found != STORE_EXT_ABI:
        _fallback_warning(f"{mod.__file__} is stale (ABI version {found}, this cdul_fast needs {STORE_EXT_ABI}); "
                          "rebuild it with `pip install -e .`")
        return None
    return mod
