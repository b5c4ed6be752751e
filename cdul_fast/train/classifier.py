"""The classification network: torchvision architectures by name (ResNet-101 in the paper) or the small `shapesnet`.

``--pretrained`` takes a torchvision weights tag (``DEFAULT``, ``IMAGENET1K_V2``) or a local file (.safetensors or a
weights-only torch file). Tags are read from torch's hub cache when present; offline and not cached, loading fails
with one line saying which file to pass. The ImageNet head is replaced by a fresh C-way linear layer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, WeightsError
from .checkpoint import load_state_dict_file

SMALL_ARCHS = ("shapesnet", "clipres")


class ShapesNet(nn.Module):
    """A 5-stage conv net (~1.2M parameters, global max pooling) that trains in seconds per epoch on a CPU at 64 px."""

    def __init__(self, num_classes: int, width: int = 32, dropout: float = 0.1) -> None:
        super().__init__()
        chans = [width, width * 2, width * 4, width * 8]
        layers: list[nn.Module] = [nn.Conv2d(3, chans[0], 3, 2, 1, bias=False), nn.BatchNorm2d(chans[0]),
                                   nn.ReLU(inplace=True)]
        cin = chans[0]
        for c in chans:
            layers += [nn.Conv2d(cin, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.Conv2d(c, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            cin = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveMaxPool2d(1)  # small objects anywhere: max keeps a local detection, avg dilutes it
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.pool(self.features(x)).flatten(1)))


class ClipResNet(nn.Module):
    """The convolutional trunk of an open_clip ModifiedResNet (e.g. the shipped shapes-clip) + max pool + linear head.

    With ``--pretrained shapes-clip`` the trunk starts from the shipped CLIP's image encoder, the way the paper's
    ResNet-101 starts from ImageNet: features learned without any multi-label annotation. The attention pool is
    dropped so any input size works.
    """

    def __init__(self, num_classes: int, clip_cfg: dict | None = None) -> None:
        super().__init__()
        from open_clip.modified_resnet import ModifiedResNet

        vc = (clip_cfg or _shapes_clip_cfg())["vision_cfg"]
        width = int(vc["width"])
        trunk = ModifiedResNet(layers=vc["layers"], output_dim=8, heads=1, image_size=int(vc["image_size"]),
                               width=width)
        trunk.attnpool = nn.Identity()
        self.trunk = trunk
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(width * 32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        x = t.stem(x) if hasattr(t, "stem") else t.avgpool(t.act3(t.bn3(t.conv3(t.act2(t.bn2(t.conv2(
            t.act1(t.bn1(t.conv1(x.to(t.conv1.weight.dtype)))))))))))
        x = t.layer4(t.layer3(t.layer2(t.layer1(x))))
        return self.fc(self.pool(x).flatten(1))

    def load_clip_visual(self, clip_state: dict[str, torch.Tensor]) -> None:
        """Copy ``visual.*`` trunk weights of a CLIP state dict (attention pool excluded)."""
        trunk = {k[len("visual."):]: v for k, v in clip_state.items()
                 if k.startswith("visual.") and not k.startswith("visual.attnpool.")}
        missing, unexpected = self.trunk.load_state_dict(trunk, strict=False)
        if unexpected or [m for m in missing if not m.startswith("attnpool")]:
            raise WeightsError(f"CLIP weights do not fit the clipres trunk ({len(missing)} missing, "
                               f"{len(unexpected)} unexpected)")


def _shapes_clip_cfg() -> dict:
    import json

    from ..clip.loader import ALIASES

    cfg = json.loads((ALIASES["shapes-clip"] / "open_clip_config.json").read_text(encoding="utf-8"))
    return cfg.get("model_cfg", cfg)


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """Swap the final linear layer of common torchvision families (resnet fc, convnext/effnet classifier, vit)."""
    if isinstance(getattr(model, "fc", None), nn.Linear):
        model.fc = nn.Linear(model.fc.in_features, num_classes)
        return
    head = getattr(model, "classifier", None)
    if isinstance(head, nn.Sequential) and isinstance(head[-1], nn.Linear):
        head[-1] = nn.Linear(head[-1].in_features, num_classes)
        return
    if isinstance(head, nn.Linear):
        model.classifier = nn.Linear(head.in_features, num_classes)
        return
    heads = getattr(model, "heads", None)
    if heads is not None and isinstance(getattr(heads, "head", None), nn.Linear):
        heads.head = nn.Linear(heads.head.in_features, num_classes)
        return
    raise ConfigError(f"don't know how to replace the head of {type(model).__name__}; use a resnet/convnext/vit arch")


def _tag_state_dict(arch: str, tag: str) -> dict[str, torch.Tensor]:
    import os

    import torchvision

    try:
        weights = torchvision.models.get_model_weights(arch)[tag]
    except (KeyError, ValueError) as exc:
        raise WeightsError(f"--pretrained {tag!r} is not a torchvision weights tag of {arch} (try DEFAULT or a file "
                           "path)") from exc
    url = weights.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if cached.is_file():
        return load_state_dict_file(cached)
    try:
        return torch.hub.load_state_dict_from_url(url, progress=False, weights_only=True)
    except Exception as exc:  # offline: DNS/connection errors
        raise WeightsError(f"{arch} weights {tag} are not cached and cannot be downloaded ({type(exc).__name__}); "
                           f"download {url} elsewhere and pass --pretrained /path/to/{os.path.basename(url)}") from exc


def build_classifier(arch: str, num_classes: int, pretrained: str | None = None) -> nn.Module:
    """``arch`` (a torchvision model name or ``shapesnet``) with a ``num_classes``-way head."""
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if arch == "shapesnet":
        if pretrained:
            raise ConfigError("shapesnet has no pretrained weights; omit --pretrained")
        return ShapesNet(num_classes)
    if arch == "clipres":
        model = ClipResNet(num_classes)
        if pretrained:
            from ..clip.loader import ALIASES

            src = ALIASES.get(pretrained, Path(pretrained))
            if src.is_dir():
                files = sorted(src.glob("*.safetensors"))
                if not files:
                    raise WeightsError(f"{src} holds no .safetensors weights")
                src = files[0]
            model.load_clip_visual({k: v.float() for k, v in load_state_dict_file(src).items()})
        return model
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(f"unknown --arch {arch!r}: use a torchvision classification model (resnet101, resnet50, "
                          "convnext_tiny, ...) or shapesnet")
    model = torchvision.models.get_model(arch, weights=None)
    if pretrained:
        path = Path(pretrained)
        state = load_state_dict_file(path) if path.suffix or path.exists() else _tag_state_dict(arch, pretrained)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise WeightsError(f"{pretrained} does not fit {arch}: {str(exc).splitlines()[1].strip()[:200]}") from exc
        if len(missing) > 4 or len(unexpected) > 4:  # a head mismatch is fine, a different architecture is not
            raise WeightsError(f"{pretrained} does not fit {arch}: {len(missing)} missing and {len(unexpected)} "
                               f"unexpected keys (e.g. {(missing or unexpected)[:3]})")
    _replace_head(model, num_classes)
    return model
