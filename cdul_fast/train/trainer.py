"""`cdul-fast train`: the gradient-alignment stage (paper section 3.2, supplement 6.2) and the baselines.

Each epoch trains the network on fixed pseudo labels y_u = sigmoid(latent) with the KL loss; after ``warmup`` epochs
the predictions y_p of every training image are fixed (``pred_source`` eval: one pass of the trained network in eval
mode, paper 3.2; train: the sigmoids collected during the training pass) and the whole latent matrix is updated once
with the psi-weighted step of eq. 7-8 (a fused kernel over the memory-mapped run store). The ROLE baseline instead
learns label estimates online: every batch also takes an SGD step on its rows of the latent matrix. Checkpoints are
atomic and hold everything a resumed run needs (model, optimizer, scheduler, RNG, the latent matrix, the log), so a
run killed at any point and resumed ends with the same numbers as an uninterrupted one on CPU.

Run folder: config.yaml, labels.cdul (arrays init/latent/labels/pred), checkpoint.pt, model.safetensors +
model.json (for export), log.csv, curves.png; with ``keep_epochs`` also epochs/epoch_NNN.safetensors (the weights
after each epoch, for `cdul-fast report`'s CAMs over epochs, the paper's Fig. 6).
"""

from __future__ import annotations

import csv
import functools
import gc
import itertools
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._backend import has_cuda
from ..config import (
    BACKENDS,
    CACHE_MODES,
    METHODS,
    PRED_SOURCES,
    SCHEDULERS,
    SEED_MAX,
    TARGETS,
    check_choice,
    check_number,
)
from ..datasets import DEFAULT_SPLITS, MultiLabelSet, load_dataset
from ..dist import SINGLE, World, rank_device
from ..dist import world as dist_world
from ..errors import ConfigError, StoreError, WeightsError
from ..evaluate import average_precision, mean_ap
from ..fsutil import atomic_write, file_stats, save_json_atomic, save_yaml_atomic, sigterm_interrupts
from ..ops import dispatch as ops
from ..ops.reference import labels_to_latent, psi_c2_auto
from ..store.label_store import DONE, LabelStore
from ..views.square import IMAGENET_MEAN, IMAGENET_STD, ImageTensors, cache_fits, normalize
from .checkpoint import load_checkpoint, save_atomic, save_safetensors_atomic
from .classifier import build_classifier
from .losses import bce_loss, epr_loss, kl_loss, role_estimates, role_losses, smoothed_bce_loss
from .sync_bn import sync_batchnorm

CKPT_VERSION = 1


