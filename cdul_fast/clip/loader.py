"""Frozen CLIP through open_clip: model names, JSON configs or folders; pretrained tags or local weight files.

``--clip`` accepts an open_clip model name (``RN50x64``, ``ViT-B-32``), the shipped alias ``shapes-clip``, a folder
with ``open_clip_config.json`` and weights (open_clip's ``local-dir`` layout) or a JSON model config file.
``--clip-weights`` accepts a pretrained tag (``openai``, ``laion2b_s34b_b79k``), a local checkpoint (.safetensors,
weights-only .pt/.bin, or OpenAI's TorchScript archive) or ``random`` (seeded random init, for tests).
Offline, a tag that is not in the Hugging Face cache fails at once with one line saying what to pass instead,
rather than retrying for a minute.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..errors import ConfigError, WeightsError

ASSETS = Path(__file__).resolve().parents[1] / "shapes" / "assets"
ALIASES = {"shapes-clip": ASSETS / "shapes-clip", "shapes20-clip": ASSETS / "shapes20-clip"}
DEFAULT_TEMPLATE = "a photo of the {}"
_TEXT_CHUNK = 1024  # prompts per text-encoder call (every class list of VOC, COCO and NUS-WIDE fits one)


@dataclass
class ClipModel:
    """A frozen CLIP ready for labelling: model, tokenizer, preprocessing and identity (for caches and stores)."""

    model: torch.nn.Module
    tokenizer: object
    preprocess_cfg: dict
    name: str
    weights: str
    device: torch.device
    identity: str = ""
    _text_cache: dict = field(default_factory=dict, repr=False)

    @property
    def logit_scale(self) -> float:
        """1/tau: CLIP's learned temperature, used as the softmax scale (paper eq. 2 and 4)."""
        return float(self.model.logit_scale.detach().exp().item())

    @torch.inference_mode()
    def encode_text(self, class_names: list[str] | tuple[str, ...], template: str = DEFAULT_TEMPLATE) -> torch.Tensor:
        """L2-normalized float32 text embeddings [C, K] of the prompts; computed once per (classes, template)."""
        if "{}" not in template:
            raise ConfigError(f"prompt template {template!r} must contain '{{}}' where the class name goes")
        key = (tuple(class_names), template)
        if key not in self._text_cache:
            texts = [template.format(c) for c in class_names]
            _refuse_equal_prompts(self.tokenizer(texts), class_names)
            self._text_cache[key] = torch.nn.functional.normalize(self._encode_prompts(texts), dim=-1)
        return self._text_cache[key]

    @torch.inference_mode()
    def _encode_prompts(self, texts: list[str]) -> torch.Tensor:
        """Raw text embeddings of prompts, in chunks so a large ensemble never becomes one huge batch."""
        tokens = self.tokenizer(texts)
        return torch.cat([self.model.encode_text(tokens[i:i + _TEXT_CHUNK].to(self.device)).float()
                          for i in range(0, len(texts), _TEXT_CHUNK)])

    @property
    def has_image_tower(self) -> bool:
        return getattr(self.model, "visual", None) is not None

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Image embeddings [N, K] (not normalized) of preprocessed images [N, 3, S, S]."""
        if not self.has_image_tower:
            raise ConfigError(f"CLIP {self.name} was loaded without its image encoder (text only)")
        return self.model.encode_image(x)


def _refuse_equal_prompts(tokens: torch.Tensor, class_names: list[str] | tuple[str, ...]) -> None:
    """Prompts longer than CLIP's context are cut by its tokenizer: two classes whose cut prompts are the same token
    ids would get identical score columns, so that is a one-line error naming them, not a silent merge."""
    first: dict[bytes, int] = {}
    for i, row in enumerate(tokens.to(torch.int64).numpy()):
        j = first.setdefault(row.tobytes(), i)
        if j != i:
            n = tokens.shape[1]
            raise ConfigError(f"classes {class_names[j]!r} and {class_names[i]!r} give the same prompt after CLIP's "
                              f"{n}-token context cuts it: shorten the names or the template so they differ early")


def _file_identity(path: Path) -> str:
    """Content hash of a weights file: a copied or re-installed file keeps its identity, other weights do not."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Quick check that the Hugging Face endpoint answers, so offline machines fail fast instead of retrying."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_tag_file(tag_cfg: dict, cache_dir: str | None) -> str | None:
    """The locally cached weight file of an open_clip pretrained tag, or None."""
    hub = tag_cfg.get("hf_hub", "")
    if not hub:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo_id, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
    names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    if filename.endswith(".bin"):
        names.insert(0, filename[: -len(".bin")] + ".safetensors")
    for name in names:
        hit = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    return None


