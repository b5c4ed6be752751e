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

from .._backend import resolve_device
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
from ..errors import ConfigError, StoreError, WeightsError
from ..evaluate import average_precision, mean_ap
from ..fsutil import atomic_write, file_stats, save_json_atomic, save_yaml_atomic
from ..ops import dispatch as ops
from ..ops.reference import labels_to_latent, psi_c2_auto
from ..store.label_store import DONE, LabelStore
from ..views.square import IMAGENET_MEAN, IMAGENET_STD, ImageTensors, cache_fits, normalize
from .checkpoint import load_checkpoint, save_atomic, save_safetensors_atomic
from .classifier import build_classifier
from .losses import bce_loss, epr_loss, kl_loss, role_estimates, role_losses, smoothed_bce_loss

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


def _create_run_store(path: Path, src: LabelStore, array: str, meta: dict, eps: float) -> LabelStore:
    """init = the source's pseudo labels, latent = logit(clamp(init, eps, 1 - eps)), labels = init."""
    init = np.array(src.array(array), dtype=np.float32)  # a private copy: the source store is mapped read-only
    st = LabelStore.create(path, class_names=src.class_names, rows=src.rows,
                           arrays=["init", "latent", "labels", "pred"], meta=meta, overwrite=True)
    latent = labels_to_latent(torch.from_numpy(init), eps).numpy()
    st.write(0, {"init": init, "latent": latent, "labels": init, "pred": np.zeros_like(init)})
    st.flush()
    return st


# ------------------------------------------------------------------------------------------------------------- loop


