"""Train (and evaluate) the tiny CLIP shipped as ``shapes-clip``: a contrastive image-text model of the shapes world.

    python -m cdul_fast.shapes_clip train --out cdul_fast/assets/shapes-clip     # ~7 min on 2 CPU cores
    python -m cdul_fast.shapes_clip eval --clip cdul_fast/assets/shapes-clip

Images are single-object renders (``datasets.shapes.render_single``) passed through JPEG like the dataset files;
captions are "a photo of the {class}" and "a photo of the {colour} {class}". The loss is the symmetric contrastive
loss of CLIP with every correct caption counted as a positive (several images in a batch share a caption). Seeded
and single-process, so a rerun on the same machine reproduces the weights; across machines/BLAS builds the numbers
agree within the tolerance stated in docs/shapes.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .datasets.shapes import CLASSES, COLOURS, jpeg_roundtrip, render_single
from .views import OPENAI_MEAN, OPENAI_STD

MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
PREPROCESS_CFG = {"size": 64, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "interpolation": "bicubic",
                  "resize_mode": "shortest"}
TEMPLATE = "a photo of the {}"


def captions() -> tuple[list[str], np.ndarray]:
    """All prompts (plain per class, then colour x class) and, per (class, colour), the two correct prompt indices."""
    colours = list(COLOURS)
    texts = [TEMPLATE.format(c) for c in CLASSES]
    texts += [TEMPLATE.format(f"{k} {c}") for c in CLASSES for k in colours]
    pos = np.zeros((len(CLASSES), len(colours), 2), dtype=np.int64)
    for ci in range(len(CLASSES)):
        for ki in range(len(colours)):
            pos[ci, ki] = (ci, len(CLASSES) + ci * len(colours) + ki)
    return texts, pos


def make_pool(n: int, seed: int, size: int = 64) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """uint8 [n, 3, S, S] single-object images (drawn at 40-64 px, resized to S like a snippet is), classes, colours."""
    from PIL import Image

    rng = np.random.default_rng([seed, 7919])
    colours = list(COLOURS)
    imgs = np.empty((n, 3, size, size), dtype=np.uint8)
    cls = np.empty(n, dtype=np.int64)
    col = np.empty(n, dtype=np.int64)
    for i in range(n):
        c = int(rng.integers(len(CLASSES)))
        img, colour = render_single(rng, int(rng.choice([40, 48, 56, 64])), c)
        img = jpeg_roundtrip(img).resize((size, size), Image.Resampling.BICUBIC)
        imgs[i] = np.asarray(img).transpose(2, 0, 1)
        cls[i], col[i] = c, colours.index(colour)
    return torch.from_numpy(imgs), cls, col


def _normalize(x: torch.Tensor) -> torch.Tensor:
    m = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (x.float() / 255.0 - m) / s


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with multiple positives: ``match`` [B, T] marks every correct (image, caption) pair."""
    logits = scale * img @ txt.t()
    m = match.float()
    i2t = -(F.log_softmax(logits, dim=1) * m / m.sum(1, keepdim=True)).sum(1).mean()
    used = m.sum(0) > 0
    lt = logits.t()[used]
    mt = m.t()[used]
    t2i = -(F.log_softmax(lt, dim=1) * mt / mt.sum(1, keepdim=True)).sum(1).mean()
    return 0.5 * (i2t + t2i)


def build_model(seed: int):
    import open_clip

    torch.manual_seed(seed)
    return open_clip.CLIP(**MODEL_CFG), open_clip.tokenizer.SimpleTokenizer(
        context_length=MODEL_CFG["text_cfg"]["context_length"])


@torch.no_grad()
def zero_shot_top1(model, tokenizer, imgs: torch.Tensor, cls: np.ndarray) -> float:
    model.eval()
    txt = F.normalize(model.encode_text(tokenizer([TEMPLATE.format(c) for c in CLASSES])), dim=-1)
    hits = 0
    for i in range(0, len(imgs), 256):
        f = F.normalize(model.encode_image(_normalize(imgs[i:i + 256])), dim=-1)
        hits += int(((f @ txt.t()).argmax(1).numpy() == cls[i:i + 256]).sum())
    return 100.0 * hits / len(imgs)


