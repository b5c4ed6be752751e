"""The discovery network (Jia et al., Fig. 1, single-modal): encoder f -> z, fusion eta -> z-bar (identity for one
modality), MLP projection h -> L2-normalized z-hat for the contrastive losses, and two heads on z-bar: phi^l (known
classes, linear) and phi^u (novel classes: linear, or the MLP the paper's section 3.2 describes). ``encoders`` is a
dict so a second modality (audio) plugs in with eta a learned fusion of the concatenated features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


class SmallConv(nn.Module):
    """A 3-layer CNN for small grey images (digits 8 x 8, shapes thumbnails): -> ``dim`` non-negative features."""

    def __init__(self, in_ch: int = 1, dim: int = 128, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_ch, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, 4 * width, 3, 2, 1, bias=False), nn.BatchNorm2d(4 * width), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(16 * width, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ResNet18(nn.Module):
    """The paper's image encoder (section 4, "to follow [18, 16]"): torchvision's ResNet-18 with the CIFAR stem (3 x 3
    stride-1 first convolution, no max-pool, so 32 px images keep an 4 x 4 last map), 512 pooled features, and a
    linear map to ``dim`` when ``dim`` is not 512. Randomly initialized: the paper trains it from scratch."""

    def __init__(self, in_ch: int = 3, dim: int = 512) -> None:
        super().__init__()
        from torchvision.models import resnet18

        net = resnet18(num_classes=1)
        net.conv1 = nn.Conv2d(in_ch, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
        net.fc = nn.Identity() if dim == 512 else nn.Linear(512, dim)
        self.net = net
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EmbeddingMLP(nn.Module):
    """Encoder for precomputed embeddings (a label store's CLIP image embeddings): a 2-layer MLP -> ``dim``."""

    def __init__(self, in_dim: int, dim: int = 128, hidden: int = 512) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


ENCODERS = ("auto", "small", "resnet18", "mlp")


def make_encoder(name: str, modality: str, in_shape: tuple[int, ...], dim: int, auto: str = "small") -> nn.Module:
    """The encoder f for one modality; ``auto`` = the data's own choice (an MLP for embeddings, ResNet-18 for the
    paper's benchmarks, the small CNN for digits and shapes, which must train in minutes on a CPU)."""
    if name == "auto":
        name = auto
    if (name == "mlp") != (modality == "embedding"):
        raise ConfigError(f"--encoder {name} does not fit {modality} inputs: mlp is for embeddings, small and "
                          "resnet18 for images")
    if name == "mlp":
        return EmbeddingMLP(in_shape[0], dim)
    return ResNet18(in_shape[0], dim) if name == "resnet18" else SmallConv(in_shape[0], dim)


class DiscoveryNet(nn.Module):
    def __init__(self, encoders: dict[str, nn.Module], feat_dim: int, known: int, novel: int,
                 proj_dim: int = 128, head_hidden: int = 0) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        width = feat_dim * len(encoders)
        self.eta = nn.Identity() if len(encoders) == 1 else nn.Sequential(nn.Linear(width, feat_dim), nn.ReLU())
        self.proj = nn.ModuleDict({m: nn.Sequential(nn.Linear(feat_dim, feat_dim), nn.ReLU(inplace=True),
                                                    nn.Linear(feat_dim, proj_dim)) for m in encoders})
        self.head_known = nn.Linear(feat_dim, known)
        # phi^u: "a non-linear function mapping z-bar into C^u dimensions followed by softmax" (section 3.2)
        self.head_novel = (nn.Sequential(nn.Linear(feat_dim, head_hidden), nn.BatchNorm1d(head_hidden),
                                         nn.ReLU(inplace=True), nn.Linear(head_hidden, novel))
                           if head_hidden else nn.Linear(feat_dim, novel))

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """z-bar [B, d], z-hat per modality [B, proj], logits of both heads."""
        z = {m: enc(inputs[m]) for m, enc in self.encoders.items()}
        zbar = self.eta(torch.cat([z[m] for m in self.encoders], dim=1))
        out = {"zbar": zbar, "known": self.head_known(zbar), "novel": self.head_novel(zbar)}
        for m in self.encoders:
            out[f"zhat_{m}"] = F.normalize(self.proj[m](z[m]), dim=1)
        return out
