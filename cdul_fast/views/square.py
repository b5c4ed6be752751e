"""Whole-image tensors for the classifier (training, export checks, ONNX predict): one preprocessing for all three.

The classifier sees the whole image resized to S x S (no crop, so objects near the border are kept, as is usual for
multi-label training). Images stay uint8 until they reach the device; small collections are decoded once into RAM.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .decode import failure_reason, load_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_square(path: str | Path, size: int) -> np.ndarray:
    """uint8 [3, S, S]: the decoded RGB image resized (bilinear, antialiased) to S x S."""
    img = load_rgb(path).resize((size, size), Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> normalized float32, channels_last (the layout convolutions run fastest in)."""
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x.float() * (1.0 / 255.0) - m) / s).contiguous(memory_format=torch.channels_last)


class _Decode(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[Path], size: int) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, str]:
        try:
            return i, torch.from_numpy(load_square(self.paths[i], self.size)), ""
        except Exception as exc:  # noqa: BLE001 - the decode policy: a reason, never an exception
            return i, torch.zeros(3, self.size, self.size, dtype=torch.uint8), failure_reason(self.paths[i], exc)


def _collate(items: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    idx = torch.tensor([i for i, _, _ in items], dtype=torch.int64)
    return idx, torch.stack([x for _, x, _ in items]), [e for _, _, e in items]


@dataclass
class ImageTensors:
    """uint8 images of a collection at one size, decoded in parallel; ``errors`` maps rows to decode failures.

    With ``cache`` the whole collection is decoded once and kept in RAM; otherwise every ``batches`` call decodes
    again (memory stays O(batch), for collections larger than RAM).
    """

    paths: Sequence[Path]
    size: int
    workers: int = 0
    cache: bool = True
    progress: bool = False
    desc: str = "decode"

    def __post_init__(self) -> None:
        self.errors: dict[int, str] = {}
        self._data: torch.Tensor | None = None
        if self.cache:
            self._data = torch.empty(len(self.paths), 3, self.size, self.size, dtype=torch.uint8)
            for idx, x in self._decode(np.arange(len(self.paths)), 64, self.progress):
                self._data[idx] = x

    def _decode(self, order: np.ndarray, batch_size: int, progress: bool = False) -> Iterator[tuple[torch.Tensor,
                                                                                                 torch.Tensor]]:
        from tqdm import tqdm

        batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
        loader = torch.utils.data.DataLoader(_Decode(self.paths, self.size), batch_sampler=batches,
                                             num_workers=self.workers, collate_fn=_collate,
                                             persistent_workers=False)
        with tqdm(total=len(order), unit="img", desc=self.desc, disable=not progress, file=sys.stderr,
                  dynamic_ncols=True, leave=False) as bar:
            for idx, x, errs in loader:
                for i, e in zip(idx.tolist(), errs):
                    if e:
                        self.errors[i] = e
                bar.update(len(errs))
                yield idx, x

    @property
    def failed_rows(self) -> np.ndarray:
        """int64 rows whose image failed to decode so far (the keys of ``errors``)."""
        return np.fromiter(self.errors, dtype=np.int64, count=len(self.errors))

    def batches(self, order: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """(rows, uint8 [B, 3, S, S]) in the given row order; images that fail to decode are left out (their rows
        and reasons are in ``errors``), so no caller ever sees a black placeholder."""
        if self._data is not None:
            order = np.asarray(order)
            if self.errors:
                order = order[~np.isin(order, self.failed_rows)]
            for i in range(0, len(order), batch_size):
                rows = np.asarray(order[i:i + batch_size])
                yield rows, self._data[torch.from_numpy(rows)]
            return
        for idx, x in self._decode(np.asarray(order), batch_size):
            ok = torch.tensor([int(i) not in self.errors for i in idx.tolist()], dtype=torch.bool)
            if bool(ok.all()):
                yield idx.numpy(), x
            elif bool(ok.any()):
                yield idx[ok].numpy(), x[ok]


def cache_fits(n: int, size: int, limit_bytes: int = 4 << 30) -> bool:
    """Whether N uint8 images of S x S fit the RAM cache budget."""
    return n * 3 * size * size <= limit_bytes