class Trainer:
    """One training run; ``run`` executes the remaining epochs (all of them, or those after a checkpoint)."""

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = print) -> None:
        cfg.validate()
        self.cfg, self.log = cfg, log
        self.out = Path(cfg.out)
        self.device = resolve_device(cfg.device)
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
            self._prepare_out(src)
            if ck is None:  # a fresh start: per-epoch weights of an earlier run in this folder are not this run's
                shutil.rmtree(self.out / "epochs", ignore_errors=True)
        if ck is not None:
            self._restore_labels(ck)
        self.expected_pos = float((np.asarray(self.store.array("init"))[self.rows] >= cfg.hard_threshold).sum(1)
                                  .mean()) if self.rows.size else 1.0

    # -- setup
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
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        save_yaml_atomic(asdict(cfg), self.out / "config.yaml")
        meta = {"kind": "cdul-train", "source": str(Path(cfg.labels).resolve()), "array": cfg.labels_array}
        self.store = _create_run_store(self.out / "labels.cdul", src, cfg.labels_array, meta, cfg.init_eps)

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
        self.store.array("latent")[:] = ck["latent"].numpy()
        self.store.array("labels")[:] = ck["labels"].numpy()  # exact bits: recomputing sigmoid could differ by an ulp
        self.store.flush()
        self.history = ck["history"]
        self.start_epoch = int(ck["epoch"]) + 1
        self.log(f"resumed {self.out} after epoch {ck['epoch']}")

    # -- one epoch
    def _targets(self, rows: np.ndarray) -> torch.Tensor:
        cfg = self.cfg
        src = "labels" if cfg.updates_labels else "init"
        y = torch.from_numpy(np.asarray(self.store.array(src))[rows]).to(self.device)
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

    def _train_epoch(self, epoch: int) -> float:
        from tqdm import tqdm

        cfg = self.cfg
        self.model.train()
        torch.manual_seed(cfg.seed * 1_000_003 + epoch)  # dropout etc. depend on (seed, epoch) only, as data order does
        order, gen = _epoch_order(cfg.seed, epoch, self.rows)
        pred = self.store.array("pred") if cfg.pred_source == "train" else None
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        total, n = 0.0, 0
        bar = tqdm(total=order.size, unit="img", desc=f"epoch {epoch}/{cfg.epochs}", disable=not cfg.progress,
                   file=sys.stderr, dynamic_ncols=True, leave=False)
        for rows, x in self.train_imgs.batches(order, cfg.batch_size):
            x = normalize(x.to(self.device, non_blocking=True), IMAGENET_MEAN, IMAGENET_STD)
            if cfg.flip:
                flip = torch.rand(x.shape[0], generator=gen) < 0.5
                x = torch.where(flip.to(self.device).view(-1, 1, 1, 1), x.flip(3), x)
            with autocast:
                logits = self.model(x)
            if cfg.method == "role":
                loss = self._role_step(rows, logits.float())
            else:
                loss = self._loss(logits.float(), self._targets(rows))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            if pred is not None:
                pred[rows] = torch.sigmoid(logits.detach().float()).cpu().numpy()
            total += float(loss.detach()) * len(rows)
            n += len(rows)
            bar.update(len(rows))
        bar.close()
        if n == 0:
            raise StoreError(f"none of the {order.size} labelled images of {self.train_ds.name}/{self.train_ds.split} "
                             f"could be decoded in epoch {epoch}: there is nothing to train on")
        if self.sched is not None:
            self.sched.step()
        if cfg.method == "role":
            self.store.flush()
        return total / n

    def _role_step(self, rows: np.ndarray, logits: torch.Tensor) -> torch.Tensor:
        """ROLE's label-estimator step on this batch's rows of theta (the run store's ``latent``): plain SGD, so the
        only state is theta itself (checkpointed); returns the network's loss. The gradient is that of the per-entry
        loss (loss_y summed over the B x C entries), so ``role_lr`` does not depend on batch size or class count."""
        cfg = self.cfg
        latent, labels = self.store.array("latent"), self.store.array("labels")
        theta = torch.from_numpy(np.asarray(latent[rows])).to(self.device).requires_grad_(True)
        observed = torch.from_numpy(np.asarray(self.store.array("init"))[rows] >= cfg.hard_threshold).to(self.device)
        loss_f, loss_y = role_losses(logits, theta, observed, self.expected_pos, cfg.epr_weight)
        (grad,) = torch.autograd.grad(loss_y, theta)
        with torch.no_grad():
            theta = theta - cfg.role_lr * theta.numel() * grad
            latent[rows] = theta.cpu().numpy()
            labels[rows] = role_estimates(theta, observed).cpu().numpy()
        return loss_f

    def _update_latent(self) -> None:
        """Eq. 7-8 over the whole matrix at once: the fused kernel streams the memory-mapped arrays in place."""
        cfg = self.cfg
        latent, pred, labels = (self.store.array(a) for a in ("latent", "pred", "labels"))
        if self.rows.size == latent.shape[0]:
            ops.latent_update_stream(latent, pred, cfg.c1, cfg.sigma, cfg.psi_c2, cfg.label_lr, cfg.psi,
                                     device=self.device, labels_out_np=labels, backend=cfg.backend)
        else:  # rows skipped at labelling time have no prediction: update the trained rows only
            lat = np.ascontiguousarray(latent[self.rows])
            lab = np.empty_like(lat)
            ops.latent_update_stream(lat, np.ascontiguousarray(pred[self.rows]), cfg.c1, cfg.sigma, cfg.psi_c2,
                                     cfg.label_lr, cfg.psi, device=self.device, labels_out_np=lab,
                                     backend=cfg.backend)
            latent[self.rows], labels[self.rows] = lat, lab
        self.store.flush()

    def _fix_predictions(self, epoch: int) -> None:
        """Y_p of eq. 7 from the network as this epoch left it, held fixed (paper 3.2: "when the training is done,
        we fix the predicted labels"): eval mode, no flips, over the trained rows, into the run store's ``pred``."""
        self._infer(self.train_imgs, self.rows, self.store.array("pred"), f"predict {epoch}/{self.cfg.epochs}")
        self._drop_undecodable()  # a streamed image that failed now has no prediction: it leaves the update

    @torch.inference_mode()
    def _infer(self, imgs: ImageTensors, rows: np.ndarray, out: np.ndarray, desc: str) -> None:
        """Sigmoid outputs of the network in eval mode for ``rows`` (decodable ones) into ``out[rows]``."""
        from tqdm import tqdm

        self.model.eval()
        bar = tqdm(total=rows.size, unit="img", desc=desc, disable=not self.cfg.progress, file=sys.stderr,
                   dynamic_ncols=True, leave=False)
        for r, x in imgs.batches(rows, max(self.cfg.batch_size, 64)):
            x = normalize(x.to(self.device), IMAGENET_MEAN, IMAGENET_STD)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                out[r] = torch.sigmoid(self.model(x).float()).cpu().numpy()
            bar.update(len(r))
        bar.close()

    def predict(self, imgs: ImageTensors, n: int) -> np.ndarray:
        """Scores of the first ``n`` images of ``imgs`` (zero rows for images that fail to decode)."""
        out = np.zeros((n, len(self.classes)), dtype=np.float32)
        self._infer(imgs, np.arange(n), out, "predict")
        return out

    def _metrics(self, epoch: int, loss: float, seconds: float) -> dict:
        row: dict = {"epoch": epoch, "train_loss": loss, "seconds": round(seconds, 3)}
        if self.train_ds.labels is not None and self.rows.size:
            labels = np.asarray(self.store.array("labels" if self.cfg.moves_labels else "init"))
            row["pseudo_map"] = _map(labels[self.rows], self.train_ds.labels[self.rows])
        if self.test_ds is not None and self.test_imgs is not None:
            scores = self.predict(self.test_imgs, len(self.test_ds))
            ok = np.setdiff1d(np.arange(len(self.test_ds)), self.test_imgs.failed_rows)
            row["test_map"] = _map(scores[ok], self.test_ds.labels[ok]) if ok.size else None
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
            "latent": torch.from_numpy(np.array(self.store.array("latent"))),
            "labels": torch.from_numpy(np.array(self.store.array("labels"))),
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
        self.log(f"training {cfg.arch} ({cfg.method}{updates}) "
                 f"on {self.rows.size} images of {self.train_ds.name}/{self.train_ds.split}, {len(self.classes)} "
                 f"classes, {self.device} -> {self.out}")
        for epoch in range(self.start_epoch, cfg.epochs + 1):
            te = time.perf_counter()
            loss = self._train_epoch(epoch)
            self._drop_undecodable()
            if cfg.updates_labels and epoch > cfg.warmup:
                if cfg.pred_source == "eval":
                    self._fix_predictions(epoch)
                self._update_latent()
            row = self._metrics(epoch, loss, time.perf_counter() - te)
            self.history.append(row)
            if cfg.keep_epochs:
                self._save_weights(self.out / "epochs" / f"epoch_{epoch:03d}.safetensors", {"epoch": epoch})
            self._checkpoint(epoch)
            self._write_log()
            self.log(_format_row(row))
        self._save_model()
        _plot(self.history, self.out / "curves.png")
        self.store.close()
        return TrainResult(self.out, self.history, time.perf_counter() - t0)

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
    return Trainer(cfg, log).run()


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
