"""Atomic checkpoint writes (tmp + fsync + os.replace) and safe reads (weights_only / safetensors)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import WeightsError
from ..fsutil import atomic_write


def save_atomic(obj: dict, path: str | Path) -> None:
    """torch.save to a temporary file beside ``path``, fsync, then rename: a crash leaves the old file or the new."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                                             metadata=metadata))


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by ``save_atomic``; pickled code is refused (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # refused pickle, truncated zip, not a torch file
        raise WeightsError(f"cannot load checkpoint {path}: {str(exc).splitlines()[0][:300]}") from exc
    if not isinstance(obj, dict):
        raise WeightsError(f"checkpoint {path} does not hold a dict of tensors and settings")
    return obj


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from .safetensors or a weights-only torch file (a bare state dict or one under 'state_dict'/'model')."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise WeightsError(f"cannot read safetensors file {path}: {exc}") from exc
    obj = load_checkpoint(path)
    for key in ("state_dict", "model"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} is not a state dict of tensors")
    return obj
