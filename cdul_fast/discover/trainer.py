"""End-to-end discovery training (Jia et al. eq. 10): L = CE + BCE + (1 - omega) L_CL + omega L_MSE.

Choices where the paper is silent (all in ``DiscoverConfig``): tau = 0.1; lambda = 1 (with lambda > 1 the
contrastive weight 1 - omega would turn negative); Adam, lr 1e-3, cosine schedule; batches drawn uniformly from the
labelled and unlabelled items (as the paper's x_i ~ Unif(D^u u D^l)), two augmented views each; the pairwise labels
come from view 1's z-bar, detached, and the BCE pairs view 1's novel-head probabilities with each other over all
M x M unlabelled pairs of the batch (the diagonal included, s_ii = 1); CE on view 1 of the labelled items; WTA with
H = the feature width, k = 4, and mu chosen as the paper's section 4.4 does, on a split of the known classes
(``select.py``; a number instead, e.g. 0.47 = the paper's 240 of 512, skips that); phi^u an MLP (128 hidden), which on
digits (3 seeds, 100 epochs, mu 0.47 H) lifted the novel ACC from 85.1 to 87.7 % (mean).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .._backend import resolve_device
from ..config import SEED_MAX, check_number
from ..errors import ConfigError
from ..ops import dispatch as ops
from ..ops import reference as ref
from .data import DiscoverData, views
from .losses import consistency_mse, known_ce, nce_losses, ramp_up
from .metrics import ClusterScores, cluster_scores
from .model import ENCODERS, DiscoveryNet, make_encoder
from .select import pseudo_novel_count, select_mu

PAIR_METHODS = ("wta", "rankstats", "cosine")
FALLBACK_MU = 0.5  # "auto" with fewer than 4 known classes: the value the digits search picks most often


@dataclass
class DiscoverConfig:
    dataset: str | None = None  # None: digits, or with --labels the dataset the store records
    labels: str | None = None  # a label store with embeddings: discover among its poorly-scored images
    confident: float = 0.5  # --labels: images whose best known score reaches this are the labelled set
    poor: float = 0.3  # --labels: images whose every known score is below this are grouped
    novel: int | None = None  # --labels: K, the number of new groups; None = estimated (silhouette)
    max_novel: int = 10  # --labels: the largest K the estimate tries
    labels_array: str = "final"  # --labels: the store's array read as known-class scores
    root: str | None = None  # shapes (its folder, made if missing), cifar10/cifar100 and folder datasets
    class_split: str | None = None  # folder: YAML {known: [...], novel: [...]}
    image_size: int = 32  # folder and shapes: images resized to this many pixels
    known: int | None = None  # None: the dataset's standard split (digits 5, cifar10 5, cifar100 80, shapes 6)
    encoder: str = "auto"  # auto (the data's: small CNN for digits/shapes, resnet18 for cifar/folder), small, resnet18
    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    tau: float = 0.1
    ramp_lambda: float = 1.0
    feat_dim: int = 128
    proj_dim: int = 128
    head_hidden: int = 128  # phi^u: "a non-linear function" (section 3.2): an MLP; 0 = linear
    bce_views: int = 1  # 1: pairs of view 1's predictions; 2: also view 2's (codes of each view's features)
    pairs: str = "wta"
    wta_hashes: int | None = None  # None = feat_dim
    wta_k: int = 4
    wta_mu_fraction: float | str = "auto"  # mu / H, or "auto": chosen on a split of the known classes (select.py)
    mu_candidates: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7)  # "auto" tries these
    select_epochs: int = 40  # "auto": epochs of each trial run
    select_folds: int = 2  # "auto": rotations of the known classes that pretend to be novel
    rank_k: int = 5  # rankstats: pairs whose top-k feature sets agree
    cosine_threshold: float = 0.9
    use_ce: bool = True
    use_bce: bool = True
    use_mse: bool = True
    use_nce_i: bool = True
    use_nce_c: bool = True
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        if self.pairs not in PAIR_METHODS:
            raise ConfigError(f"pairs must be one of {', '.join(PAIR_METHODS)}, got {self.pairs!r}")
        for flag, value, lo, hi, integer in (
                ("--epochs", self.epochs, 1, None, True), ("--image-size", self.image_size, 8, 1024, True),
                ("--batch-size", self.batch_size, 2, None, True), ("--lr", self.lr, 1e-12, None, False),
                ("--weight-decay", self.weight_decay, 0.0, None, False), ("--tau", self.tau, 1e-6, None, False),
                ("--ramp-lambda", self.ramp_lambda, 0.0, 1.0, False), ("--feat-dim", self.feat_dim, 4, 65536, True),
                ("--proj-dim", self.proj_dim, 2, 65536, True), ("--head-hidden", self.head_hidden, 0, 65536, True),
                ("--bce-views", self.bce_views, 1, 2, True), ("--wta-k", self.wta_k, 2, self.feat_dim, True),
                ("--rank-k", self.rank_k, 1, self.feat_dim, True), ("--seed", self.seed, 0, SEED_MAX, True),
                ("--cosine-threshold", self.cosine_threshold, -1.0, 1.0, False)):
            check_number(flag, value, lo=lo, hi=hi, integer=integer)
        check_number("--wta-hashes", self.wta_hashes, lo=1, hi=65536, integer=True, optional=True)
        check_number("--known", self.known, lo=1, integer=True, optional=True)
        check_number("--confident", self.confident, lo=0.0, hi=1.0)
        check_number("--poor", self.poor, lo=0.0, hi=1.0)
        check_number("--novel", self.novel, lo=2, hi=65536, integer=True, optional=True)
        check_number("--max-novel", self.max_novel, lo=2, hi=1000, integer=True)
        for flag, value in (("--known", self.known), ("--class-split", self.class_split)):
            if self.labels is not None and value is not None:
                raise ConfigError(f"{flag} does not apply with --labels: the store's confidently scored classes are "
                                  "the known ones")
        if self.poor > self.confident:
            raise ConfigError(f"--poor ({self.poor}) must not exceed --confident ({self.confident})")
        if self.encoder not in ENCODERS:
            raise ConfigError(f"--encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")
        check_number("--select-epochs", self.select_epochs, lo=1, integer=True)
        check_number("--select-folds", self.select_folds, lo=1, hi=64, integer=True)
        if self.wta_mu_fraction != "auto":
            check_number("--wta-mu-fraction (or 'auto')", self.wta_mu_fraction, lo=1e-9, hi=1.0)
        if isinstance(self.mu_candidates, (str, bytes)) or not isinstance(self.mu_candidates, (list, tuple)) \
                or not self.mu_candidates:
            raise ConfigError(f"--mu-candidates must be a non-empty list of numbers, got {self.mu_candidates!r}")
        for mu in self.mu_candidates:
            check_number("--mu-candidates (each)", mu, lo=1e-9, hi=1.0)


@dataclass
class DiscoverResult:
    model: DiscoveryNet
    train_novel: ClusterScores | None  # transductive: the unlabelled training items (the headline); None: no truth
    test_novel: ClusterScores | None  # held-out novel-class images
    test_known_acc: float
    config: DiscoverConfig  # as run: an "auto" mu replaced by the chosen one
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    mu_scores: dict[float, float] | None = None  # "auto": each candidate's pretend-novel ACC


def pair_labels(zbar: torch.Tensor, cfg: DiscoverConfig, perms: torch.Tensor) -> torch.Tensor:
    """Pairwise pseudo labels [M, M] of detached features: WTA (eq. 6), ranking statistics (Han et al.: equal
    top-k index sets) or a cosine threshold — the alternatives of the paper's Table 7."""
    z = zbar.detach().float()
    if cfg.pairs == "wta":
        return ref.wta_pair_labels(ref.wta_codes(z, perms, cfg.wta_k), wta_mu(cfg, perms))
    if cfg.pairs == "rankstats":
        top = torch.zeros_like(z, dtype=torch.bool).scatter_(1, z.topk(cfg.rank_k, dim=1).indices, True)
        return (top.float() @ top.float().t() >= cfg.rank_k).float()
    zn = torch.nn.functional.normalize(z, dim=1)
    return (zn @ zn.t() >= cfg.cosine_threshold).float()


