"""`cdul-fast rescore`: new pseudo labels from the view embeddings a label store holds, without touching an image.

A store written with ``label --save-embeddings`` keeps every view's normalized image embedding. Re-scoring runs only
the text encoder (for the new classes or prompts) and the fused aggregation kernel over row blocks of the mapped
embeddings, so a new tag list, template ensemble, zeta, lambda or aggregator costs a pass over the store instead of
decoding and encoding the collection again. The output is a normal label store bound to the same images (ids digest,
file stats, done map), which ``eval``, ``train`` and ``tags`` accept, and it is resumable in the same way.

Optional CCD bias correction (Kim & Shim, CVPR 2025, "debiasing CLIP predictions"): CLIP scores some classes
systematically higher than others. The bias of class c is the mean top-1 probability of the whole-image softmax over
the confident images (entropy of the softmax at most ``debias_entropy`` nats) whose top-1 class is c; every stored
score is divided by its class's bias and clipped to [0, 1]. Classes that are never a confident top-1 keep bias 1 (no
correction). It needs statistics of the whole collection, so it is a re-scoring option (one extra pass over the
embeddings), not a labelling one.
"""

from __future__ import annotations

import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .._backend import resolve_device
from ..clip.loader import ALIASES, ClipModel, load_clip
from ..clip.prompts import Prompts, encode_classes, prompts_from_meta, read_synonyms, read_templates
from ..config import AGGREGATORS, BACKENDS, OUTPUTS, check_choice, check_number
from ..datasets.folder import parse_classes
from ..errors import ConfigError, StoreError
from ..fsutil import save_yaml_atomic, sigterm_interrupts
from ..ops import dispatch as ops
from ..store.label_store import DONE, PENDING, SKIPPED, LabelStore
from ..views.source import plan_blocks
from .scoring import EMBEDDINGS, label_arrays, score_block

DEBIAS: tuple[str, ...] = ("none", "ccd")

# The source store's settings a rescore replaces (prompts, zeta, lambda, aggregator) or that only concern decoding
# images; everything else in its metadata (images, CLIP, grid) carries over, because the embeddings are the same.
_NOT_CARRIED = ("template", "templates", "synonyms", "zeta", "lam", "aggregator", "batch_size", "decoder")


@dataclass
class RescoreConfig:
    """A re-scoring run; ``None`` means "as the source store was labelled"."""

    source: str
    out: str
    classes: str | list | None = None
    template: str | None = None
    templates: str | None = None
    synonyms: str | None = None
    zeta: float | None = None
    lam: float | None = None
    aggregator: str | None = None
    save: tuple[str, ...] | None = None
    debias: str = "none"
    debias_entropy: float = 2.0
    clip: str | None = None
    clip_weights: str | None = None
    block_rows: int = 2048
    device: str = "auto"
    backend: str = "auto"
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        check_number("--zeta", self.zeta, lo=0.0, hi=1.0, optional=True)
        check_number("--lam", self.lam, lo=0.0, hi=1.0, optional=True)
        if self.aggregator is not None:
            check_choice("--aggregator", self.aggregator, AGGREGATORS)
        bad = [s for s in self.save or () if s not in OUTPUTS]
        if bad:
            raise ConfigError(f"--save accepts {', '.join(OUTPUTS)}; unknown: {', '.join(bad)}")
        check_choice("--debias", self.debias, DEBIAS)
        check_number("--debias-entropy", self.debias_entropy, lo=0.0)
        check_number("--block-rows", self.block_rows, lo=1, hi=1 << 22, integer=True)
        check_choice("--backend", self.backend, BACKENDS)
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        if self.template is not None and "{}" not in self.template:
            raise ConfigError(f"prompt template {self.template!r} must contain '{{}}' where the class name goes")
        if Path(self.out).resolve() == Path(self.source).resolve():
            raise ConfigError("--out must be another file than the source store (rescore never changes its input)")


