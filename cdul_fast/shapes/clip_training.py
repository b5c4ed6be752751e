"""Train (and evaluate) the tiny CLIP shipped as ``shapes-clip``: a contrastive image-text model of the shapes world.

    python -m cdul_fast.shapes.clip_training train --out /tmp/shapes-clip     # ~6 min on 2 CPU cores
    python -m cdul_fast.shapes.clip_training eval --clip cdul_fast/shapes/assets/shapes-clip

Images are single-object renders (``datasets.shapes.render_single``, the generator of the ``captions`` split) drawn at
40-64 px, passed through JPEG like the dataset files and resized to 64 px, which is how a grid snippet of a
multi-object image looks after CLIP's resize. Captions are "a photo of the {class}" and "a photo of the {colour}
{class}". The loss is CLIP's symmetric contrastive loss with every correct caption counted as a positive (several
images in a batch share a caption). Seeded and single-process, so a rerun on the same machine reproduces the weights
bit for bit; across machines/BLAS builds the numbers agree within the tolerance stated in docs/shapes.md.

After training, ``train`` measures what the checkpoint is for and records it in ``train_info.json``: zero-shot top-1
on held-out single objects, and pseudo-label mAP (global / avg / max / cdul, 3x3 grid) on the multi-object test split
with zeta chosen on the train split within the paper's range 0-0.4.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..fsutil import atomic_write, write_text_atomic
from ..views.geometry import OPENAI_MEAN, OPENAI_STD
from .world import COLOURS, SHAPES12, World, jpeg_roundtrip
from .world20 import SHAPES20

MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
PREPROCESS_CFG = {"size": 64, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "interpolation": "bicubic",
                  "resize_mode": "shortest"}
TEMPLATE = "a photo of the {}"
WEIGHTS_NAME = "open_clip_model.safetensors"
ZETAS = (0.0, 0.1, 0.2, 0.3, 0.4)  # the paper's search range for the min-max threshold (section 4.3)
GRID = 3
POOL_STREAM, HELD_OUT_STREAM = 7919, 104729  # separate RNG streams: held-out images never overlap training ones
HELD_OUT = 600
EVAL_N = {"train": 1000, "test": 500}  # the dataset's default split sizes
WORLDS: dict[str, World] = {w.name: w for w in (SHAPES12, SHAPES20)}
SHIPPED = {"shapes": "shapes-clip", "shapes20": "shapes20-clip"}  # the asset folder of each world's CLIP


@dataclass(frozen=True)
class ClipTrainConfig:
    """Everything that determines the trained weights (recorded in train_info.json)."""

    steps: int = 1200
    batch: int = 128
    lr: float = 2e-3
    pool: int = 6000
    seed: int = 0
    threads: int = 2
    world: str = "shapes"


def say(msg: str) -> None:
    """Progress lines, flushed: training runs for minutes under nohup, where stdout is block-buffered."""
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------------------ data


def captions(world: World = SHAPES12) -> tuple[list[str], np.ndarray]:
    """All prompts (plain per class, then colour x class) and, per (class, colour), the two correct prompt indices."""
    colours, classes = list(COLOURS), world.classes
    texts = [TEMPLATE.format(c) for c in classes]
    texts += [TEMPLATE.format(f"{k} {c}") for c in classes for k in colours]
    pos = np.zeros((len(classes), len(colours), 2), dtype=np.int64)
    for ci in range(len(classes)):
        for ki in range(len(colours)):
            pos[ci, ki] = (ci, len(classes) + ci * len(colours) + ki)
    return texts, pos


def make_pool(n: int, seed: int, size: int = 64, stream: int = POOL_STREAM,
              world: World = SHAPES12) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """uint8 [n, 3, S, S] single-object images (drawn at 40-64 px, resized to S like a snippet is), classes, colours."""
    from PIL import Image

    rng = np.random.default_rng([seed, stream])
    colours = list(COLOURS)
    imgs = np.empty((n, 3, size, size), dtype=np.uint8)
    cls = np.empty(n, dtype=np.int64)
    col = np.empty(n, dtype=np.int64)
    for i in range(n):
        c = int(rng.integers(len(world.classes)))
        img, colour = world.render_single(rng, int(rng.choice([40, 48, 56, 64])), c)
        img = jpeg_roundtrip(img).resize((size, size), Image.Resampling.BICUBIC)
        imgs[i] = np.asarray(img).transpose(2, 0, 1)
        cls[i], col[i] = c, colours.index(colour)
    return torch.from_numpy(imgs), cls, col


def held_out(n: int = HELD_OUT, seed: int = 0, world: World = SHAPES12) -> tuple[torch.Tensor, np.ndarray,
                                                                                   np.ndarray]:
    """Single-object images for zero-shot accuracy, from their own RNG stream (disjoint from any training pool)."""
    return make_pool(n, seed, stream=HELD_OUT_STREAM, world=world)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    m = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (x.float() / 255.0 - m) / s


# -------------------------------------------------------------------------------------------------------- training


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with multiple positives: ``match`` [B, T] marks every correct (image, caption) pair."""
    logits = scale * img @ txt.t()
    m = match.float()
    i2t = -(F.log_softmax(logits, dim=1) * m / m.sum(1, keepdim=True)).sum(1).mean()
    used = m.sum(0) > 0  # captions without an image in the batch have no positive to pull towards
    lt = logits.t()[used]
    mt = m.t()[used]
    t2i = -(F.log_softmax(lt, dim=1) * mt / mt.sum(1, keepdim=True)).sum(1).mean()
    return 0.5 * (i2t + t2i)


