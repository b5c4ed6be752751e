"""Class prompts beyond one template: template ensembles and class synonyms, averaged as in CLIP's zero-shot recipe.

The paper scores each class with one prompt, ``"a photo of the {}"``. CLIP's own zero-shot recipe averages the
L2-normalized text embeddings of several templates per class (and re-normalizes); synonyms are averaged the same way,
over every (template, name) pair of the class. With one template and no synonyms the embedding is exactly the
single-prompt one, so the paper's setting stays bit-for-bit what it was.

File formats (UTF-8, one entry per line, blank lines and lines starting with ``#`` ignored):

- templates file: one template per line, each with ``{}`` where the class name goes;
- synonyms file: ``name: synonym | synonym`` per line; ``name`` must be one of the classes, and its prompts use the
  name itself plus the synonyms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError
from ..fsutil import read_user_text
from .loader import DEFAULT_TEMPLATE, ClipModel


@dataclass(frozen=True)
class Prompts:
    """How class names become text embeddings: the templates to average and each class's extra names."""

    templates: tuple[str, ...] = (DEFAULT_TEMPLATE,)
    synonyms: dict[str, tuple[str, ...]] = field(default_factory=dict)
    ensemble: bool = False  # the templates came from a file (recorded as a list even when it holds one line)

    def meta(self) -> dict:
        """What a store records about its prompts: the single template as before, plus only what is not default
        (so stores of the paper's setting keep the metadata older versions wrote and resume with)."""
        out: dict = {"template": self.templates[0] if not self.ensemble else None}
        if self.ensemble:
            out["templates"] = list(self.templates)
        if self.synonyms:
            out["synonyms"] = {k: list(v) for k, v in sorted(self.synonyms.items())}
        return out

    def names_of(self, cls: str) -> tuple[str, ...]:
        return (cls, *self.synonyms.get(cls, ()))


def _lines(path: str | Path, what: str) -> list[tuple[int, str]]:
    text = read_user_text(path, what)
    out = [(n, ln.strip()) for n, ln in enumerate(text.splitlines(), 1)]
    return [(n, ln) for n, ln in out if ln and not ln.startswith("#")]


def read_templates(path: str | Path) -> tuple[str, ...]:
    """Templates of an ensemble file; each must hold ``{}`` once and no other braces."""
    out = []
    for n, line in _lines(path, "templates"):
        if line.count("{}") != 1 or line.replace("{}", "").count("{") or line.replace("{}", "").count("}"):
            raise ConfigError(f"{path}:{n}: a template needs exactly one '{{}}' for the class name (and no other "
                              f"braces), got {line!r}")
        out.append(line)
    if not out:
        raise ConfigError(f"templates file {path} holds no template")
    if len(set(out)) != len(out):
        raise ConfigError(f"templates file {path} lists a template twice")
    return tuple(out)


def read_synonyms(path: str | Path, class_names: tuple[str, ...] | list[str]) -> dict[str, tuple[str, ...]]:
    """``name: synonym | synonym`` lines for names among ``class_names``."""
    known = set(class_names)
    out: dict[str, tuple[str, ...]] = {}
    for n, line in _lines(path, "synonyms"):
        name, sep, rest = line.partition(":")
        name = name.strip()
        syns = tuple(s.strip() for s in rest.split("|") if s.strip())
        if not sep or not name or not syns:
            raise ConfigError(f"{path}:{n}: expected 'name: synonym | synonym', got {line!r}")
        if name not in known:
            raise ConfigError(f"{path}:{n}: {name!r} is not one of the {len(known)} classes")
        if name in out:
            raise ConfigError(f"{path}:{n}: {name!r} has synonyms on two lines; put them on one")
        if len(set(syns)) != len(syns) or name in syns:
            raise ConfigError(f"{path}:{n}: {name!r} lists a synonym twice (or itself)")
        out[name] = syns
    return out


def make_prompts(class_names: tuple[str, ...] | list[str], template: str = DEFAULT_TEMPLATE,
                 templates_file: str | Path | None = None, synonyms_file: str | Path | None = None) -> Prompts:
    """Prompts from the ``--template`` / ``--templates`` / ``--synonyms`` options."""
    if "{}" not in template:
        raise ConfigError(f"prompt template {template!r} must contain '{{}}' where the class name goes")
    templates = read_templates(templates_file) if templates_file else (template,)
    synonyms = read_synonyms(synonyms_file, class_names) if synonyms_file else {}
    return Prompts(templates, synonyms, ensemble=templates_file is not None)


def prompts_from_meta(meta: dict) -> Prompts:
    """The prompts a store was labelled with (its metadata), for re-scoring with the same text side."""
    templates = meta.get("templates")
    synonyms = {k: tuple(v) for k, v in (meta.get("synonyms") or {}).items()}
    if templates:
        return Prompts(tuple(templates), synonyms, ensemble=True)
    return Prompts((meta.get("template") or DEFAULT_TEMPLATE,), synonyms)


def encode_classes(clip: ClipModel, class_names: tuple[str, ...] | list[str], prompts: Prompts) -> torch.Tensor:
    """L2-normalized float32 class embeddings [C, K]: the normalized mean over every (template, name) prompt of a
    class of the normalized prompt embeddings; one prompt per class is ``clip.encode_text`` itself."""
    names = [prompts.names_of(c) for c in class_names]
    if len(prompts.templates) == 1 and not prompts.synonyms:
        return clip.encode_text(list(class_names), prompts.templates[0])
    flat = [v for vs in names for v in vs]
    owner = torch.tensor([i for i, vs in enumerate(names) for _ in vs], device=clip.device)
    total = None
    for t in prompts.templates:
        emb = clip.encode_text(flat, t)  # [P, K], normalized
        per_class = torch.zeros(len(class_names), emb.shape[1], device=emb.device).index_add_(0, owner, emb)
        total = per_class if total is None else total + per_class
    return torch.nn.functional.normalize(total, dim=-1)