def train(out: Path, steps: int = 1200, batch: int = 128, lr: float = 2e-3, pool: int = 6000, seed: int = 0,
          log_every: int = 100, threads: int = 2) -> dict:
    """Train from scratch and write open_clip_config.json, open_clip_model.safetensors (fp16) and train_info.json."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model, tok = build_model(seed)
    texts, pos = captions()
    tokens = tok(texts)
    imgs, cls, col = make_pool(pool, seed)
    held_imgs, held_cls, _ = make_pool(600, seed + 1)
    print(f"data: {pool} training / 600 held-out single-object images in {time.perf_counter() - t0:.0f}s", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, pool, (batch,), generator=g)
        x = imgs[idx]
        flip = torch.rand(batch, generator=g) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        match = torch.zeros(batch, len(texts))
        p = torch.from_numpy(pos[cls[idx.numpy()], col[idx.numpy()]])
        match.scatter_(1, p, 1.0)
        img = F.normalize(model.encode_image(_normalize(x)), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        loss = contrastive_loss(img, txt, model.logit_scale.exp().clamp(max=100), match)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            scale = float(model.logit_scale.detach().exp())
            print(f"step {step}/{steps} loss {float(loss.detach()):.4f} scale {scale:.1f} "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "open_clip_model.safetensors"
    _save_fp16(model, weights)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG},
                                                          indent=2) + "\n", encoding="utf-8")
    reloaded = _reload(weights, seed)
    info = {
        "seed": seed, "steps": steps, "batch": batch, "lr": lr, "pool": pool, "train_seconds": round(seconds, 1),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {threads} threads",
        "torch": torch.__version__, "parameters": sum(p.numel() for p in model.parameters()),
        "zero_shot_top1": round(zero_shot_top1(reloaded, tok, held_imgs, held_cls), 2),
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    (out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def _save_fp16(model, path: Path) -> None:
    """Weights in fp16 (the file stays a few MB); the loader casts them into the fp32 model."""
    from safetensors.torch import save_file

    tmp = path.with_name("." + path.name + ".tmp")
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)


def _reload(weights: Path, seed: int):
    from safetensors.torch import load_file

    model, _ = build_model(seed)
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


def evaluate(clip_dir: str, n_test: int = 300, root: str | None = None, zetas: tuple[float, ...] = (0.3,)) -> dict:
    """Zero-shot top-1 on held-out single objects and pseudo-label mAP per aggregator on the multi-object test split."""
    import tempfile

    from .clip_loader import load_clip
    from .datasets import load_dataset
    from .evaluate import evaluate_store
    from .label import LabelConfig, run_label

    clip = load_clip(clip_dir, None, device="cpu", precision="fp32")
    imgs, cls, _ = make_pool(600, 1)
    res = {"zero_shot_top1": round(zero_shot_top1(clip.model, clip.tokenizer, imgs, cls), 2)}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(root) if root else Path(tmp) / "shapes"
        ds = load_dataset("shapes", base, "test", n=n_test)
        for zeta in zetas:
            out = Path(tmp) / f"z{zeta}.cdul"
            run_label(LabelConfig(out=str(out), dataset="shapes", root=str(base), split="test",
                                  dataset_options={"n": n_test}, clip=clip_dir, zeta=zeta,
                                  save=("global", "avg", "max", "cdul"), progress=False, device="cpu"),
                      log=lambda s: None, dataset=ds, clip=clip)
            reports, _ = evaluate_store(out, ds, ["global", "avg", "max", "cdul"])
            res[f"map_zeta_{zeta}"] = {k: round(r.map * 100, 2) for k, r in reports.items()}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the tiny CLIP from scratch")
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, default=1200)
    t.add_argument("--batch", type=int, default=128)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--pool", type=int, default=6000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    e = sub.add_parser("eval", help="zero-shot accuracy and pseudo-label mAP of a trained CLIP folder")
    e.add_argument("--clip", default=str(Path(__file__).parent / "assets" / "shapes-clip"))
    e.add_argument("--n-test", type=int, default=300)
    e.add_argument("--zeta", type=float, nargs="+", default=[0.3])
    args = ap.parse_args()
    if args.cmd == "train":
        info = train(Path(args.out), args.steps, args.batch, args.lr, args.pool, args.seed, threads=args.threads)
        print(json.dumps(info, indent=2))
        print(json.dumps(evaluate(args.out), indent=2))
    else:
        print(json.dumps(evaluate(args.clip, args.n_test, zetas=tuple(args.zeta)), indent=2))


if __name__ == "__main__":
    main()
