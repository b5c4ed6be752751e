"""The parts of one labelling run that every store of it shares: settings, the loaded encoder and prompts, store
opening and resume checks, the labelling loop over a store's pending rows, the skip log and the final counts."""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..clip.loader import DEFAULT_TEMPLATE, ClipModel, load_clip
from ..clip.prompts import Prompts, encode_classes, make_prompts
from ..config import AGGREGATORS, BACKENDS, OUTPUTS, PRECISIONS, SEED_MAX, check_choice, check_number
from ..datasets import MultiLabelSet, load_dataset
from ..dist import World, rank_device
from ..errors import ConfigError, StoreError
from ..fsutil import file_stats, save_yaml_atomic, write_text_atomic
from ..store.label_store import DONE, PENDING, SKIPPED, LabelStore
from ..views.decode import failure_reason, load_rgb
from ..views.geometry import ViewSpec, normalize_views
from ..views.registry import ALIASES as DECODER_ALIASES
from ..views.registry import make_view_source
from ..views.source import ViewSource, plan_blocks
from .scoring import EMBEDDING_DTYPES, EMBEDDINGS, label_arrays, normalize_embeddings, score_block

MAX_GRID = 16
"""More snippets than 16 x 16 = 256 per image is past any use in the paper (G = 3) and runs machines out of memory."""


