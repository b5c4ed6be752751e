"""The contract every decoder meets (``ViewSource``), and the block plan and prefetching they share.

A run is cut into *blocks*: fixed row ranges [k*B, (k+1)*B) of the label store. Each block is one encoder batch, so
a resumed run feeds the encoder exactly the batches an uninterrupted run would — the condition for a bit-identical
store. Images that cannot be decoded leave their block with a reason instead of stopping the run.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from ..errors import ConfigError


@dataclass
class ViewBatch:
    """Views of one block: ``views`` uint8 [b, V, S, S, 3] for the decodable ``rows``; ``failed`` the others."""

    block: int
    rows: np.ndarray
    views: torch.Tensor
    failed: list[tuple[int, str]] = field(default_factory=list)


class ViewSource(Protocol):
    """A decoder: ``batches(blocks)`` yields one ViewBatch per block, in order; rows it cannot decode are in
    ``failed`` with a reason (``views.decode.failure_reason``), never raised. ``name`` is recorded in the store."""

    name: str

    def batches(self, blocks: list[np.ndarray]) -> Iterator[ViewBatch]: ...


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
