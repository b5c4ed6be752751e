"""`cdul-fast label`: stream a collection through a frozen CLIP and write CDUL pseudo labels to a label store.

images -> decode + tile (views.py / dali_views.py) -> CLIP image encoder on all 1 + G^2 views of a block ->
cosine with the class prompts -> fused softmax + min-max + lambda combine (ops.aggregate_scores) -> store rows.

The store's done map makes the run resumable; blocks are fixed row ranges, so a resumed run recomputes exactly the
batches an uninterrupted run computes and ends with a byte-identical file.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ..clip.loader import ClipModel
from ..datasets import MultiLabelSet
from ..dist import world as dist_world
from ..fsutil import sigterm_interrupts
from ..views.source import plan_blocks
from .job import (
    LabelConfig,
    LabelJob,
    LabelResult,
    Segment,
    SkipLog,
    finish,
    prepare_job,
    progress_bar,
    relabel_changed,
    start_line,
)
from .shards import parts_dir, run_sharded

__all__ = ["LabelConfig", "LabelResult", "run_label"]


def run_label(cfg: LabelConfig, log: Callable[[str], None] = print, dataset: MultiLabelSet | None = None,
              clip: ClipModel | None = None) -> LabelResult:
    """Label ``cfg.dataset`` into the store ``cfg.out``; resumable, interrupt-safe (Ctrl-C closes the store).

    Under torchrun (WORLD_SIZE > 1), and whenever the parts of an interrupted sharded run exist, every rank labels
    its own parts and rank 0 merges them (label/shards.py): the same file as one process writes."""
    cfg.validate()

    with dist_world() as w:
        say = w.main_log(log)
        job = prepare_job(cfg, w, say, dataset, clip)
        with sigterm_interrupts():
            if w.distributed or parts_dir(Path(cfg.out)).is_dir():
                return run_sharded(job, w, say)
            return _run_single(job, log)


def _run_single(job: LabelJob, log: Callable[[str], None]) -> LabelResult:
    cfg, ds = job.cfg, job.ds
    skips = SkipLog(Path(cfg.out), ds, keep_old=cfg.resume)  # read before the store is opened, and never fatal
    everything = slice(0, len(ds))
    # closed (sealed) on success, Ctrl-C and any error alike, so a store that was clean stays verifiable
    with job.open(Path(cfg.out), cfg.resume, cfg.overwrite, everything) as store:
        if cfg.resume:
            relabel_changed(store, job.stats, skips, log)
        else:
            skips.remove()  # a new store: reasons of the one it replaces mean nothing
        todo = int(sum(b.size for b in plan_blocks(store.pending_rows(), len(ds), cfg.batch_size)))
        log(start_line(job, todo))
        bar = progress_bar(cfg, todo)
        t0 = time.perf_counter()
        try:
            done_now, skipped_now = job.fill([Segment(everything, store, skips)], bar)
        except KeyboardInterrupt:
            bar.close()
            log(f"interrupted: the store is consistent, {int(store.pending_rows().size)} images left; continue with "
                "the same command and --resume")
            raise
        finally:
            bar.close()
        seconds = time.perf_counter() - t0
        return finish(job, store, skips, done_now, skipped_now, seconds, log)


