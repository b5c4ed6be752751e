"""The one decode policy every decoder follows: a file becomes RGB pixels, or a reason, never an exception.

``load_rgb`` is the reference decode (PIL: EXIF orientation applied, alpha on white, 16-bit scaled down);
``probe_header`` reads what the GPU decoders need from the header alone; ``failure_reason`` is the text a row
that cannot be labelled gets in the store's skip log, whatever went wrong (a decoder bug must not end an hours-long
run, so unexpected exceptions become reasons too).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import CdulError, ImageDecodeError
from .geometry import ViewSpec
from .resample import pil_views

_ORIENT_SWAP = {5, 6, 7, 8}  # EXIF orientations that transpose width and height


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: EXIF orientation applied, alpha composited on white, 16-bit scaled down."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.int64 if img.mode == "I" else np.uint16).astype(np.float64)
        hi = 65535.0 if img.mode != "I" or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / hi) + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def decode_error(path: str | Path, exc: BaseException) -> ImageDecodeError:
    """One readable message for any decoder failure (PIL's own messages can name in-memory buffers)."""
    why = "not a recognized image format" if isinstance(exc, UnidentifiedImageError) else str(exc)
    return ImageDecodeError(f"cannot decode image {path}: {why}")


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file to RGB; any decoder failure becomes an ImageDecodeError naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except DECODE_ERRORS as exc:
        raise decode_error(path, exc) from exc


@dataclass(frozen=True)
class Header:
    """What the header says: the stored size, the EXIF orientation (1..8), and whether it is a plain RGB/gray JPEG."""

    width: int
    height: int
    orientation: int
    plain_jpeg: bool

    @property
    def oriented_size(self) -> tuple[int, int]:
        """(width, height) after the EXIF orientation is applied."""
        return (self.height, self.width) if self.orientation in _ORIENT_SWAP else (self.width, self.height)


def probe_header(data: bytes) -> Header:
    """Size, orientation and JPEG-ness from the header only (no pixel decode); DECODE_ERRORS when unreadable."""
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        jpeg = im.format in ("JPEG", "MPO") and im.mode in ("RGB", "L")
        orientation = int(im.getexif().get(0x0112, 1)) if im.format in ("JPEG", "MPO", "TIFF", "WEBP", "PNG") else 1
    return Header(w, h, orientation if orientation in range(1, 9) else 1, jpeg)


def failure_reason(path: str | Path, exc: BaseException) -> str:
    """The reason recorded for a row that could not be turned into views."""
    if isinstance(exc, CdulError):
        return str(exc)
    if isinstance(exc, DECODE_ERRORS):
        return str(decode_error(path, exc))
    return f"cannot process image {path}: {type(exc).__name__}: {exc}"


def pil_views_or_reason(path: str | Path, spec: ViewSpec) -> tuple[np.ndarray | None, str]:
    """The reference decode + tiling of one file: (uint8 views, "") or (None, reason)."""
    try:
        return pil_views(load_rgb(path), spec), ""
    except Exception as exc:  # noqa: BLE001 - see failure_reason
        return None, failure_reason(path, exc)
