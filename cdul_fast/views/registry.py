"""Decoders by name: the CLI's ``--decoder`` choices, ``auto``, and the aliases that keep older stores resumable.

A new decoder is a class with the ``ViewSource`` contract and the constructor
``(paths, spec, *, device, batch_size, workers=None)``, plus one ``Decoder`` entry here.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .._backend import has_dali
from ..errors import ConfigError

if TYPE_CHECKING:  # the CLI reads the choices without importing torch
    import torch

    from .geometry import ViewSpec
    from .source import ViewSource


@dataclass(frozen=True)
class Decoder:
    name: str
    module: str  # under cdul_fast.views, imported only when chosen (DALI and torchvision.io stay optional)
    cls: str
    help: str


DECODERS: dict[str, Decoder] = {d.name: d for d in (
    Decoder("pil", "pil", "PilViews", "PIL in worker processes (the reference: open_clip's own preprocessing)"),
    Decoder("tensor", "tensor", "TensorViews", "torchvision.io JPEG decode on the label device (nvJPEG on CUDA, "
            "libjpeg-turbo on CPU) + PIL-exact tiling as matrix products"),
    Decoder("dali", "dali", "DaliViews", "NVIDIA DALI (GPU mixed decode on CUDA, a CPU pipeline otherwise)"),
)}
# Names written into label stores before the decoders were named for what they are (up to 09bd33f).
ALIASES = {"torchvision": "pil", "nvjpeg": "tensor"}
CHOICES: tuple[str, ...] = ("auto", *DECODERS, *ALIASES)


def canonical_decoder(name: str) -> str:
    """The decoder's current name (aliases resolved); ``auto`` stays ``auto``."""
    name = ALIASES.get(name, name)
    if name != "auto" and name not in DECODERS:
        raise ConfigError(f"--decoder must be one of {', '.join(CHOICES)}, got {name!r}")
    return name


def resolve_decoder(name: str, device: torch.device) -> str:
    """auto = on CUDA, DALI when installed, else tensor (decode + tiling on the GPU); on CPU, pil (the fastest
    CPU path). Every decoder cuts the same regions to the same sizes."""
    name = canonical_decoder(name)
    if name == "auto":
        return ("dali" if has_dali() else "tensor") if device.type == "cuda" else "pil"
    if name == "dali" and not has_dali():
        raise ConfigError("--decoder dali needs NVIDIA DALI: pip install 'cdul-fast[dali]' (nvidia-dali-cuda130)")
    return name


def make_view_source(decoder: str, paths: Sequence[Path], spec: ViewSpec, device: torch.device, batch_size: int,
                     workers: int | None = None) -> ViewSource:
    """The decoder named by ``--decoder`` over ``paths``."""
    d = DECODERS[resolve_decoder(decoder, device)]
    cls = getattr(importlib.import_module(f"{__package__}.{d.module}"), d.cls)
    return cls(list(paths), spec, device=device, batch_size=batch_size, workers=workers)


def decoder_help() -> str:
    """--decoder's help text, from the entries above."""
    names = "; ".join(f"{d.name}: {d.help}" for d in DECODERS.values())
    old = ", ".join(f"{a} = {n}" for a, n in ALIASES.items())
    return f"image decode + tiling path. {names}; auto: dali, else tensor on CUDA, pil on CPU ({old}, older names)"
