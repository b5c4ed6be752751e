"""Sharded labelling under torchrun: each rank labels whole parts (fixed row ranges) into part stores of its own,
and rank 0 merges them into the one store a single process writes, byte for byte.

Why part files and not every rank writing its rows of one store: the store's header, done map and checksums are
one writer's (an exclusive lock, a header sealed on close), done-map bytes of neighbouring rows share a page, and
``mmap`` writes from several nodes to one file on NFS or Lustre are not coherent. A part file has one writer, so it
keeps every guarantee of a store (done map, checksums, SIGKILL + ``--resume``), and a rank that dies loses nothing
another rank wrote.

The parts depend only on the row count and the batch size, never on the number of ranks: at most ``TARGET_PARTS``
ranges, each a whole number of batches, so every encoder batch holds the same images as in a single-process run and
``--resume`` works with any number of ranks (one included). Layout: ``<out>.parts/part-<start>-<stop>.cdul`` (+ its
skip log); the folder is removed once the merged store has replaced ``<out>``.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..datasets import MultiLabelSet
from ..dist import World
from ..errors import StoreError, StoreLockedError
from ..fsutil import fsync_dir
from ..store.label_store import PENDING, LabelStore, check_unlocked
from .job import (
    LabelJob,
    LabelResult,
    Segment,
    SkipLog,
    finish,
    progress_bar,
    relabel_changed,
    settings_mismatch,
    start_line,
)

TARGET_PARTS = 256
"""Enough parts that ranks finish within about one part of each other (32 GPUs: 8 parts each), few enough that
the part files and their metadata pages stay negligible next to the labels."""


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def plan_parts(rows: int, batch_size: int) -> list[slice]:
    """Row ranges of whole batches (the last one shorter), at most ``TARGET_PARTS`` of them."""
    per = max(1, math.ceil(math.ceil(rows / batch_size) / TARGET_PARTS)) * batch_size
    return [slice(lo, min(lo + per, rows)) for lo in range(0, rows, per)]


def part_path(folder: Path, part: slice) -> Path:
    return folder / f"part-{part.start:010d}-{part.stop:010d}.cdul"


def _part_meta(part: slice) -> dict:
    return {"part": [part.start, part.stop]}


def _subset(ds: MultiLabelSet, part: slice) -> MultiLabelSet:
    labels = None if ds.labels is None else ds.labels[part]
    return replace(ds, paths=ds.paths[part], ids=ds.ids[part], labels=labels, notes=())


def run_sharded(job: LabelJob, w: World, log: Callable[[str], None]) -> LabelResult:
    """This rank's parts, then (rank 0) the merge; every rank returns the merged store's counts."""
    cfg, ds = job.cfg, job.ds
    out = Path(cfg.out)
    folder = parts_dir(out)
    parts = plan_parts(len(ds), cfg.batch_size)
    state, todo = w.on_main(lambda: _setup(job, folder, parts, log))
    if state == "complete":
        return w.on_main(lambda: _result(job, 0, 0, 0.0, log))
    mine = parts[w.rows_of(len(parts))]
    log(start_line(job, todo, w.size) + f" in {len(parts)} parts of {parts[0].stop - parts[0].start} rows "
        f"({folder})")
    bar = progress_bar(cfg, sum(p.stop - p.start for p in mine), show=w.is_main)
    t0 = time.perf_counter()
    try:
        done_now, skipped_now = _label_parts(job, folder, mine, bar)
    except KeyboardInterrupt:
        bar.close()
        log(f"interrupted: every part in {folder} is consistent; continue with the same command and --resume (any "
            "number of processes)")
        raise
    finally:
        bar.close()
    counts = w.all_gather((done_now, skipped_now))
    seconds = time.perf_counter() - t0
    return w.on_main(lambda: _merge(job, folder, parts, sum(c[0] for c in counts), sum(c[1] for c in counts),
                                    seconds, log))


def _setup(job: LabelJob, folder: Path, parts: list[slice], log: Callable[[str], None]) -> tuple[str, int]:
    """Rank 0, before any rank writes: ("fresh" | "resume" | "complete", the rows left to label)."""
    cfg = job.cfg
    out = Path(cfg.out)
    _refuse_running(out, folder)
    shutil.rmtree(_tmp_dir(folder), ignore_errors=True)  # a split cut short: its parts were never used
    if not cfg.resume:
        if (out.exists() or folder.exists()) and not cfg.overwrite:
            raise StoreError(f"{out} already exists: pass --resume to continue it or --overwrite to start over")
        shutil.rmtree(folder, ignore_errors=True)  # the old store itself stays until the merge replaces it
        folder.mkdir(parents=True)
        return "fresh", len(job.ds)
    if not folder.is_dir():
        if not out.exists():
            raise StoreError(f"--resume: no store at {out} to resume; run without --resume to start one")
        if _split(job, folder, parts, log) == "complete":
            return "complete", 0
    return "resume", len(job.ds) - _check_parts(job, folder, parts, log)


def _tmp_dir(folder: Path) -> Path:
    return folder.with_name(folder.name + ".tmp")


def _refuse_running(out: Path, folder: Path) -> None:
    """A store or part another process is writing (a job still running on the same --out) is never replaced or
    removed: one line instead."""
    for path in (out, *sorted(folder.glob("part-*.cdul"))):
        check_unlocked(path)


def _split(job: LabelJob, folder: Path, parts: list[slice], log: Callable[[str], None]) -> str:
    """A store written by one process (or merged before) that still has work, cut into parts so every rank can take
    some; it stays in place, untouched by the ranks, until the merge replaces it. Built in a temporary folder and
    renamed, so a crash here leaves either no parts or all of them."""
    ds, out = job.ds, Path(job.cfg.out)
    skips = SkipLog(out, ds, keep_old=True)
    with job.open(out, True, False, slice(0, len(ds))) as store:
        relabel_changed(store, job.stats, skips, log)
        if store.pending_rows().size == 0:
            skips.save(store.done)
            return "complete"
        tmp = _tmp_dir(folder)
        tmp.mkdir(parents=True)
        stats = store.file_stats  # None for a version 1 store: its parts have none either, nor will the merge
        for part in parts:
            path = part_path(tmp, part)
            with LabelStore.create(path, class_names=ds.class_names, rows=part.stop - part.start, arrays=job.arrays,
                                   meta={**job.meta, **_part_meta(part)},
                                   file_stats=None if stats is None else stats[part], tensors=job.tensors) as p:
                p.write(0, _rows_of(store, job, part))
                p.done[:] = store.done[part]
                sub = SkipLog(path, _subset(ds, part), keep_old=False)
                for row, why in skips.reasons.items():
                    if part.start <= row < part.stop:
                        sub.add(row - part.start, why)
                sub.save(p.done)
    os.replace(tmp, folder)
    fsync_dir(folder.parent)
    log(f"note: split the unfinished {out} into {len(parts)} parts ({folder})")
    return "resume"


def _check_parts(job: LabelJob, folder: Path, parts: list[slice], log: Callable[[str], None]) -> int:
    """The parts an earlier run left, before any rank writes: one started with other settings is refused (as a
    store is), one that cannot be read (cut short, corrupted) is removed and its rows are labelled again. Returns
    the rows they hold (labelled or skipped)."""
    known = {part_path(folder, p).name for p in parts}
    stray = sorted(p.name for p in folder.glob("part-*.cdul") if p.name not in known)
    if stray:
        raise StoreError(f"cannot resume {folder}: it holds parts of another row split ({stray[0]}), from a run with "
                         "another --batch-size or image list; use those settings, or --overwrite")
    n = 0
    for part in parts:
        path = part_path(folder, part)
        if not path.exists():
            continue
        try:
            store = LabelStore.open(path, mode="r")
        except StoreLockedError:
            raise
        except StoreError as exc:
            log(f"note: {path.name} cannot be read ({exc}); its rows are labelled again")
            path.unlink()
            continue
        with store:
            diff = settings_mismatch(store, part.stop - part.start, job.arrays, {**job.meta, **_part_meta(part)},
                                     job.tensors)
            if tuple(store.class_names) != tuple(job.ds.class_names):
                diff.append("class names differ")
            if diff:
                raise StoreError(f"cannot resume {path}: it was started with other settings ({'; '.join(diff)})")
            n += int((np.asarray(store.done) != PENDING).sum())
    return n


def _rows_of(store: LabelStore, job: LabelJob, part: slice) -> dict[str, np.ndarray]:
    return {**{a: store.array(a)[part] for a in job.arrays}, **{t: store.tensor(t)[part] for t in job.tensors}}


def _label_parts(job: LabelJob, folder: Path, mine: list[slice], bar) -> tuple[int, int]:
    """This rank's parts, opened together (new or resumed) and labelled in one stream; all closed (sealed) on
    success, interrupt or error alike."""
    if not mine:
        return 0, 0
    with ExitStack() as stack:
        segments = []
        for part in mine:
            path = part_path(folder, part)
            resume = path.exists()  # unreadable parts were removed by _check_parts before any rank started
            skips = SkipLog(path, _subset(job.ds, part), keep_old=resume)
            store = stack.enter_context(job.open(path, resume, True, part, _part_meta(part)))
            if resume:
                relabel_changed(store, job.stats[part], skips, lambda _: None)
            else:
                skips.remove()
            bar.update(part.stop - part.start - int(store.pending_rows().size))
            segments.append(Segment(part, store, skips))
        return job.fill(segments, bar)


def _merge(job: LabelJob, folder: Path, parts: list[slice], done_now: int, skipped_now: int, seconds: float,
           log: Callable[[str], None]) -> LabelResult:
    """Rank 0: the parts (checksums verified) into a new store beside ``out``, sealed, then renamed over it, its
    skip log written; the parts folder goes last, so a crash anywhere leaves the old store or the new one, and the
    parts to merge again. Returns the merged store's counts."""
    ds, out = job.ds, Path(job.cfg.out)
    stores = []
    try:
        for part in parts:
            path = part_path(folder, part)
            if not path.exists():
                raise StoreError(f"part {path} is missing: rerun the same command with --resume")
            p = LabelStore.open(path, mode="r", expect_classes=ds.class_names)
            stores.append(p)
            if not p.is_complete or p.rows != part.stop - part.start:
                raise StoreError(f"part {path} is not finished: rerun the same command with --resume")
        # a version 1 store split into parts has no file stats (docs/store_format.md): neither has the merge
        stats = (None if any(p.file_stats is None for p in stores)
                 else np.concatenate([p.file_stats for p in stores]))
        tmp = out.with_name(f".{out.name}.merging")
        with LabelStore.create(tmp, class_names=ds.class_names, rows=len(ds), arrays=job.arrays, meta=job.meta,
                               overwrite=True, file_stats=stats, tensors=job.tensors) as final:
            for part, p in zip(parts, stores):
                final.write(part.start, _rows_of(p, job, slice(0, part.stop - part.start)))
                final.done[part] = p.done
        skips = SkipLog(out, ds, keep_old=False)
        for part, p in zip(parts, stores):
            for row, why in SkipLog(p.path, _subset(ds, part), keep_old=True).reasons.items():
                skips.add(part.start + row, why)
    finally:
        for p in stores:
            p.close()
    check_unlocked(out)  # a process that opened --out meanwhile keeps its file: refuse rather than replace it
    os.replace(tmp, out)
    fsync_dir(out.parent)
    log(f"merged {len(parts)} parts into {out}")
    with LabelStore.open(out, mode="r", verify=False) as final:  # sealed just above: its checksums are fresh
        result = finish(job, final, skips, done_now, skipped_now, seconds, log)  # writes the skip log
    shutil.rmtree(folder)
    return result


def _result(job: LabelJob, done_now: int, skipped_now: int, seconds: float, log: Callable[[str], None]
            ) -> LabelResult:
    out = Path(job.cfg.out)
    with LabelStore.open(out, mode="r") as store:
        return finish(job, store, SkipLog(out, job.ds, keep_old=True), done_now, skipped_now, seconds, log)
