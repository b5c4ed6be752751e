"""cdul-fast: CLIP-driven unsupervised multi-label image classification (CDUL, ICCV 2023), built for speed."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import CdulError  # noqa: E402

__all__ = ["CdulError", "__version__"]