@dataclass
class RescoreResult:
    store: Path
    rows: int
    labelled: int
    skipped: int
    rescored_now: int
    seconds: float
    rows_per_second: float


@dataclass
class Source:
    """What a rescore reads of the source store: settings, text side and CLIP."""

    meta: dict
    classes: tuple[str, ...]
    prompts: Prompts
    zeta: float
    lam: float
    aggregator: str
    arrays: list[str]


def open_source(path: str | Path) -> LabelStore:
    """The source store, read-only, verified, with embeddings, every row labelled or skipped."""
    src = LabelStore.open(path, mode="r")
    try:
        if EMBEDDINGS not in src.tensor_names:
            raise StoreError(f"{path} holds no view embeddings: label it with --save-embeddings (once; every "
                             "rescore after that needs no image)")
        pending = int((src.done == PENDING).sum())
        if pending:
            raise StoreError(f"{path} is incomplete ({pending} of {src.rows} rows not labelled yet): finish it with "
                             "`cdul-fast label ... --resume` first")
        emb = src.tensor(EMBEDDINGS)
        grid = src.meta.get("grid")
        if emb.ndim != 3 or not isinstance(grid, int) or emb.shape[1] != 1 + grid * grid:
            raise StoreError(f"{path}: embeddings {emb.shape[1:]} do not match its grid {grid!r} (1 + G^2 views)")
    except BaseException:
        src.close()
        raise
    return src


def resolve_source(cfg: RescoreConfig, src: LabelStore) -> Source:
    """The settings of this run: the source's, with what ``cfg`` changes."""
    meta = dict(src.meta)
    classes = parse_classes(cfg.classes) if cfg.classes is not None else src.class_names
    base = prompts_from_meta(meta)
    if cfg.templates is not None:
        templates, ensemble = read_templates(cfg.templates), True
    elif cfg.template is not None:
        templates, ensemble = (cfg.template,), False
    else:
        templates, ensemble = base.templates, base.ensemble
    if cfg.synonyms is not None:
        synonyms = read_synonyms(cfg.synonyms, classes)
    else:
        synonyms = {k: v for k, v in base.synonyms.items() if k in classes}
    aggregator = cfg.aggregator or meta.get("aggregator", "cdul")
    saved = [a for a in src.array_names if a != "final"] if cfg.save is None else list(cfg.save)
    return Source(meta=meta, classes=tuple(classes), prompts=Prompts(templates, synonyms, ensemble),
                  zeta=float(meta["zeta"] if cfg.zeta is None else cfg.zeta),
                  lam=float(meta["lam"] if cfg.lam is None else cfg.lam), aggregator=aggregator,
                  arrays=label_arrays(aggregator, saved))


def load_text_encoder(meta: dict, device: torch.device, clip: str | None = None,
                      clip_weights: str | None = None) -> ClipModel:
    """The CLIP that computed the store's embeddings, text tower only; refused when it is another model."""
    name = clip or meta.get("clip")
    if not name:
        raise StoreError("the store does not record its CLIP: pass --clip and --clip-weights")
    weights = clip_weights
    if weights is None and clip is None and not (name in ALIASES or Path(name).is_dir()):
        weights = meta.get("clip_weights")  # a tag or a file; a folder (or alias) brings its own weights
    precision = meta.get("clip_precision", "fp32") if device.type == "cuda" else "fp32"
    model = load_clip(name, weights, device=device, precision=precision, seed=0, text_only=True)
    if meta.get("clip_identity") and model.identity != meta["clip_identity"]:
        raise StoreError(f"the embeddings were computed by another CLIP than {name} ({weights or 'its default'}): "
                         "identities differ; pass the --clip and --clip-weights the store was labelled with")
    return model


def _logit_scale(meta: dict, clip: ClipModel) -> float:
    """The temperature of the labelling run (recorded), which the text encoder's own must equal."""
    recorded = meta.get("logit_scale")
    return float(recorded) if isinstance(recorded, (int, float)) else clip.logit_scale