@dataclass
class LabelConfig:
    """Everything that determines the content of a label store (saved in its metadata and beside it as YAML)."""

    out: str
    dataset: str = "shapes"
    root: str | None = None
    split: str | None = None
    dataset_options: dict = field(default_factory=dict)
    clip: str = "shapes-clip"
    clip_weights: str | None = None
    clip_precision: str = "auto"
    template: str = DEFAULT_TEMPLATE
    templates: str | None = None
    synonyms: str | None = None
    grid: int = 3
    zeta: float = 0.3
    lam: float = 1.0
    aggregator: str = "cdul"
    save: tuple[str, ...] = ()
    save_embeddings: bool = False
    embedding_dtype: str = "fp16"
    batch_size: int = 32
    decoder: str = "auto"
    workers: int | None = None
    device: str = "auto"
    backend: str = "auto"
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    flush_every: int = 50
    progress: bool = True

    def validate(self) -> None:
        if self.grid < 1:
            raise ConfigError(f"--grid must be >= 1 (got {self.grid}): CDUL needs at least one snippet per image")
        if not 0.0 <= self.zeta <= 1.0:
            raise ConfigError(f"--zeta must be in [0, 1] (softmax scores are), got {self.zeta}")
        if not 0.0 <= self.lam <= 1.0:
            raise ConfigError(f"--lam must be in [0, 1] (0 = average, 1 = max of global and local), got {self.lam}")
        check_choice("--aggregator", self.aggregator, AGGREGATORS)
        bad = [s for s in self.save if s not in OUTPUTS]
        if bad:
            raise ConfigError(f"--save accepts {', '.join(OUTPUTS)}; unknown: {', '.join(bad)}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        check_choice("--backend", self.backend, BACKENDS)
        check_choice("--clip-precision", self.clip_precision, PRECISIONS)
        check_choice("--embedding-dtype", self.embedding_dtype, tuple(EMBEDDING_DTYPES))
        check_number("--grid", self.grid, lo=1, hi=MAX_GRID, integer=True)
        check_number("--batch-size", self.batch_size, lo=1, hi=1 << 20, integer=True)
        check_number("--workers", self.workers, lo=0, integer=True, optional=True)
        check_number("--flush-every", self.flush_every, lo=0, integer=True)
        check_number("--seed", self.seed, lo=0, hi=SEED_MAX, integer=True)


def store_meta(cfg: LabelConfig, ds: MultiLabelSet, clip: ClipModel, decoder: str, precision: str,
               prompts: Prompts, embeddings: tuple[int, int] | None = None) -> dict:
    """What a resumed run must agree on: any difference would mix rows computed two different ways."""
    meta = {
        "kind": "cdul-pseudo-labels",
        "dataset": ds.name,
        "split": ds.split,
        "images": len(ds),
        "ids_sha256": ds.ids_digest(),
        "clip": clip.name,
        "clip_weights": clip.weights,
        "clip_identity": clip.identity,
        "clip_precision": precision,
        "logit_scale": clip.logit_scale,
        **prompts.meta(),
        "grid": cfg.grid,
        "zeta": cfg.zeta,
        "lam": cfg.lam,
        "aggregator": cfg.aggregator,
        "batch_size": cfg.batch_size,
        "decoder": decoder,
    }
    if embeddings is not None:
        views, dim = embeddings
        meta["embeddings"] = {"tensor": EMBEDDINGS, "dtype": EMBEDDING_DTYPES[cfg.embedding_dtype], "views": views,
                              "dim": dim, "normalized": True}
    return meta


# Where the weights file lies is recorded but not compared: a reinstalled package or a moved copy holds the same
# weights at another path, and clip_identity (the name plus the file's content hash, or the tag) is what decides.
_NOT_COMPARED = {"clip_weights"}


def _meta_mismatch(old: dict, new: dict) -> list[str]:
    return [f"{k}: store has {old.get(k)!r}, this run {new.get(k)!r}" for k in sorted(new)
            if k not in _NOT_COMPARED and old.get(k) != new.get(k)]


def settings_mismatch(store: LabelStore, rows: int, arrays: list[str], meta: dict, tensors: dict) -> list[str]:
    """How an existing store differs from what this run would write (empty: it may be resumed)."""
    old = dict(store.meta)
    old["decoder"] = DECODER_ALIASES.get(old.get("decoder"), old.get("decoder"))  # 09bd33f's names
    diff = _meta_mismatch(old, meta)
    if list(store.array_names) != arrays:
        diff.append(f"arrays: store has {list(store.array_names)}, this run {arrays}")
    if list(store.tensor_names) != list(tensors):
        diff.append(f"tensors: store has {list(store.tensor_names) or 'none'}, this run {list(tensors) or 'none'}")
    if store.rows != rows:
        diff.append(f"rows: store has {store.rows}, this run {rows}")
    return diff


def _open_store(path: Path, resume: bool, overwrite: bool, class_names: tuple[str, ...], rows: int,
                arrays: list[str], meta: dict, stats: np.ndarray, tensors: dict) -> LabelStore:
    """A new store, or (``resume``) the existing one after checking it was started with the same settings."""
    if resume:
        if not path.exists():
            raise StoreError(f"--resume: no store at {path} to resume; run without --resume to start one")
        store = LabelStore.open(path, mode="r+", expect_classes=class_names)
        diff = settings_mismatch(store, rows, arrays, meta, tensors)
        if diff:
            store.close()
            raise StoreError(f"cannot resume {path}: it was started with other settings ({'; '.join(diff)})")
        return store
    if path.exists() and not overwrite:
        raise StoreError(f"{path} already exists: pass --resume to continue it or --overwrite to start over")
    path.parent.mkdir(parents=True, exist_ok=True)
    return LabelStore.create(path, class_names=class_names, rows=rows, arrays=arrays, meta=meta,
                             overwrite=overwrite, file_stats=stats, tensors=tensors)


def relabel_changed(store: LabelStore, stats: np.ndarray, skips: SkipLog, log: Callable[[str], None]) -> None:
    """A resumed run relabels the rows whose image changed since it was labelled (or skipped): pending again, zero
    (as a row that was never written), with the new file stats recorded."""
    changed = store.changed_rows(stats)
    if changed is None:
        log(f"note: {store.path} is a version 1 store without file stats: images edited since they were labelled "
            "are not detected (relabel with --overwrite to be sure)")
        return
    changed = changed[store.done[changed] != PENDING]
    if changed.size == 0:
        return
    store.done[changed] = PENDING  # first: a crash from here on leaves them pending, never done with old data
    store.clear_rows(changed)
    store.set_file_stats(changed, stats[changed])
    skips.forget(changed)
    log(f"note: {changed.size} images changed since they were labelled (size or modification time): relabelling "
        "them")


def _precision(cfg: LabelConfig, device: torch.device) -> str:
    if cfg.clip_precision == "auto":  # validated in LabelConfig.validate
        return "bf16" if device.type == "cuda" else "fp32"
    return cfg.clip_precision


def _write_runs(store: LabelStore, rows: np.ndarray, values: dict[str, np.ndarray]) -> None:
    """Write rows (sorted, possibly with gaps left by skipped images) as contiguous runs."""
    if rows.size == 0:
        return
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for seg in np.split(np.arange(rows.size), breaks):
        store.write(int(rows[seg[0]]), {k: v[seg] for k, v in values.items()})


class _DeferredWriter:
    """Store writes one block behind the compute, so on CUDA they overlap the next block's encoder work.

    A block's scores are copied to pinned host buffers asynchronously (on CPU: kept as they are) and written only after
    the *next* block has been queued, so the device never waits for the store. The same deferral runs on CPU, where
    the tests exercise it.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pending: tuple[LabelStore, np.ndarray, dict[str, torch.Tensor], object] | None = None

    def submit(self, store: LabelStore, rows: np.ndarray, values: dict[str, torch.Tensor]) -> None:
        host, done = values, None  # CPU: the fresh score tensors themselves (nothing overwrites them)
        if self.cuda:
            host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)
                    for k, v in values.items()}
            done = torch.cuda.Event()
            done.record()
        previous, self.pending = self.pending, (store, rows, host, done)
        self._write(previous)

    def drain(self) -> None:
        previous, self.pending = self.pending, None
        self._write(previous)

    def _write(self, item) -> None:
        if item is None:
            return
        store, rows, host, done = item
        if done is not None:
            done.synchronize()
        _write_runs(store, rows, {k: v.numpy() for k, v in host.items()})


_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {v: k for k, v in _ESCAPES.items()}


def _escape(text: str) -> str:
    return re.sub(r"[\\\t\n\r]", lambda m: _ESCAPES[m.group()], text)


def _unescape(text: str) -> str:
    return re.sub(r"\\[\\tnr]", lambda m: _UNESCAPES[m.group()], text)


class SkipLog:
    """Why rows were skipped, in ``<store>.skipped.tsv`` (columns row, id, reason).

    *Which* rows were skipped is the store's done map, written with the same crash safety as the labels; this file
    only adds the reasons and is rewritten from the done map every time, so a killed run, ``--overwrite`` or a fixed
    image can never leave it disagreeing with the store. Fields are backslash-escaped (``\\``, ``\t``, ``\n``,
    ``\r``), so any file name fits one line. Reasons a killed run did not get to write are found again by decoding
    the file once more.
    """

    HEADER = "row\tid\treason"

    def __init__(self, store_path: Path, ds: MultiLabelSet, keep_old: bool) -> None:
        self.path = store_path.with_name(store_path.name + ".skipped.tsv")
        self.ids, self.paths = ds.ids, ds.paths
        self.reasons: dict[int, str] = self._read() if keep_old else {}

    def _read(self) -> dict[int, str]:
        """The reasons of an earlier run; lines that do not parse or name another image are ignored, never fatal."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return {}
        out: dict[int, str] = {}
        for line in text.split("\n")[1:]:
            parts = line.split("\t")
            if len(parts) != 3 or not parts[0].isdigit():
                continue
            row = int(parts[0])
            if row < len(self.ids) and _unescape(parts[1]) == self.ids[row]:
                out[row] = _unescape(parts[2])
        return out

    def add(self, row: int, why: str) -> None:
        self.reasons[int(row)] = why

    def forget(self, rows: np.ndarray) -> None:
        for r in rows.tolist():
            self.reasons.pop(r, None)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def save(self, done: np.ndarray) -> int:
        """Rewrite the log from the done map; returns the number of skipped rows."""
        rows = np.flatnonzero(np.asarray(done) == SKIPPED).tolist()
        if not rows:
            self.remove()
            return 0
        for r in rows:
            if r not in self.reasons:
                self.reasons[r] = _reason_now(self.paths[r])
        lines = [self.HEADER] + [f"{r}\t{_escape(self.ids[r])}\t{_escape(self.reasons[r])}" for r in rows]
        write_text_atomic(self.path, "\n".join(lines) + "\n")
        return len(rows)


def _reason_now(path: Path) -> str:
    """The reason for a row skipped by a run that was killed before it wrote the log."""
    try:
        load_rgb(path)
    except Exception as exc:  # noqa: BLE001 - the decode policy: a reason, never an exception
        return failure_reason(path, exc)
    return "skipped by an earlier run that was killed before recording why (the file decodes with PIL now)"


@dataclass
class LabelResult:
    """Counts over the whole store (``labelled + skipped == rows`` when complete); ``labelled_now`` by this run."""

    store: Path
    rows: int
    labelled: int
    skipped: int
    labelled_now: int
    seconds: float
    images_per_second: float
    complete: bool


@dataclass
class LabelJob:
    """What every store of one labelling run shares: the resolved settings, the loaded encoder and the class text
    embeddings, and the metadata each store records. A sharded run (label/shards.py) labels row ranges with it."""

    cfg: LabelConfig
    ds: MultiLabelSet
    clip: ClipModel
    device: torch.device
    precision: str
    spec: ViewSpec
    source: ViewSource
    arrays: list[str]
    text: torch.Tensor
    tensors: dict
    meta: dict
    stats: np.ndarray

    def open(self, path: Path, resume: bool, overwrite: bool, rows: slice, extra_meta: dict | None = None
             ) -> LabelStore:
        """The store of rows ``rows`` of the collection (all of them for a plain run, one part for a sharded one)."""
        n = rows.stop - rows.start
        return _open_store(path, resume, overwrite, self.ds.class_names, n, self.arrays,
                           {**self.meta, **(extra_meta or {})}, self.stats[rows], self.tensors)

    def fill(self, segments: list[Segment], bar) -> tuple[int, int]:
        """Label the pending rows of every segment's store; returns (labelled, skipped) by this call.

        The segments are consecutive, batch-aligned row ranges (one whole store, or a rank's parts), streamed through
        one view source, so decode keeps running ahead of the encoder across their boundaries. The last computed
        block is written and every skip log saved even when interrupted."""
        cfg, spec = self.cfg, self.spec
        blocks, owners = [], []
        for i, seg in enumerate(segments):
            for block in plan_blocks(seg.store.pending_rows(), seg.rows.stop - seg.rows.start, cfg.batch_size):
                blocks.append(block + seg.rows.start)  # rows of the collection: the source reads all its paths
                owners.append(i)
        emb_dtype = torch.float16 if cfg.embedding_dtype == "fp16" else torch.float32
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16,
                                  enabled=self.device.type == "cuda" and self.precision != "fp32")
        done_now = skipped_now = 0
        writer = _DeferredWriter(self.device)
        current = None
        try:
            for n, (batch, i) in enumerate(zip(self.source.batches(blocks), owners)):
                seg = segments[i]
                if current is not None and current is not seg:  # a part is finished: make it durable now
                    writer.drain()
                    current.store.flush()
                    current.skips.save(current.store.done)
                current = seg
                shift = seg.rows.start
                for row, why in batch.failed:
                    seg.skips.add(row - shift, why)
                if batch.failed:
                    _mark_skipped(seg.store, np.array([r - shift for r, _ in batch.failed], dtype=np.int64))
                if batch.rows.size:
                    with torch.inference_mode(), autocast:
                        x = normalize_views(batch.views.to(self.device, non_blocking=True), spec.mean, spec.std)
                        feats = self.clip.encode_image(x).float().view(batch.rows.size, spec.num_views, -1)
                    emb = normalize_embeddings(feats)
                    values = score_block(emb, self.text, self.clip.logit_scale, cfg.zeta, cfg.lam, cfg.aggregator,
                                         self.arrays, cfg.backend)
                    if cfg.save_embeddings:
                        values[EMBEDDINGS] = emb.to(emb_dtype)
                    writer.submit(seg.store, batch.rows - shift, values)
                done_now += int(batch.rows.size)
                skipped_now += len(batch.failed)
                bar.update(int(batch.rows.size) + len(batch.failed))
                if cfg.flush_every and (n + 1) % cfg.flush_every == 0:
                    writer.drain()
                    seg.store.flush()
                    seg.skips.save(seg.store.done)
            writer.drain()
        except KeyboardInterrupt:
            writer.drain()  # the last computed block is written, so --resume does not redo it
            raise
        except BaseException:
            with contextlib.suppress(Exception):  # best effort: the error that stopped the loop is the one to report
                writer.drain()
            raise
        finally:
            for seg in segments:
                seg.skips.save(seg.store.done)
        return done_now, skipped_now