def _read_json_config(path: Path) -> tuple[dict, dict]:
    """(model_cfg, preprocess_cfg) from an open_clip_config.json-style file or a bare open_clip model config."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read CLIP config {path}: {exc}") from exc
    model_cfg = data.get("model_cfg", data)
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_cfg]
    if missing:
        raise ConfigError(f"CLIP config {path} lacks {', '.join(missing)} (expected an open_clip model config)")
    return model_cfg, data.get("preprocess_cfg", {})


def _load_weights_file(model: torch.nn.Module, path: Path) -> None:
    """Load a local checkpoint safely (safetensors, weights-only torch, or TorchScript) with a one-line error."""
    import open_clip

    if not path.is_file():
        raise WeightsError(f"CLIP weights file not found: {path}")
    try:
        if zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()):
            # OpenAI's original .pt files are TorchScript archives: no pickled Python objects to execute.
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
            for key in ("input_resolution", "context_length", "vocab_size"):
                state.pop(key, None)
            model.load_state_dict(state, strict=True)
        else:
            open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    except WeightsError:
        raise
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:300]
        raise WeightsError(f"CLIP weights {path} do not fit the model: {first}") from exc
    except Exception as exc:  # unpickling refused, corrupt archive, bad safetensors header, ...
        raise WeightsError(f"cannot load CLIP weights {path}: {type(exc).__name__}: {exc}") from exc


def _load_local_dir(folder: Path, precision: str, device: torch.device):
    """(model, tokenizer, preprocess cfg, weights file) through open_clip's ``local-dir:`` loading: its config and
    preprocessing, its rule for which checkpoint of the folder to take (recorded in the store's CLIP identity), and
    its weights-only load."""
    import open_clip
    from open_clip.factory import _find_checkpoint_in_dir

    if not (folder / "open_clip_config.json").is_file():
        raise ConfigError(f"CLIP folder {folder} has no open_clip_config.json")
    checkpoint = _find_checkpoint_in_dir(folder)
    if checkpoint is None:
        raise WeightsError(f"CLIP folder {folder} holds no weights (*.safetensors, *.bin, *.pth)")
    spec = f"local-dir:{folder.resolve()}"
    try:
        model = open_clip.create_model(spec, precision=precision, device=device, require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(spec)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"CLIP folder {folder}: {str(exc).splitlines()[0][:300]}") from exc
    except RuntimeError as exc:
        raise WeightsError(f"CLIP weights {checkpoint} do not fit the model: {str(exc).splitlines()[0][:300]}") from exc
    except Exception as exc:  # noqa: BLE001 - unpickling refused, corrupt archive, bad safetensors header, ...
        raise WeightsError(f"cannot load CLIP weights {checkpoint}: {type(exc).__name__}: {exc}") from exc
    pre_cfg = {k: v for k, v in (getattr(model.visual, "preprocess_cfg", {}) or {}).items() if k != "size"}
    return model, tokenizer, pre_cfg, checkpoint  # size: from model.visual.image_size, as for the other branches


def _tokenizer_for(model_cfg: dict):
    import open_clip

    text_cfg = model_cfg.get("text_cfg", {})
    if text_cfg.get("hf_tokenizer_name"):
        raise ConfigError("CLIP configs with Hugging Face tokenizers need a model name or hf-hub: path, not a JSON")
    return open_clip.tokenizer.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))


def _build_from_config(model_cfg: dict, precision: str, device: torch.device) -> torch.nn.Module:
    import open_clip

    cfg = dict(model_cfg)
    custom_text = cfg.pop("custom_text", False)
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    try:
        model = cls(**cfg, cast_dtype=open_clip.get_cast_dtype(precision))
    except TypeError as exc:
        raise ConfigError(f"invalid open_clip model config: {exc}") from exc
    return model.to(device)


def load_clip(
    clip: str,
    weights: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    seed: int = 0,
    cache_dir: str | None = None,
    text_only: bool = False,
) -> ClipModel:
    """Load a frozen CLIP in eval mode; see the module docstring for the accepted ``clip``/``weights`` values.

    ``text_only`` drops the image tower right after loading: re-scoring stored embeddings needs only the text side,
    and the image tower (most of RN50x64's weights) is freed before any work starts and can never run."""
    import open_clip

    device = torch.device(device)
    if precision not in ("fp32", "fp16", "bf16"):
        raise ConfigError(f"--clip-precision must be fp32, fp16 or bf16, got {precision!r}")
    target = ALIASES.get(clip, Path(clip))
    if clip in ALIASES and not target.is_dir():
        raise WeightsError(f"the shipped CLIP {clip!r} is missing from the installation ({target})")

    if target.is_dir() and weights is None:  # open_clip's own local-dir: layout, weights file and tokenizer
        model, tokenizer, pre_cfg, weights = _load_local_dir(target, precision, device)
        name = clip
    elif target.is_dir() or target.suffix == ".json":
        if target.is_dir():
            cfg_path = target / "open_clip_config.json"
            if not cfg_path.is_file():
                raise ConfigError(f"CLIP folder {target} has no open_clip_config.json")
        else:
            cfg_path = target
            if not cfg_path.is_file():
                raise ConfigError(f"CLIP config file not found: {cfg_path}")
        model_cfg, pre_cfg = _read_json_config(cfg_path)
        torch.manual_seed(seed)
        model = _build_from_config(model_cfg, precision, device)
        if weights is None:
            raise WeightsError(
                f"no weights for CLIP config {cfg_path}: pass --clip-weights FILE, or --clip-weights random for a "
                "seeded random model (tests only)"
            )
        if weights != "random":
            _load_weights_file(model, Path(weights))
        tokenizer = _tokenizer_for(model_cfg)
        name = clip
    else:
        if clip not in open_clip.list_models():
            raise ConfigError(
                f"unknown CLIP {clip!r}: not an open_clip model name, a folder or a .json config "
                f"(e.g. RN50x64, ViT-B-32, shapes-clip)"
            )
        tags = open_clip.list_pretrained_tags_by_model(clip)
        if weights is None:
            weights = "openai" if "openai" in tags else (tags[0] if tags else None)
            if weights is None:
                raise WeightsError(f"open_clip has no pretrained tag for {clip}; pass --clip-weights FILE")
        kwargs: dict = {"precision": precision, "device": device, "cache_dir": cache_dir}
        if weights == "random":
            torch.manual_seed(seed)
            model = open_clip.create_model(clip, pretrained=None, **kwargs)
        elif weights in tags:
            tag_cfg = open_clip.get_pretrained_cfg(clip, weights)
            local = _cached_tag_file(tag_cfg, cache_dir)
            if local is None and not _hub_reachable():
                raise WeightsError(
                    f"CLIP weights {clip}/{weights} are not in the local cache and the Hugging Face hub cannot be "
                    f"reached (offline): pass --clip-weights /path/to/{clip}-{weights}.safetensors (or .pt), or "
                    "fetch them into the HF cache on a connected machine"
                )
            pre = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
            try:
                model = open_clip.create_model(
                    clip,
                    pretrained=local or weights,
                    force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
                    force_preprocess_cfg=pre or None,
                    **kwargs,
                )
            except Exception as exc:
                raise WeightsError(f"cannot load CLIP {clip}/{weights}: {exc}") from exc
        else:
            path = Path(weights)
            if not path.is_file():
                raise WeightsError(
                    f"--clip-weights {weights!r} is neither a pretrained tag of {clip} "
                    f"({', '.join(tags) or 'none'}) nor an existing file"
                )
            model = open_clip.create_model(clip, pretrained=None, **kwargs)
            _load_weights_file(model, path)
        tokenizer = open_clip.get_tokenizer(clip)
        pre_cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
        name = clip

    size = model.visual.image_size
    pre_cfg = {"size": size[0] if isinstance(size, (tuple, list)) else size, **pre_cfg}
    model.eval().requires_grad_(False)
    if text_only:
        model.visual = None
    if weights == "random":
        ident = f"{name}|random|{seed}"
    elif Path(weights).is_file():
        ident = f"{name}|{_file_identity(Path(weights))}"
    else:
        ident = f"{name}|{weights}"
    return ClipModel(
        model=model,
        tokenizer=tokenizer,
        preprocess_cfg=pre_cfg,
        name=name,
        weights=weights,
        device=device,
        identity=hashlib.sha256(ident.encode()).hexdigest()[:16],
    )