@dataclass
class TrainConfig:
    labels: str
    out: str
    dataset: str | None = None
    root: str | None = None
    split: str | None = None
    test_split: str | None = None
    dataset_options: dict = field(default_factory=dict)
    test_dataset_options: dict = field(default_factory=dict)
    labels_array: str = "final"
    arch: str = "resnet101"
    pretrained: str | None = None
    image_size: int = 448
    epochs: int = 20
    warmup: int = 3
    batch_size: int = 16
    lr: float = 1e-5
    weight_decay: float = 1e-4
    scheduler: str = "cosine"
    method: str = "cdul"
    targets: str = "soft"
    hard_threshold: float = 0.5
    update_labels: bool = True
    psi: bool = True
    c1: float = 0.5
    sigma: float = 0.2
    c2: float | None = None
    label_lr: float = 1.0
    pred_source: str = "eval"
    init_eps: float = 1e-6
    role_lr: float = 1.0
    smoothing: float = 0.1
    epr_weight: float = 1.0
    flip: bool = True
    device: str = "auto"
    backend: str = "auto"
    workers: int | None = None
    cache_images: str = "auto"
    seed: int = 0
    sync_bn: bool = True
    keep_epochs: bool = False
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        check_choice("--method", self.method, METHODS)
        check_choice("--targets", self.targets, TARGETS)
        check_choice("--scheduler", self.scheduler, SCHEDULERS)
        check_choice("--cache-images", self.cache_images, CACHE_MODES)
        check_choice("--backend", self.backend, BACKENDS)
        check_choice("--pred-source", self.pred_source, PRED_SOURCES)
        if self.epochs < 1 or self.warmup < 0:
            raise ConfigError(f"--epochs must be >= 1 and --warmup >= 0 (got {self.epochs}, {self.warmup})")
        if self.batch_size < 1 or self.image_size < 8:
            raise ConfigError(f"--batch-size must be >= 1 and --image-size >= 8 (got {self.batch_size}, "
                              f"{self.image_size})")
        if not self.lr > 0 or not self.label_lr > 0 or not self.role_lr > 0 or not self.sigma > 0:
            raise ConfigError("--lr, --label-lr, --role-lr and --sigma must be > 0")
        if not 0.0 < self.hard_threshold < 1.0:
            raise ConfigError(f"--hard-threshold must be in (0, 1), got {self.hard_threshold}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        for flag, value in (("--lr", self.lr), ("--label-lr", self.label_lr), ("--role-lr", self.role_lr),
                            ("--sigma", self.sigma), ("--weight-decay", self.weight_decay),
                            ("--epr-weight", self.epr_weight)):
            check_number(flag, value, lo=0.0)
        check_number("--init-eps", self.init_eps)
        if not 0.0 < self.init_eps < 0.5:
            raise ConfigError(f"--init-eps must be in (0, 0.5), got {self.init_eps}")
        check_number("--c1", self.c1)
        check_number("--c2", self.c2, optional=True)
        check_number("--smoothing", self.smoothing, lo=0.0, hi=0.5)
        check_number("--workers", self.workers, lo=0, integer=True, optional=True)
        check_number("--seed", self.seed, lo=0, hi=SEED_MAX // 1_000_003 - 1, integer=True)
        check_number("--image-size", self.image_size, lo=8, hi=4096, integer=True)

    @property
    def updates_labels(self) -> bool:
        """Whether eq. 7-8 updates the latent matrix (cdul only)."""
        return self.method == "cdul" and self.update_labels

    @property
    def moves_labels(self) -> bool:
        """Whether the run store's ``labels`` change during training: cdul's latent updates or ROLE's estimates."""
        return self.updates_labels or self.method == "role"

    @property
    def psi_c2(self) -> float:
        return psi_c2_auto(self.c1, self.sigma) if self.c2 is None else float(self.c2)

    def identity(self) -> dict:
        """Settings a resumed run must share with the run it continues."""
        keep = ("labels_array", "arch", "pretrained", "image_size", "epochs", "warmup", "batch_size", "lr",
                "weight_decay", "scheduler", "method", "targets", "hard_threshold", "update_labels", "psi", "c1",
                "sigma", "c2", "label_lr", "pred_source", "init_eps", "role_lr", "smoothing", "epr_weight", "flip",
                "seed")
        return {k: getattr(self, k) for k in keep}


@dataclass
class TrainResult:
    out: Path
    history: list[dict]
    seconds: float

    @property
    def last(self) -> dict:
        return self.history[-1] if self.history else {}


# ---------------------------------------------------------------------------------------------------------------- data


def run_datasets(cfg: TrainConfig, store_meta: dict) -> tuple[MultiLabelSet, MultiLabelSet | None]:
    """The train split and the test split (None without one or without ground truth) of a run's settings."""
    name = cfg.dataset or store_meta.get("dataset")
    if not name:
        raise ConfigError("--dataset is needed: the label store does not record its dataset")
    split = cfg.split or store_meta.get("split")
    train = load_dataset(name, cfg.root, split, **cfg.dataset_options)
    test_split = cfg.test_split if cfg.test_split is not None else DEFAULT_SPLITS.get(name, (None, None))[1]
    test = None
    if test_split and test_split != "none":
        test = load_dataset(name, cfg.root, test_split, **{**cfg.dataset_options, **cfg.test_dataset_options})
        if test.labels is None:
            test = None
    return train, test


def _images(ds: MultiLabelSet, cfg: TrainConfig, workers: int, desc: str) -> ImageTensors:
    cache = cfg.cache_images == "yes" or (cfg.cache_images == "auto" and cache_fits(len(ds), cfg.image_size))
    return ImageTensors(ds.paths, cfg.image_size, workers=workers, cache=cache, progress=cfg.progress, desc=desc)


def _epoch_order(seed: int, epoch: int, rows: np.ndarray) -> tuple[np.ndarray, torch.Generator]:
    """A data order and augmentation generator that depend only on (seed, epoch): resuming needs no RNG replay."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return rows[torch.randperm(rows.size, generator=g).numpy()], g


# --------------------------------------------------------------------------------------------------------- run store


RUN_ARRAYS = ("init", "latent", "labels", "pred")


def _initial_arrays(src: LabelStore, array: str, eps: float) -> dict[str, np.ndarray]:
    """init = the source's pseudo labels, latent = logit(clamp(init, eps, 1 - eps)), labels = init, pred = 0."""
    init = np.array(src.array(array), dtype=np.float32)  # a private copy: the source store is mapped read-only
    latent = labels_to_latent(torch.from_numpy(init), eps).numpy()
    return {"init": init, "latent": latent, "labels": init.copy(), "pred": np.zeros_like(init)}


def _create_run_store(path: Path, src: LabelStore, values: dict[str, np.ndarray], meta: dict) -> LabelStore:
    st = LabelStore.create(path, class_names=src.class_names, rows=src.rows, arrays=list(RUN_ARRAYS), meta=meta,
                           overwrite=True)
    st.write(0, values)
    st.flush()
    return st


# ------------------------------------------------------------------------------------------------------------- loop


class Trainer:
    """One training run; ``run`` executes the remaining epochs (all of them, or those after a checkpoint)."""

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = print, world: World = SINGLE) -> None:
        cfg.validate()
        self.cfg, self.w = cfg, world
        self.log = world.main_log(log)
        self.out = Path(cfg.out)
        self.device = rank_device(cfg.device, world)
        if world.distributed:
            world.on_main(lambda: _check_distributed(cfg, world))  # refused once, printed by rank 0
        torch.manual_seed(cfg.seed)
        with LabelStore.open(cfg.labels, mode="r") as src:
            if not src.is_complete:
                raise StoreError(f"{cfg.labels} is incomplete: finish labelling (cdul-fast label ... --resume) first")
            if cfg.labels_array not in src.array_names:
                raise ConfigError(f"{cfg.labels} has no array {cfg.labels_array!r} (it has "
                                  f"{', '.join(src.array_names)})")
            self.src_meta = dict(src.meta)
            self.train_ds, self.test_ds = run_datasets(cfg, self.src_meta)
            if tuple(self.train_ds.class_names) != tuple(src.class_names) or len(self.train_ds) != src.rows:
                raise StoreError(f"{cfg.labels} ({src.rows} rows, {len(src.class_names)} classes) does not belong to "
                                 f"{self.train_ds.name}/{self.train_ds.split} ({len(self.train_ds)} images, "
                                 f"{self.train_ds.num_classes} classes)")
            what = f"{self.train_ds.name}/{self.train_ds.split}"
            src.check_images(self.train_ds.ids_digest(), what)
            src.check_files(file_stats(self.train_ds.paths), self.train_ds.ids, what)
            self.rows = np.flatnonzero(np.asarray(src.done) == DONE).astype(np.int64)
            if self.rows.size == 0:
                raise StoreError(f"every image of {cfg.labels} was skipped when it was labelled (the reasons are in "
                                 "its skip log): there is nothing to train on")
            # Everything that can refuse the run is checked before the run folder is touched: a refused or failed
            # --resume must leave config.yaml, labels.cdul and the checkpoint as they were.
            self.classes = self.train_ds.class_names
            self.model = build_classifier(cfg.arch, len(self.classes), cfg.pretrained).to(self.device)
            self.model = self.model.to(memory_format=torch.channels_last)
            self.net = self._wrap(self.model)  # what the training pass runs: DDP under torchrun, the model otherwise
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            self.sched = (torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=cfg.epochs)
                          if cfg.scheduler == "cosine" else None)
            self.history: list[dict] = []
            self.start_epoch = 1
            ck = self._load_checkpoint() if self._resuming() else None
            workers = cfg.workers if cfg.workers is not None else min(8, max(1, (torch.get_num_threads() or 2) - 1))
            self.train_imgs = _images(self.train_ds, cfg, workers, "decode train")
            self.test_imgs = _images(self.test_ds, cfg, workers, "decode test") if self.test_ds is not None else None
            self._noted: dict[str, set[int]] = {"train": set(), "test": set()}
            self._note_decode_failures()
            labelled = self.rows.size
            self._drop_undecodable()  # cached images are decoded by now; streamed ones fail later, in an epoch
            if self.rows.size == 0:
                raise StoreError(f"none of the {labelled} labelled images of {self.train_ds.name}/"
                                 f"{self.train_ds.split} can be decoded now: there is nothing to train on")
            if self.rows.size == 1:
                raise StoreError(f"only 1 image of {self.train_ds.name}/{self.train_ds.split} is labelled and "
                                 "decodable: training needs at least 2 (BatchNorm cannot learn from one)")
            self.w.barrier()  # every rank has checked the run folder before rank 0 writes to it
            self._prepare_out(src)
            if ck is None and self.w.is_main:  # a fresh start: per-epoch weights of an earlier run are not this run's
                shutil.rmtree(self.out / "epochs", ignore_errors=True)
        if ck is not None:
            self._restore_labels(ck)
        self.expected_pos = float((np.asarray(self.mat["init"])[self.rows] >= cfg.hard_threshold).sum(1)
                                  .mean()) if self.rows.size else 1.0

    # -- setup
    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel over the ranks (BatchNorm over the global batch with ``sync_bn``)."""
        if not self.w.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        if self.cfg.sync_bn:
            self.model = sync_batchnorm(model, self.device, self.w.group if self.device.type == "cpu" else None)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=ids)

    def _sync_failures(self) -> None:
        """Images a rank failed to decode, known to every rank: all must agree on the rows they train on."""
        if not self.w.distributed:
            return
        for imgs in (self.train_imgs, self.test_imgs):
            if imgs is not None:
                for errs in self.w.all_gather(dict(imgs.errors)):
                    imgs.errors.update(errs)

    def _same_buffers(self) -> None:
        """Rank 0's BatchNorm statistics on every rank before predicting: with per-rank BatchNorm (--no-sync-bn) DDP
        broadcasts them only before a training forward pass, so after an epoch each rank holds its own."""
        if self.w.distributed and not self.cfg.sync_bn:
            import torch.distributed as tdist

            for buf in self.model.buffers():
                tdist.broadcast(buf, src=0)

    def _flush(self) -> None:
        if self.store is not None:
            self.store.flush()

    def _note_decode_failures(self) -> None:
        """Images that fail to decode now are left out of training and metrics (never fed as black images): say so
        once per image set, with the first reason."""
        for key, imgs, ds in (("train", self.train_imgs, self.train_ds), ("test", self.test_imgs, self.test_ds)):
            if imgs is None:
                continue
            new = sorted(set(imgs.errors) - self._noted[key])
            if new:
                self._noted[key].update(new)
                self.log(f"note: {len(new)} images of {ds.name}/{ds.split} cannot be decoded now and are left out "
                         f"of training and metrics (first: {imgs.errors[new[0]]})")

    def _drop_undecodable(self) -> None:
        """Rows whose image fails to decode now get no prediction: they leave the training set and the label update."""
        if self.train_imgs.errors:
            self.rows = np.setdiff1d(self.rows, self.train_imgs.failed_rows)

    def _resuming(self) -> bool:
        """Whether there is a checkpoint to continue from (refuses a non-empty folder without --resume/--overwrite)."""
        cfg = self.cfg
        if self.out.exists() and any(self.out.iterdir()) and not (cfg.resume or cfg.overwrite):
            raise ConfigError(f"run folder {self.out} is not empty: pass --resume to continue it or --overwrite")
        if cfg.resume and not (self.out / "checkpoint.pt").is_file():
            self.log(f"note: no checkpoint in {self.out} yet; starting from epoch 1")
            cfg.resume = False
        return cfg.resume

    def _prepare_out(self, src: LabelStore) -> None:
        """Rank 0 owns the run folder and its store; the other ranks keep the same matrices in memory."""
        cfg = self.cfg
        values = _initial_arrays(src, cfg.labels_array, cfg.init_eps)
        self.store: LabelStore | None = None
        if not self.w.is_main:
            self.mat = values
            return
        self.out.mkdir(parents=True, exist_ok=True)
        save_yaml_atomic(asdict(cfg), self.out / "config.yaml")
        meta = {"kind": "cdul-train", "source": str(Path(cfg.labels).resolve()), "array": cfg.labels_array}
        self.store = _create_run_store(self.out / "labels.cdul", src, values, meta)
        self.mat = {a: self.store.array(a) for a in RUN_ARRAYS}

    def _load_checkpoint(self) -> dict:
        """Read and check the checkpoint and load model, optimizer, scheduler and RNG from it (nothing on disk is
        written here); the pseudo labels are restored by ``_restore_labels`` once the run store exists."""
        ck = load_checkpoint(self.out / "checkpoint.pt")
        if ck.get("version") != CKPT_VERSION:
            raise ConfigError(f"{self.out / 'checkpoint.pt'} has version {ck.get('version')}, expected {CKPT_VERSION}")
        try:
            saved = json.loads(ck["identity"])
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError(f"{self.out / 'checkpoint.pt'} records no readable run settings") from exc
        diff = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in self.cfg.identity().items() if saved.get(k) != v]
        if diff:
            raise ConfigError(f"cannot resume {self.out}: settings differ from the checkpoint ({'; '.join(diff)})")
        shape = (len(self.train_ds), len(self.classes))
        try:
            ck["history"] = json.loads(ck["history"])
            if tuple(ck["latent"].shape) != shape or tuple(ck["labels"].shape) != shape:
                raise ValueError(f"its pseudo-label matrices are {tuple(ck['latent'].shape)}, this run's {shape}")
            self.model.load_state_dict(ck["model"])
            self.opt.load_state_dict(ck["optimizer"])
            if self.sched is not None:
                self.sched.load_state_dict(ck["scheduler"])
            torch.set_rng_state(ck["rng_cpu"])
        except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as exc:
            raise WeightsError(f"cannot resume from {self.out / 'checkpoint.pt'}: "
                               f"{str(exc).strip().splitlines()[0][:200]}") from exc
        if self.device.type == "cuda" and "rng_cuda" in ck:
            torch.cuda.set_rng_state(ck["rng_cuda"], self.device)
        return ck

    def _restore_labels(self, ck: dict) -> None:
        self.mat["latent"][:] = ck["latent"].numpy()
        self.mat["labels"][:] = ck["labels"].numpy()  # exact bits: recomputing sigmoid could differ by an ulp
        self._flush()
        self.history = ck["history"]
        self.start_epoch = int(ck["epoch"]) + 1
        self.log(f"resumed {self.out} after epoch {ck['epoch']}")

    # -- one epoch
    def _targets(self, rows: np.ndarray) -> torch.Tensor:
        cfg = self.cfg
        src = "labels" if cfg.updates_labels else "init"
        y = torch.from_numpy(np.asarray(self.mat[src])[rows]).to(self.device)
        if cfg.method != "cdul" or cfg.targets == "hard":
            y = (y >= cfg.hard_threshold).float()
        return y

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        m = self.cfg.method
        if m == "cdul":
            return kl_loss(logits, y)
        if m == "an":
            return bce_loss(logits, y)
        if m == "ls":
            return smoothed_bce_loss(logits, y, self.cfg.smoothing)
        return epr_loss(logits, y, self.expected_pos, self.cfg.epr_weight)

    def _train_epoch(self, epoch: int) -> tuple[float, np.ndarray]:
        """One pass over the training rows; returns the mean loss (over every rank) and the rows this rank trained."""
        from tqdm import tqdm

        cfg, w = self.cfg, self.w
        self.net.train()
        # dropout etc. depend on (seed, epoch, rank) only, as data order does
        torch.manual_seed(cfg.seed * 1_000_003 + epoch + w.rank * 1_000_000_007)
        order, gen = _epoch_order(cfg.seed, epoch, self.rows)
        pred = self.mat["pred"] if cfg.pred_source == "train" else None
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        total, n, trained = 0.0, 0, []
        steps = self._ddp_steps(order, gen) if w.distributed else self._steps(order, gen)
        bar = tqdm(total=order.size // w.size, unit="img", desc=f"epoch {epoch}/{cfg.epochs}", file=sys.stderr,
                   disable=not (cfg.progress and w.is_main), dynamic_ncols=True, leave=False)
        for rows, x, flips, share in steps:
            x = normalize(x.to(self.device, non_blocking=True), IMAGENET_MEAN, IMAGENET_STD)
            if flips is not None:
                x = torch.where(flips.to(self.device).view(-1, 1, 1, 1), x.flip(3), x)
            with autocast:
                logits = self.net(x)
            if rows.size == 0:  # a rank without images in the last batch still joins the gradient all-reduce
                loss = logits.float().sum() * 0.0
            elif cfg.method == "role":
                loss = self._role_step(rows, logits.float())
            else:
                loss = self._loss(logits.float(), self._targets(rows))
            self.opt.zero_grad(set_to_none=True)
            (loss * share).backward()
            self.opt.step()
            if pred is not None and rows.size:
                pred[rows] = torch.sigmoid(logits.detach().float()).cpu().numpy()
            total += float(loss.detach()) * len(rows)
            n += len(rows)
            trained.append(rows)
            bar.update(len(rows))
        bar.close()
        if w.distributed:
            sums = w.all_gather((total, n))
            total, n = sum(t for t, _ in sums), sum(k for _, k in sums)
        if n == 0:
            raise StoreError(f"none of the {order.size} labelled images of {self.train_ds.name}/{self.train_ds.split} "
                             f"could be decoded in epoch {epoch}: there is nothing to train on")
        if self.sched is not None:
            self.sched.step()
        mine = np.concatenate(trained) if trained else order[:0]
        if cfg.method == "role":
            self._share_rows(mine, ("latent", "labels"))
        return total / n, mine

    def _steps(self, order: np.ndarray, gen: torch.Generator):
        """(rows, images, flips, loss share) per batch of one process."""
        head, last = _split_batches(order, self.cfg.batch_size)
        for rows, x in itertools.chain(self.train_imgs.batches(head, self.cfg.batch_size),
                                       self.train_imgs.batches(last, max(1, last.size))):
            flips = torch.rand(x.shape[0], generator=gen) < 0.5 if self.cfg.flip else None
            yield rows, x, flips, 1.0

    def _ddp_steps(self, order: np.ndarray, gen: torch.Generator):
        """This rank's share of every global batch: batch k of one process is order[kB:(k+1)B], and rank r takes
        its items r, r + W, ... (flips drawn for the whole batch, as one process draws them). Every rank takes the
        same number of steps (an empty one where the last batch has fewer images than ranks). The loss share
        W n_r / n makes DDP's mean of the ranks' gradients the gradient of the mean over the global batch, for the
        losses that are means over images (cdul, an, ls); EPR's and ROLE's expected-positive term is a function of
        the batch mean, which each rank takes over its share. n counts the batch's planned images: a streamed image
        that fails to decode in this epoch leaves its rank's share a little light (cached images never do)."""
        cfg, w = self.cfg, self.w
        big = cfg.batch_size
        head, last = _split_batches(order, big)
        batches = [head[k:k + big] for k in range(0, head.size, big)] + ([last] if last.size else [])
        mine = [b[w.rank::w.size] for b in batches]
        flat = np.concatenate(mine[:-1]) if len(mine) > 1 else order[:0]
        tail = mine[-1] if mine else order[:0]
        decoded = itertools.chain(self.train_imgs.batches(flat, big // w.size),
                                  self.train_imgs.batches(tail, max(1, tail.size)))
        ahead = next(decoded, None)
        empty = torch.zeros((0, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
        for b, rows in zip(batches, mine):
            flips = torch.rand(b.size, generator=gen)[w.rank::w.size] < 0.5 if cfg.flip else None
            if ahead is not None and rows.size and int(ahead[0][0]) in set(rows.tolist()):
                (got, x), ahead = ahead, next(decoded, None)
                if flips is not None:
                    flips = flips[torch.from_numpy(np.isin(rows, got))]
            else:  # none of this rank's images of the batch (or all of them failed to decode)
                got, x = rows[:0], empty
                flips = flips[:0] if flips is not None else None
            yield got, x, flips, w.size * got.size / b.size

    def _gather_rows(self, rows: np.ndarray, arrays: list[np.ndarray]) -> None:
        """The ``rows`` of ``arrays`` each rank computed, copied into every rank's ``arrays`` (one gather)."""
        if self.w.distributed:
            for got, *vals in self.w.all_gather((rows, *[np.ascontiguousarray(a[rows]) for a in arrays])):
                for a, v in zip(arrays, vals):
                    a[got] = v

    def _share_rows(self, rows: np.ndarray, names: tuple[str, ...]) -> None:
        """The run matrices' rows each rank computed, on every rank and in rank 0's store: the one gather per
        update."""
        self._gather_rows(rows, [self.mat[a] for a in names])
        self._flush()

    def _role_step(self, rows: np.ndarray, logits: torch.Tensor) -> torch.Tensor:
        """ROLE's label-estimator step on this batch's rows of theta (the run store's ``latent``): plain SGD, so the
        only state is theta itself (checkpointed); returns the network's loss. The gradient is that of the per-entry
        loss (loss_y summed over the B x C entries), so ``role_lr`` does not depend on batch size or class count."""
        cfg = self.cfg
        latent, labels = self.mat["latent"], self.mat["labels"]
        theta = torch.from_numpy(np.asarray(latent[rows])).to(self.device).requires_grad_(True)
        observed = torch.from_numpy(np.asarray(self.mat["init"])[rows] >= cfg.hard_threshold).to(self.device)
        loss_f, loss_y = role_losses(logits, theta, observed, self.expected_pos, cfg.epr_weight)
        (grad,) = torch.autograd.grad(loss_y, theta)
        with torch.no_grad():
            theta = theta - cfg.role_lr * theta.numel() * grad
            latent[rows] = theta.cpu().numpy()
            labels[rows] = role_estimates(theta, observed).cpu().numpy()
        return loss_f

    def _update_latent(self, own: np.ndarray | None = None) -> None:
        """Eq. 7-8: one process updates the whole matrix at once (the fused kernel streams the memory-mapped arrays
        in place); under torchrun each rank updates the rows it predicted (the step is elementwise) and the rows are
        gathered once."""
        cfg = self.cfg
        latent, pred, labels = (self.mat[a] for a in ("latent", "pred", "labels"))
        own = self.rows if own is None or not self.w.distributed else np.intersect1d(own, self.rows)
        if own.size == latent.shape[0]:
            ops.latent_update_stream(latent, pred, cfg.c1, cfg.sigma, cfg.psi_c2, cfg.label_lr, cfg.psi,
                                     device=self.device, labels_out_np=labels, backend=cfg.backend)
        else:  # rows skipped at labelling time have no prediction, other ranks' rows are theirs: update these only
            lat = np.ascontiguousarray(latent[own])
            lab = np.empty_like(lat)
            ops.latent_update_stream(lat, np.ascontiguousarray(pred[own]), cfg.c1, cfg.sigma, cfg.psi_c2,
                                     cfg.label_lr, cfg.psi, device=self.device, labels_out_np=lab,
                                     backend=cfg.backend)
            latent[own], labels[own] = lat, lab
        self._share_rows(own, ("latent", "labels", "pred"))

    def _fix_predictions(self, epoch: int) -> np.ndarray:
        """Y_p of eq. 7 from the network as this epoch left it, held fixed (paper 3.2: "when the training is done,
        we fix the predicted labels"): eval mode, no flips, over the trained rows (this rank's share of them), into
        the run store's ``pred``; returns the rows predicted here."""
        own = self.rows[self.w.rows_of(self.rows.size)]
        self._infer(self.train_imgs, own, self.mat["pred"], f"predict {epoch}/{self.cfg.epochs}")
        self._sync_failures()
        self._drop_undecodable()  # a streamed image that failed now has no prediction: it leaves the update
        return own

    @torch.inference_mode()
    def _infer(self, imgs: ImageTensors, rows: np.ndarray, out: np.ndarray, desc: str) -> None:
        """Sigmoid outputs of the network in eval mode for ``rows`` (decodable ones) into ``out[rows]``."""
        from tqdm import tqdm

        self._same_buffers()
        self.model.eval()
        bar = tqdm(total=rows.size, unit="img", desc=desc, disable=not (self.cfg.progress and self.w.is_main),
                   file=sys.stderr, dynamic_ncols=True, leave=False)
        for r, x in imgs.batches(rows, max(self.cfg.batch_size, 64)):
            x = normalize(x.to(self.device), IMAGENET_MEAN, IMAGENET_STD)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                out[r] = torch.sigmoid(self.model(x).float()).cpu().numpy()
            bar.update(len(r))
        bar.close()

    def predict(self, imgs: ImageTensors, n: int) -> np.ndarray:
        """Scores of the first ``n`` images of ``imgs`` (zero rows for images that fail to decode); under torchrun
        every rank predicts its share and every rank gets all of them."""
        out = np.zeros((n, len(self.classes)), dtype=np.float32)
        mine = np.arange(n)[self.w.rows_of(n)]
        self._infer(imgs, mine, out, "predict")
        self._gather_rows(mine, [out])
        self._sync_failures()
        return out

    def _metrics(self, epoch: int, loss: float, seconds: float) -> dict:
        row: dict = {"epoch": epoch, "train_loss": loss, "seconds": round(seconds, 3)}
        if self.train_ds.labels is not None and self.rows.size and self.w.is_main:
            labels = np.asarray(self.mat["labels" if self.cfg.moves_labels else "init"])
            row["pseudo_map"] = _map(labels[self.rows], self.train_ds.labels[self.rows])
        if self.test_ds is not None and self.test_imgs is not None:
            scores = self.predict(self.test_imgs, len(self.test_ds))
            ok = np.setdiff1d(np.arange(len(self.test_ds)), self.test_imgs.failed_rows)
            row["test_map"] = _map(scores[ok], self.test_ds.labels[ok]) if ok.size and self.w.is_main else None
        self._note_decode_failures()
        return row

    def _checkpoint(self, epoch: int) -> None:
        ck = {
            "version": CKPT_VERSION,
            "epoch": epoch,
            "identity": json.dumps(self.cfg.identity(), sort_keys=True),
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict() if self.sched is not None else {},
            "rng_cpu": torch.get_rng_state(),
            "latent": torch.from_numpy(np.array(self.mat["latent"])),
            "labels": torch.from_numpy(np.array(self.mat["labels"])),
            "history": json.dumps(self.history),
        }
        if self.device.type == "cuda":
            ck["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        save_atomic(ck, self.out / "checkpoint.pt")

    def run(self) -> TrainResult:
        cfg = self.cfg
        t0 = time.perf_counter()
        if self.start_epoch == 1 and not self.history:
            init = self._metrics(0, float("nan"), 0.0)
            init.pop("test_map", None)
            self.history.append(init)
        updates = (f", latent updates after epoch {cfg.warmup}" if cfg.updates_labels
                   else ", online label estimates" if cfg.method == "role" else "")
        on = f"{self.w.size} processes ({self.device.type}, DDP)" if self.w.distributed else str(self.device)
        self.log(f"training {cfg.arch} ({cfg.method}{updates}) "
                 f"on {self.rows.size} images of {self.train_ds.name}/{self.train_ds.split}, {len(self.classes)} "
                 f"classes, {on} -> {self.out}")
        for epoch in range(self.start_epoch, cfg.epochs + 1):
            te = time.perf_counter()
            loss, trained = self._train_epoch(epoch)
            self._sync_failures()
            self._drop_undecodable()
            if cfg.updates_labels and epoch > cfg.warmup:
                own = self._fix_predictions(epoch) if cfg.pred_source == "eval" else trained
                self._update_latent(own)
            elif cfg.pred_source == "train":
                self._share_rows(trained, ("pred",))
            row = self._metrics(epoch, loss, time.perf_counter() - te)
            self.history.append(row)
            # rank 0 owns the run folder: checkpoints, log and weights are written once, atomically; a failure there
            # (a full disk) stops every rank, not rank 0 alone
            self.w.on_main(functools.partial(self._save_epoch, epoch))
            self.log(_format_row(row))
        self.w.on_main(self._finish)  # no rank leaves (and tears the group down) before rank 0 wrote the model
        return TrainResult(self.out, self.history, time.perf_counter() - t0)

    def _save_epoch(self, epoch: int) -> None:
        if self.cfg.keep_epochs:
            self._save_weights(self.out / "epochs" / f"epoch_{epoch:03d}.safetensors", {"epoch": epoch})
        self._checkpoint(epoch)
        self._write_log()

    def release(self) -> None:
        """Drop the DDP wrapper now: it holds the process group, and one freed later by the garbage collector, after
        the group is gone, can abort the process at exit."""
        if self.net is not self.model:
            self.net = self.model
            gc.collect()

    def _finish(self) -> None:
        self._save_model()
        _plot(self.history, self.out / "curves.png")
        self.store.close()

    def _write_log(self) -> None:
        keys = ["epoch", "train_loss", "pseudo_map", "test_map", "seconds"]

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
                w.writeheader()
                for row in self.history:
                    w.writerow({k: ("" if row.get(k) is None or (isinstance(row.get(k), float) and math.isnan(row[k]))
                                    else row[k]) for k in keys})

        atomic_write(self.out / "log.csv", write)

    def _model_info(self) -> dict:
        return {"arch": self.cfg.arch, "num_classes": len(self.classes), "class_names": list(self.classes),
                "image_size": self.cfg.image_size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                "method": self.cfg.method, "epochs": self.cfg.epochs, "history": self.history[-1:]}

    def _save_weights(self, path: Path, extra: dict | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors_atomic(self.model.state_dict(), path, {"cdul_fast": json.dumps({**self._model_info(),
                                                                                        **(extra or {})})})

    def _save_model(self) -> None:
        self._save_weights(self.out / "model.safetensors")
        save_json_atomic(self._model_info(), self.out / "model.json")


def run_train(cfg: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """Train in this process, or under torchrun as one rank of a DDP job (NCCL on GPUs, gloo on CPUs)."""
    backend = "nccl" if cfg.device != "cpu" and has_cuda() else "gloo"
    with sigterm_interrupts(), dist_world(backend) as w:
        trainer = Trainer(cfg, log, w)
        try:
            return trainer.run()
        finally:
            trainer.release()


def _split_batches(order: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(whole batches, the last batch): a single image left over joins the batch before it, since BatchNorm cannot
    train on one image whose feature map is 1 x 1 (and a one-image batch is a noisy step anyway)."""
    n = order.size
    cut = n - (n % batch_size or batch_size)
    if n % batch_size == 1 and n > batch_size:
        cut -= batch_size
    return order[:max(cut, 0)], order[max(cut, 0):]


def _check_distributed(cfg: TrainConfig, w: World) -> None:
    if cfg.batch_size % w.size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is the global batch and must be a multiple of the "
                          f"{w.size} processes (each takes an equal share)")


# ------------------------------------------------------------------------------------------------------------ utils


def _map(scores: np.ndarray, labels: np.ndarray) -> float | None:
    m = mean_ap(average_precision(scores, labels))
    return None if math.isnan(m) else round(m * 100.0, 4)


def _format_row(row: dict) -> str:
    parts = [f"epoch {row['epoch']:>3}", f"loss {row['train_loss']:.4f}"]
    if row.get("pseudo_map") is not None:
        parts.append(f"pseudo-label mAP {row['pseudo_map']:.2f}")
    if row.get("test_map") is not None:
        parts.append(f"test mAP {row['test_map']:.2f}")
    parts.append(f"{row['seconds']:.1f}s")
    return "  ".join(parts)


def _plot(history: list[dict], path: Path) -> None:
    """Loss and mAP curves (PNG). matplotlib is a declared dependency: a missing one is an install error, not a skip."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(ep[1:], [h["train_loss"] for h in history[1:]], marker="o")
    a.set(xlabel="epoch", ylabel="train loss", title="loss")
    for key, name in (("pseudo_map", "pseudo labels (train)"), ("test_map", "classifier (test)")):
        pts = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
        if pts:
            b.plot(*zip(*pts), marker="o", label=name)
    b.set(xlabel="epoch", ylabel="mAP (%)", title="mAP")
    b.legend()
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
