"""Decode + tile images into uint8 view batches, behind one interface for every decoder.

A run is cut into *blocks*: fixed row ranges [k*B, (k+1)*B) of the label store. Each block is one encoder batch, so
a resumed run feeds the encoder exactly the batches an uninterrupted run would — the condition for a bit-identical
store. Images that cannot be decoded leave their block with a reason instead of stopping the run.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import CdulError, ConfigError
from .views import ViewSpec, load_rgb, pil_views

DECODERS = ("auto", "dali", "nvjpeg", "torchvision")


@dataclass
class ViewBatch:
    """Views of one block: ``views`` uint8 [b, V, S, S, 3] for the decodable ``rows``; ``failed`` the others."""

    block: int
    rows: np.ndarray
    views: torch.Tensor
    failed: list[tuple[int, str]] = field(default_factory=list)


def plan_blocks(pending: np.ndarray, total: int, block_size: int) -> list[np.ndarray]:
    """Whole aligned blocks that contain at least one pending row (a partly written block is redone entirely)."""
    if block_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {block_size}")
    ks = np.unique(np.asarray(pending, dtype=np.int64) // block_size)
    return [np.arange(k * block_size, min((k + 1) * block_size, total), dtype=np.int64) for k in ks]


def prefetched(produce: Callable[[], Iterator[ViewBatch]], depth: int, name: str) -> Iterator[ViewBatch]:
    """The items of the generator ``produce()``, computed in a background thread up to ``depth`` items ahead.

    An error in the thread is raised in the consumer; a consumer that stops early (Ctrl-C, an error) tells the
    thread to stop and drains the queue, so the thread never blocks forever on a full queue.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    end = object()

    def run() -> None:
        try:
            with contextlib.closing(produce()) as items:
                for item in items:
                    if stop.is_set():
                        return
                    q.put(item)
            q.put(end)
        except BaseException as exc:  # surfaced in the consumer thread
            q.put(exc)

    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.05)


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2)))


class _PilViewDataset(torch.utils.data.Dataset):
    """Row -> (row, uint8 views or None, failure reason); decoding happens in DataLoader workers."""

    def __init__(self, paths: Sequence[Path], spec: ViewSpec) -> None:
        self.paths = paths
        self.spec = spec

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int) -> tuple[int, np.ndarray | None, str]:
        try:
            return row, pil_views(load_rgb(self.paths[row]), self.spec), ""
        except CdulError as exc:
            return row, None, str(exc)
        except Exception as exc:  # a decoder bug must not kill an hours-long run; the row is reported instead
            return row, None, f"cannot process image {self.paths[row]}: {type(exc).__name__}: {exc}"


def _collate(items: list[tuple[int, np.ndarray | None, str]]) -> tuple[np.ndarray, torch.Tensor, list]:
    ok = [(r, v) for r, v, _ in items if v is not None]
    failed = [(r, why) for r, v, why in items if v is None]
    rows = np.array([r for r, _ in ok], dtype=np.int64)
    views = torch.from_numpy(np.stack([v for _, v in ok])) if ok else torch.empty((0,), dtype=torch.uint8)
    return rows, views, failed


class TorchvisionViews:
    """CPU decode (PIL, exactly open_clip's preprocessing) in DataLoader worker processes, pinned when on CUDA."""

    name = "torchvision"

    def __init__(self, paths: Sequence[Path], spec: ViewSpec, num_workers: int | None = None,
                 pin_memory: bool = False, prefetch: int = 2) -> None:
        self.paths = list(paths)
        self.spec = spec
        self.num_workers = default_workers() if num_workers is None else num_workers
        self.pin_memory = pin_memory
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


def make_view_source(decoder: str, paths: Sequence[Path], spec: ViewSpec, device: torch.device,
                     batch_size: int, num_workers: int | None = None):
    """The decoder named by ``--decoder``.

    auto = on CUDA, DALI when installed, else nvjpeg (torchvision.io decode + tiling on the GPU); on CPU, torchvision
    (PIL in DataLoader workers, the fastest CPU path). All of them cut the same regions to the same sizes.
    """
    from ._backend import has_dali

    if decoder not in DECODERS:
        raise ConfigError(f"--decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if decoder == "auto":
        if device.type == "cuda":
            decoder = "dali" if has_dali() else "nvjpeg"
        else:
            decoder = "torchvision"
    if decoder == "dali":
        if not has_dali():
            raise ConfigError("--decoder dali needs NVIDIA DALI: pip install 'cdul-fast[dali]' (nvidia-dali-cuda130)")
        from .dali_views import DaliViews

        return DaliViews(paths, spec, batch_size=batch_size, device=device, num_threads=num_workers)
    if decoder == "nvjpeg":
        from .tensor_views import NvjpegViews

        return NvjpegViews(paths, spec, device=device, num_threads=num_workers)
    return TorchvisionViews(paths, spec, num_workers=num_workers, pin_memory=device.type == "cuda")