def pairwise_loss(zbar: torch.Tensor, probs: torch.Tensor, cfg: DiscoverConfig, perms: torch.Tensor) -> torch.Tensor:
    """The BCE of eq. 7-8 on one batch's unlabelled items: WTA through the fused op (the M x M matrices are never
    formed on CUDA), the Table 7 alternatives through their explicit pair matrix."""
    if cfg.pairs == "wta":
        codes = ref.wta_codes(zbar.detach(), perms, cfg.wta_k)
        return ops.wta_pairwise_bce(probs, codes, wta_mu(cfg, perms))
    return ref.pairwise_bce(probs, pair_labels(zbar, cfg, perms))


def wta_mu(cfg: DiscoverConfig, perms: torch.Tensor) -> int:
    """mu in hashes: the fraction of H (the paper's 240 of 512 = 0.47)."""
    return max(1, round(cfg.wta_mu_fraction * perms.shape[0]))


def _predict(model: DiscoveryNet, x: torch.Tensor, device, batch: int = 512) -> dict[str, torch.Tensor]:
    model.eval()
    outs = []
    (modality,) = model.encoders.keys()
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            o = model({modality: x[i:i + batch].to(device)})
            outs.append({k: v.cpu() for k, v in o.items() if k in ("zbar", "known", "novel")})
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]} if outs else {}