def embedding_blocks(src: LabelStore, rows: np.ndarray, block_rows: int) -> list[np.ndarray]:
    """Aligned row blocks (fixed ranges, as label's) holding at least one of ``rows``."""
    return plan_blocks(rows, src.rows, block_rows)


def block_embeddings(src: LabelStore, block: np.ndarray, device: torch.device) -> torch.Tensor:
    """float32 [n, V, K] embeddings of a contiguous block, read from the mapping (one copy, on the device)."""
    emb = src.tensor(EMBEDDINGS)[int(block[0]):int(block[-1]) + 1]
    with warnings.catch_warnings():  # a read-only mapping: the tensor is only read (and copied by .float())
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(emb).to(device).float()


def ccd_bias(src: LabelStore, text: torch.Tensor, scale: float, max_entropy: float, block_rows: int,
             device: torch.device, backend: str) -> np.ndarray:
    """Per-class CCD bias [C] (module docstring) from the whole-image softmax of every labelled row."""
    C = text.shape[0]
    sums = torch.zeros(C, dtype=torch.float64)
    counts = torch.zeros(C, dtype=torch.float64)
    labelled = np.flatnonzero(src.done == DONE)
    for block in embedding_blocks(src, labelled, block_rows):
        keep = torch.from_numpy(src.done[block[0]:block[-1] + 1] == DONE)
        emb = block_embeddings(src, block, device)
        g = ops.aggregate_scores(ops.cosine_scores(emb, text), scale, 0.0, 0.0, ("global",), backend)["global"]
        g = g.cpu()[keep]
        entropy = -(g * torch.log(g + 1e-10)).sum(1)
        top_p, top_c = g[entropy <= max_entropy].max(1)
        sums.index_add_(0, top_c, top_p.double())
        counts.index_add_(0, top_c, torch.ones_like(top_p, dtype=torch.float64))
    bias = torch.where(counts > 0, sums / counts.clamp(min=1), torch.ones_like(sums))
    return bias.float().numpy()


def _meta(cfg: RescoreConfig, s: Source, src_path: Path, bias: np.ndarray | None) -> dict:
    meta = {k: v for k, v in s.meta.items() if k not in _NOT_CARRIED and k != "embeddings"}
    meta.update(s.prompts.meta())
    meta.update({"zeta": s.zeta, "lam": s.lam, "aggregator": s.aggregator, "block_rows": cfg.block_rows,
                 "rescored_from": {"store": str(src_path.resolve()), "template": s.meta.get("template"),
                                   "templates": s.meta.get("templates"), "zeta": s.meta.get("zeta"),
                                   "lam": s.meta.get("lam"), "aggregator": s.meta.get("aggregator")}})
    if bias is not None:
        meta["debias"] = {"method": cfg.debias, "max_entropy": cfg.debias_entropy,
                          "bias": [float(b) for b in bias]}
    return meta


def _open_out(cfg: RescoreConfig, src: LabelStore, s: Source, meta: dict) -> LabelStore:
    path = Path(cfg.out)
    if cfg.resume:
        if not path.exists():
            raise StoreError(f"--resume: no store at {path} to resume; run without --resume to start one")
        out = LabelStore.open(path, mode="r+", expect_classes=s.classes)
        skip = {"rescored_from"}  # the source may have been moved; its content decides (ids, CLIP, settings)
        diff = [k for k in sorted(set(meta) | set(out.meta)) if k not in skip and out.meta.get(k) != meta.get(k)]
        if list(out.array_names) != s.arrays:
            diff.append("arrays")
        if diff or out.rows != src.rows:
            out.close()
            raise StoreError(f"cannot resume {path}: it was started with other settings ({', '.join(diff)})")
        return out
    if path.exists() and not cfg.overwrite:
        raise StoreError(f"{path} already exists: pass --resume to continue it or --overwrite to start over")
    path.parent.mkdir(parents=True, exist_ok=True)
    out = LabelStore.create(path, class_names=s.classes, rows=src.rows, arrays=s.arrays, meta=meta,
                            overwrite=cfg.overwrite, file_stats=src.file_stats)
    out.done[src.done == SKIPPED] = SKIPPED
    return out


