"""Atomic checkpoint writes (tmp + fsync + os.replace) and safe reads (weights_only / safetensors)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import WeightsError


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_atomic(obj: dict, path: str | Path) -> None:
    """torch.save to a temporary file beside ``path``, fsync, then rename: a crash leaves the old file or the new."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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