@dataclass
class Segment:
    """One store of a labelling run and the rows of the collection it holds, with its skip log."""

    rows: slice
    store: LabelStore
    skips: SkipLog


def prepare_job(cfg: LabelConfig, w: World, log: Callable[[str], None], dataset: MultiLabelSet | None = None,
                clip: ClipModel | None = None) -> LabelJob:
    """Load the collection, the encoder (on this rank's device) and the class prompts; nothing is written."""
    torch.manual_seed(cfg.seed)
    device = rank_device(cfg.device, w)
    precision = _precision(cfg, device)
    ds = dataset if dataset is not None else load_dataset(cfg.dataset, cfg.root, cfg.split, **cfg.dataset_options)
    if len(ds) == 0:
        raise ConfigError(f"dataset {ds.name}/{ds.split} has no images")
    for note in ds.notes:
        log(f"note: {note}")
    if clip is None:
        clip = load_clip(cfg.clip, cfg.clip_weights, device=device,
                         precision="fp32" if device.type == "cpu" else precision, seed=cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False  # fixed algorithms: resumed and uninterrupted runs match bit for bit
        torch.backends.cudnn.deterministic = True
    spec = ViewSpec.from_preprocess_cfg(clip.preprocess_cfg, cfg.grid)
    arrays = label_arrays(cfg.aggregator, cfg.save)
    prompts = make_prompts(ds.class_names, cfg.template, cfg.templates, cfg.synonyms)
    text = encode_classes(clip, ds.class_names, prompts)  # before the store is opened: it can refuse the classes
    shape = (spec.num_views, int(text.shape[1]))
    tensors = {EMBEDDINGS: (EMBEDDING_DTYPES[cfg.embedding_dtype], shape)} if cfg.save_embeddings else {}
    # the decoder is set up before any store exists: one it refuses leaves nothing behind to block the rerun
    source = make_view_source(cfg.decoder, ds.paths, spec, device, cfg.batch_size, cfg.workers)
    meta = store_meta(cfg, ds, clip, source.name, precision, prompts, shape if cfg.save_embeddings else None)
    return LabelJob(cfg, ds, clip, device, precision, spec, source, arrays, text, tensors, meta,
                    file_stats(ds.paths))


def progress_bar(cfg: LabelConfig, total: int, show: bool = True):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", disable=not (cfg.progress and show), dynamic_ncols=True, file=sys.stderr)


def start_line(job: LabelJob, todo: int, ranks: int = 1) -> str:
    ds, cfg, spec = job.ds, job.cfg, job.spec
    on = f"{ranks} processes ({job.device.type})" if ranks > 1 else str(job.device)
    return (f"labelling {todo} of {len(ds)} images of {ds.name}/{ds.split} ({len(ds.class_names)} classes) with "
            f"{job.clip.name} on {on} [{job.meta['decoder']} decode, {spec.num_views} views of {spec.image_size}px, "
            f"{cfg.aggregator} aggregation] -> {cfg.out}")


def finish(job: LabelJob, store: LabelStore, skips: SkipLog, done_now: int, skipped_now: int, seconds: float,
           log: Callable[[str], None]) -> LabelResult:
    """Counts over the whole store, the skip log and the resolved config beside it."""
    cfg = job.cfg
    labelled = int((store.done == DONE).sum())
    skipped = skips.save(store.done)
    if skipped:
        log(f"skipped {skipped} undecodable images (listed in {skips.path})")
    _save_config(cfg, Path(cfg.out))
    return LabelResult(store=Path(cfg.out), rows=len(job.ds), labelled=labelled, skipped=skipped,
                       labelled_now=done_now, seconds=seconds,
                       images_per_second=(done_now + skipped_now) / max(seconds, 1e-9), complete=store.is_complete)


def _mark_skipped(store: LabelStore, rows: np.ndarray) -> None:
    """Skipped rows hold zeros (a block redone on resume may have held labels for them before)."""
    store.clear_rows(rows)
    store.done[rows] = SKIPPED


def _save_config(cfg: LabelConfig, store_path: Path) -> None:
    """The resolved configuration beside the store (YAML), as timm saves args beside its outputs."""
    save_yaml_atomic(asdict(cfg), store_path.with_name(store_path.name + ".yaml"))