def evaluate(model: DiscoveryNet, data: DiscoverData, device
             ) -> tuple[ClusterScores | None, ClusterScores | None, float]:
    """Novel-head clusters scored on the unlabelled train items and the held-out novel images (Hungarian ACC, NMI,
    ARI), and the known head's accuracy on the held-out known images; None / NaN where there is nothing to score
    against (a label store's images: nobody knows their novel classes)."""
    if not data.has_truth:
        return None, None, float("nan")
    tr = _predict(model, data.x_train[torch.from_numpy(data.unlabelled)], device)
    train_novel = cluster_scores(data.y_train[data.unlabelled], tr["novel"].argmax(1).numpy())
    if not len(data.y_test):
        return train_novel, None, float("nan")
    novel_te = np.isin(data.y_test, data.novel)
    te = _predict(model, data.x_test, device)
    test_novel = cluster_scores(data.y_test[novel_te], te["novel"][torch.from_numpy(novel_te)].argmax(1).numpy()) \
        if novel_te.any() else None
    known_te = ~novel_te
    acc = float((te["known"][torch.from_numpy(known_te)].argmax(1).numpy()
                 == data.known_index(data.y_test[known_te])).mean()) if known_te.any() else float("nan")
    return train_novel, test_novel, acc


def features(model: DiscoveryNet, x: torch.Tensor, device) -> np.ndarray:
    """z-bar of images (for k-means baselines)."""
    return _predict(model, x, device)["zbar"].numpy()


def run_discover(data: DiscoverData, cfg: DiscoverConfig, log: Callable[[str], None] = lambda s: None,
                 progress: bool = False) -> DiscoverResult:
    cfg.validate()
    t0 = time.perf_counter()
    mu_scores = None
    if cfg.wta_mu_fraction == "auto" and cfg.pairs == "wta" and cfg.use_bce:  # otherwise mu is never read
        if pseudo_novel_count(data) >= 2:
            mu, mu_scores = select_mu(data, cfg, run_discover, log)
            log(f"mu / H = {mu:.2f} (best on the known-class split)")
        else:
            mu = FALLBACK_MU
            log(f"mu / H = {mu} (too few known classes to choose it on a split of them: 4 are needed)")
        cfg = dataclasses.replace(cfg, wta_mu_fraction=mu)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    mod = data.modality
    encoder = make_encoder(cfg.encoder, mod, tuple(data.x_train.shape[1:]), cfg.feat_dim, data.encoder)
    model = DiscoveryNet({mod: encoder}, cfg.feat_dim, len(data.known), len(data.novel), cfg.proj_dim,
                         cfg.head_hidden).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = data.x_train.shape[0]
    steps = math.ceil(n / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps)
    perms = ref.wta_permutations(cfg.feat_dim, cfg.wta_hashes or cfg.feat_dim, cfg.seed)
    y_known = torch.from_numpy(np.where(data.labelled, data.known_index(data.y_train), -1))
    g = torch.Generator().manual_seed(cfg.seed)
    history = []
    from tqdm import tqdm

    for epoch in tqdm(range(cfg.epochs), desc="discover", unit="epoch", disable=not progress, dynamic_ncols=True,
                      file=sys.stderr):
        model.train()
        omega = ramp_up(epoch, cfg.epochs, cfg.ramp_lambda)
        order = torch.randperm(n, generator=g)
        sums: dict[str, float] = {}
        for s in range(steps):
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            if idx.numel() < 2:
                continue
            x = data.x_train[idx]
            v1, v2 = views(data, x, g).to(device), views(data, x, g).to(device)
            y = y_known[idx].to(device)
            o = model({mod: torch.cat([v1, v2])})
            b = idx.numel()
            lab, unl = y >= 0, y < 0
            parts = {}
            zero = o["zbar"].sum() * 0.0
            nce_i, nce_c = nce_losses(o[f"zhat_{mod}"], y, cfg.tau)
            parts["cl"] = (nce_i if cfg.use_nce_i else zero) + (nce_c if cfg.use_nce_c else zero)
            parts["ce"] = known_ce(o["known"][:b], y) if cfg.use_ce else zero
            p_nov = torch.softmax(o["novel"], dim=1)
            if cfg.use_bce and unl.sum() >= 2:
                bce = zero
                for v in range(cfg.bce_views):
                    sl = slice(v * b, (v + 1) * b)
                    bce = bce + pairwise_loss(o["zbar"][sl][unl], p_nov[sl][unl], cfg, perms)
                parts["bce"] = bce / cfg.bce_views
            else:
                parts["bce"] = zero
            if cfg.use_mse:
                p_kn = torch.softmax(o["known"], dim=1)
                mse = zero
                if lab.any():
                    mse = mse + consistency_mse(p_kn[:b][lab], p_kn[b:][lab]) * lab.float().mean()
                if unl.any():
                    mse = mse + consistency_mse(p_nov[:b][unl], p_nov[b:][unl]) * unl.float().mean()
                parts["mse"] = mse
            else:
                parts["mse"] = zero
            loss = parts["ce"] + parts["bce"] + (1.0 - omega) * parts["cl"] + omega * parts["mse"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
        row = {"epoch": epoch + 1, "omega": round(omega, 4), **{k: v / steps for k, v in sums.items()}}
        history.append(row)
        if (epoch + 1) % max(1, cfg.epochs // 5) == 0:
            log("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    train_novel, test_novel, known_acc = evaluate(model, data, device)
    return DiscoverResult(model, train_novel, test_novel, known_acc, cfg, history, time.perf_counter() - t0,
                          mu_scores)