def build_model(seed: int):
    """A freshly initialised open_clip CLIP (seeded) and the tokenizer the loader will pair it with."""
    import open_clip

    torch.manual_seed(seed)
    return open_clip.CLIP(**MODEL_CFG), open_clip.tokenizer.SimpleTokenizer(
        context_length=MODEL_CFG["text_cfg"]["context_length"])


def _schedule(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over 5% of the steps, then cosine decay: stable from scratch at a high learning rate."""
    warm = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))


def fit(cfg: ClipTrainConfig, log: Callable[[str], None] = say, log_every: int = 100) -> torch.nn.Module:
    """Train from scratch on a seeded in-memory pool; batch order and flips come from a seeded torch Generator."""
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    model, tok = build_model(cfg.seed)
    world = WORLDS[cfg.world]
    texts, pos = captions(world)
    tokens = tok(texts)
    imgs, cls, col = make_pool(cfg.pool, cfg.seed, world=world)
    log(f"data: {cfg.pool} single-object training images in {time.perf_counter() - t0:.0f}s")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.05)
    sched = _schedule(opt, cfg.steps)
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(0, cfg.pool, (cfg.batch,), generator=g)
        x = imgs[idx]
        flip = torch.rand(cfg.batch, generator=g) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        match = torch.zeros(cfg.batch, len(texts))
        match.scatter_(1, torch.from_numpy(pos[cls[idx.numpy()], col[idx.numpy()]]), 1.0)
        img = F.normalize(model.encode_image(_normalize(x)), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        loss = contrastive_loss(img, txt, model.logit_scale.exp().clamp(max=100), match)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == cfg.steps:
            scale = float(model.logit_scale.detach().exp())
            log(f"step {step}/{cfg.steps} loss {float(loss.detach()):.4f} scale {scale:.1f} "
                f"{time.perf_counter() - t0:.0f}s")
    return model.eval()


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """Weights in fp16 (the file stays a few MB); the loader casts them into the fp32 model."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda p: save_file(state, str(p)))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _machine(threads: int) -> str:
    return f"{platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} cpus, " \
           f"{threads} threads"


def train(out: Path, cfg: ClipTrainConfig = ClipTrainConfig(), measure: bool = True,
          log: Callable[[str], None] = say) -> dict:
    """Train, write config + fp16 safetensors + train_info.json into ``out``; ``measure`` adds the quality metrics."""
    t0 = time.perf_counter()
    model = fit(cfg, log)
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / WEIGHTS_NAME)
    write_text_atomic(out / "open_clip_config.json",
                json.dumps({"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}, indent=2) + "\n")
    info = {
        **asdict(cfg), "train_seconds": round(seconds, 1), "machine": _machine(cfg.threads),
        "torch": torch.__version__, "parameters": sum(p.numel() for p in model.parameters()),
        "sha256": sha256(out / WEIGHTS_NAME),
    }
    if measure:
        info.update(evaluate_clip(out, world=cfg.world, log=log))
    write_text_atomic(out / "train_info.json", json.dumps(info, indent=2) + "\n")
    return info


# ------------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def zero_shot_top1(model, tokenizer, imgs: torch.Tensor, cls: np.ndarray,
                   classes: tuple[str, ...] = SHAPES12.classes) -> float:
    """Top-1 (%) of "a photo of the {class}" prompts on single-object images: does the CLIP know the classes."""
    model.eval()
    txt = F.normalize(model.encode_text(tokenizer([TEMPLATE.format(c) for c in classes])), dim=-1)
    hits = 0
    for i in range(0, len(imgs), 256):
        f = F.normalize(model.encode_image(_normalize(imgs[i:i + 256])), dim=-1)
        hits += int(((f @ txt.t()).argmax(1).numpy() == cls[i:i + 256]).sum())
    return 100.0 * hits / len(imgs)


@torch.no_grad()
def view_cosines(clip, ds, grid: int = GRID, batch: int = 64) -> torch.Tensor:
    """Cosine scores [N, 1 + G*G, C] of every view (whole image, then snippets) with every class prompt.

    Uses the package's own view cutting and preprocessing (``cdul_fast.views.geometry``), so the numbers are those the
    label pipeline produces, without a label store; every zeta can then be scored from the same cosines.
    """
    from ..ops.reference import cosine_scores
    from ..views.decode import load_rgb
    from ..views.geometry import ViewSpec, normalize_views
    from ..views.resample import pil_views

    spec = ViewSpec.from_preprocess_cfg(clip.preprocess_cfg, grid)
    text = clip.encode_text(ds.class_names, TEMPLATE)
    out = []
    for i in range(0, len(ds), batch):
        views = np.stack([pil_views(load_rgb(p), spec) for p in ds.paths[i:i + batch]])
        x = normalize_views(torch.from_numpy(views), spec.mean, spec.std)
        feats = clip.encode_image(x).float().reshape(len(views), spec.num_views, -1)
        out.append(cosine_scores(feats, text))
    return torch.cat(out)


def map_per_aggregator(cos: torch.Tensor, ds, logit_scale: float, zeta: float, lam: float = 1.0) -> dict[str, float]:
    """Pseudo-label mAP (%) of each aggregator of Table 3 against the split's ground truth."""
    from ..config import AGGREGATORS
    from ..evaluate import evaluate_scores
    from ..ops.reference import cdul_aggregate

    labels = cdul_aggregate(cos, logit_scale, zeta, lam, AGGREGATORS)
    return {k: round(evaluate_scores(v.numpy(), ds).map * 100, 2) for k, v in labels.items()}


def tune_zeta(cos: torch.Tensor, ds, logit_scale: float, zetas: tuple[float, ...] = ZETAS) -> tuple[float, dict]:
    """The zeta with the best cdul mAP on ``ds`` (ties: the smallest), and the cdul mAP of every candidate."""
    scores = {z: map_per_aggregator(cos, ds, logit_scale, z)["cdul"] for z in zetas}
    best = max(zetas, key=lambda z: (scores[z], -z))
    return best, {str(z): s for z, s in scores.items()}


def evaluate_clip(clip_dir: str | Path, root: str | Path | None = None, n_train: int = EVAL_N["train"],
             n_test: int = EVAL_N["test"], zetas: tuple[float, ...] = ZETAS, world: str = "shapes",
             log: Callable[[str], None] = say) -> dict:
    """Zero-shot top-1 on held-out single objects; zeta tuned on train; pseudo-label mAP per aggregator on test."""
    import tempfile

    from ..clip.loader import load_clip
    from ..datasets import load_dataset

    clip = load_clip(str(clip_dir), None, device="cpu", precision="fp32")
    w = WORLDS[world]
    imgs, cls, _ = held_out(world=w)
    res: dict = {"world": world,
                 "zero_shot_top1": round(zero_shot_top1(clip.model, clip.tokenizer, imgs, cls, w.classes), 2),
                 "zero_shot_images": len(cls), "grid": GRID, "lam": 1.0}
    log(f"zero-shot top-1 {res['zero_shot_top1']}%")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(root) if root else Path(tmp) / world
        t0 = time.perf_counter()
        train_ds = load_dataset(world, base, "train", n=n_train)
        zeta, per_zeta = tune_zeta(view_cosines(clip, train_ds), train_ds, clip.logit_scale, zetas)
        test_ds = load_dataset(world, base, "test", n=n_test)
        test_cos = view_cosines(clip, test_ds)
        res.update(zeta=zeta, zeta_tuning={"split": "train", "images": n_train, "cdul_map": per_zeta},
                   test_images=n_test, map=map_per_aggregator(test_cos, test_ds, clip.logit_scale, zeta),
                   test_cdul_map_by_zeta=tune_zeta(test_cos, test_ds, clip.logit_scale, zetas)[1])  # report only
        log(f"zeta {zeta} (train cdul mAP {per_zeta}); test mAP {res['map']} in {time.perf_counter() - t0:.0f}s")
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the tiny CLIP from scratch and measure it")
    t.add_argument("--out", required=True, help="folder for open_clip_config.json, weights and train_info.json")
    for name, value in asdict(ClipTrainConfig()).items():
        if name == "world":
            t.add_argument("--world", choices=sorted(WORLDS), default=value, help="the world to train on")
        else:
            t.add_argument(f"--{name}", type=type(value), default=value)
    t.add_argument("--no-eval", action="store_true", help="skip the quality metrics (faster)")
    e = sub.add_parser("eval", help="zero-shot accuracy and pseudo-label mAP of a trained CLIP folder")
    e.add_argument("--clip", default=None, help="CLIP folder (default: the shipped one of --world)")
    e.add_argument("--world", choices=sorted(WORLDS), default="shapes", help="the world to measure on")
    e.add_argument("--root", default=None, help="shapes dataset root (default: a temporary folder)")
    e.add_argument("--n-train", type=int, default=EVAL_N["train"])
    e.add_argument("--n-test", type=int, default=EVAL_N["test"])
    e.add_argument("--zeta", type=float, nargs="+", default=list(ZETAS), help="candidates tuned on train")
    e.add_argument("--update-info", action="store_true", help="merge the metrics into the folder's train_info.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(getattr(args, "threads", 2))
    if args.cmd == "train":
        cfg = ClipTrainConfig(**{k: getattr(args, k) for k in asdict(ClipTrainConfig())})
        info = train(Path(args.out), cfg, measure=not args.no_eval)
    else:
        clip_dir = args.clip or str(Path(__file__).parent / "assets" / SHIPPED[args.world])
        info = evaluate_clip(clip_dir, args.root, args.n_train, args.n_test, tuple(args.zeta), args.world)
        if args.update_info:
            path = Path(clip_dir) / "train_info.json"
            info = {**json.loads(path.read_text(encoding="utf-8")), **info}
            write_text_atomic(path, json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