def run_rescore(cfg: RescoreConfig, log: Callable[[str], None] = print) -> RescoreResult:
    """Re-score ``cfg.source``'s embeddings into the new store ``cfg.out``; resumable, interrupt-safe."""
    from .job import _write_runs

    cfg.validate()
    device = resolve_device(cfg.device)
    src_path = Path(cfg.source)
    with open_source(src_path) as src:
        s = resolve_source(cfg, src)
        clip = load_text_encoder(s.meta, device, cfg.clip, cfg.clip_weights)
        text = encode_classes(clip, s.classes, s.prompts)
        if text.shape[1] != src.tensor(EMBEDDINGS).shape[2]:
            raise StoreError(f"the text embeddings have {text.shape[1]} dims, the stored image embeddings "
                             f"{src.tensor(EMBEDDINGS).shape[2]}")
        scale = _logit_scale(s.meta, clip)
        bias = None
        if cfg.debias == "ccd":
            bias = ccd_bias(src, text, scale, cfg.debias_entropy, cfg.block_rows, device, cfg.backend)
        meta = _meta(cfg, s, src_path, bias)
        t0 = time.perf_counter()
        with _open_out(cfg, src, s, meta) as out:
            todo_rows = np.flatnonzero((out.done == PENDING) & (src.done == DONE))
            blocks = embedding_blocks(src, todo_rows, cfg.block_rows)
            log(f"rescoring {todo_rows.size} of {src.rows} rows of {src_path} for {len(s.classes)} classes "
                f"({s.aggregator}, zeta {s.zeta:g}, lam {s.lam:g}, {len(s.prompts.templates)} template(s)"
                f"{', CCD debiased' if bias is not None else ''}) on {device} -> {cfg.out}")
            from tqdm import tqdm

            bar = tqdm(total=int(todo_rows.size), unit="row", disable=not cfg.progress, file=sys.stderr)
            bias_t = torch.from_numpy(bias).to(device) if bias is not None else None
            done_now = 0
            try:
                with sigterm_interrupts():
                    for block in blocks:
                        keep = src.done[block[0]:block[-1] + 1] == DONE
                        with torch.inference_mode():
                            emb = block_embeddings(src, block, device)
                            values = score_block(emb, text, scale, s.zeta, s.lam, s.aggregator, s.arrays, cfg.backend)
                            if bias_t is not None:
                                values = {k: (v / bias_t).clamp_(0.0, 1.0) for k, v in values.items()}
                        _write_runs(out, block[keep], {k: v.cpu().numpy()[keep] for k, v in values.items()})
                        done_now += int(keep.sum())
                        bar.update(int(keep.sum()))
            except KeyboardInterrupt:
                log(f"interrupted: the store is consistent, {int(out.pending_rows().size)} rows left; continue with "
                    "the same command and --resume")
                raise
            finally:
                bar.close()
            seconds = time.perf_counter() - t0
            labelled, skipped = int((out.done == DONE).sum()), int((out.done == SKIPPED).sum())
    _copy_skip_log(src_path, Path(cfg.out))
    save_yaml_atomic(asdict(cfg), Path(cfg.out).with_name(Path(cfg.out).name + ".yaml"))
    return RescoreResult(store=Path(cfg.out), rows=src.rows, labelled=labelled, skipped=skipped,
                         rescored_now=done_now, seconds=seconds, rows_per_second=done_now / max(seconds, 1e-9))


def _copy_skip_log(src: Path, out: Path) -> None:
    """The reasons why rows were skipped carry over with the done map."""
    log = src.with_name(src.name + ".skipped.tsv")
    target = out.with_name(out.name + ".skipped.tsv")
    if log.is_file():
        shutil.copyfile(log, target)
    else:
        target.unlink(missing_ok=True)
