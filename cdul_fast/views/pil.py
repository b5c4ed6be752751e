"""The reference decoder: PIL decode + tiling (exactly open_clip's preprocessing) in DataLoader worker processes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from .decode import pil_views_or_reason
from .geometry import ViewSpec
from .source import ViewBatch, default_workers


class _PilViewDataset(torch.utils.data.Dataset):
    """Row -> (row, uint8 views or None, failure reason); decoding happens in DataLoader workers."""

    def __init__(self, paths: Sequence[Path], spec: ViewSpec) -> None:
        self.paths = paths
        self.spec = spec

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int) -> tuple[int, np.ndarray | None, str]:
        return row, *pil_views_or_reason(self.paths[row], self.spec)


def _collate(items: list[tuple[int, np.ndarray | None, str]]) -> tuple[np.ndarray, torch.Tensor, list]:
    ok = [(r, v) for r, v, _ in items if v is not None]
    failed = [(r, why) for r, v, why in items if v is None]
    rows = np.array([r for r, _ in ok], dtype=np.int64)
    views = torch.from_numpy(np.stack([v for _, v in ok])) if ok else torch.empty((0,), dtype=torch.uint8)
    return rows, views, failed


class PilViews:
    """CPU decode (PIL, exactly open_clip's preprocessing) in DataLoader worker processes, pinned when on CUDA."""

    name = "pil"

    def __init__(self, paths: Sequence[Path], spec: ViewSpec, *, device: torch.device | None = None,
                 batch_size: int = 1, workers: int | None = None, prefetch: int = 2) -> None:
        del batch_size  # blocks come from the caller; one DataLoader batch per block
        self.paths = list(paths)
        self.spec = spec
        self.num_workers = default_workers() if workers is None else workers
        self.pin_memory = device is not None and device.type == "cuda"
        self.prefetch = prefetch

    def batches(self, blocks: list[np.ndarray]) -> Iterator[ViewBatch]:
        if not blocks:
            return
        block_of = {int(b[0]): k for k, b in enumerate(blocks)}
        loader = torch.utils.data.DataLoader(
            _PilViewDataset(self.paths, self.spec),
            batch_sampler=[b.tolist() for b in blocks],
            num_workers=self.num_workers,
            collate_fn=_collate,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch if self.num_workers > 0 else None,
            persistent_workers=False,
        )
        for k, (rows, views, failed) in enumerate(loader):
            first = int(blocks[k][0])
            yield ViewBatch(block=block_of[first], rows=rows, views=views, failed=failed)
