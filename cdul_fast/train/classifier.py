"""The classification network: timm architectures by name (ResNet-101 in the paper), ``shapesnet`` or ``clipres``.

``--pretrained`` takes a timm weights tag (``tv2_in1k``, ``a1h_in1k``; torchvision's ``IMAGENET1K_V1/V2`` map to
timm's copies of them) read from the Hugging Face cache, or a local file (.safetensors or a weights-only torch file,
e.g. torchvision's own ResNet checkpoints: timm's ResNets use the same names). Offline and not cached, loading fails
with one line saying which file to pass. timm replaces the ImageNet head by a fresh C-way linear layer.
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

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map [B, 8 width, S/32, S/32] (timm's split, which class activation maps use)."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.pool(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


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

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's last feature map [B, 32 width, S/32, S/32] (timm's split, which class activation maps use)."""
        t = self.trunk
        x = t.stem(x) if hasattr(t, "stem") else t.avgpool(t.act3(t.bn3(t.conv3(t.act2(t.bn2(t.conv2(
            t.act1(t.bn1(t.conv1(x.to(t.conv1.weight.dtype)))))))))))
        return t.layer4(t.layer3(t.layer2(t.layer1(x))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

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


# torchvision's weight names, kept so commands and run folders of 0.1 still work (timm carries the same weights)
TORCHVISION_TAGS = {"IMAGENET1K_V1": "tv_in1k", "IMAGENET1K_V2": "tv2_in1k"}


def _cached_tag_file(name: str) -> Path | None:
    """The weights file of timm's pretrained ``arch.tag`` in the Hugging Face cache, downloaded first when the hub
    can be reached; None when offline and not cached."""
    import timm
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    from ..clip import loader as clip_loader

    repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    files = ("model.safetensors", "pytorch_model.bin")
    for f in files:
        hit = try_to_load_from_cache(repo, f)
        if isinstance(hit, str):
            return Path(hit)
    if not clip_loader._hub_reachable():
        return None
    for f in files:
        try:
            return Path(hf_hub_download(repo, f))
        except Exception:  # noqa: BLE001 - the repo may hold only the other file; the caller reports the miss
            continue
    return None


def _timm_classifier(arch: str, num_classes: int, pretrained: str | None) -> nn.Module:
    """timm builds the model and its ``num_classes`` head; a pretrained state dict is loaded by us (safetensors or
    weights-only torch files, never a pickle) and handed to timm, which drops the mismatched ImageNet head."""
    import timm

    if not timm.is_model(arch):
        raise ConfigError(f"unknown --arch {arch!r}: use a timm model name (resnet101, resnet50, convnext_tiny, ...), "
                          "shapesnet or clipres")
    if not pretrained:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes)
    path = Path(pretrained)
    name = arch
    if path.suffix or path.exists():
        source = path
    else:
        tag = TORCHVISION_TAGS.get(pretrained, pretrained)
        name = arch if tag == "DEFAULT" else f"{arch}.{tag}"
        if name not in timm.list_pretrained(f"{arch}.*") and tag != "DEFAULT":
            known = ", ".join(t.split(".", 1)[1] for t in timm.list_pretrained(f"{arch}.*")[:8]) or "none"
            raise WeightsError(f"--pretrained {pretrained!r} is neither a file nor a timm weights tag of {arch} "
                               f"(tags: {known})")
        source = _cached_tag_file(name)
        if source is None:
            raise WeightsError(f"{name} weights are not in the Hugging Face cache and the hub cannot be reached "
                               "(offline): download them elsewhere and pass --pretrained /path/to/weights.safetensors")
    state = load_state_dict_file(source)
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes,
                                 pretrained_cfg_overlay={"state_dict": state})
    except RuntimeError as exc:  # missing/unexpected keys or shape mismatches: another architecture's weights
        first = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        raise WeightsError(f"{pretrained} does not fit {arch}: {first[:200]}") from exc


def build_classifier(arch: str, num_classes: int, pretrained: str | None = None) -> nn.Module:
    """``arch`` (a timm model name, ``shapesnet`` or ``clipres``) with a ``num_classes``-way head."""
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
    return _timm_classifier(arch, num_classes, pretrained)
