"""YAML defaults + --config file + command-line overrides, resolved in that order (timm-style), and the named
choices of the options (one home: the CLI, the config dataclasses and the stages take them from here; torch-free, so
``cdul-fast --help`` stays fast)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from .errors import ConfigError

AGGREGATORS: tuple[str, ...] = ("global", "avg", "max", "cdul")
"""Aggregators of Table 3: global only, mean of all views, max over all views, CDUL's min-max + lambda combine."""
OUTPUTS: tuple[str, ...] = ("global", "aggregate", "cdul", "avg", "max")
"""Aggregates the label stage can compute (and store with --save); ``aggregate`` is eq. 6 before the combine."""
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "fp16", "bf16")
METHODS: tuple[str, ...] = ("cdul", "an", "ls", "epr")
"""cdul (KL + latent updates) and the baselines on the same loop: assume negative, label smoothing, EPR."""
TARGETS: tuple[str, ...] = ("soft", "hard")
SCHEDULERS: tuple[str, ...] = ("cosine", "none")
CACHE_MODES: tuple[str, ...] = ("auto", "yes", "no")
PROVIDERS: tuple[str, ...] = ("auto", "cuda", "cpu")


def check_choice(flag: str, value: object, choices: tuple[str, ...]) -> None:
    """One-line error for a value outside its named choices (configs can come from YAML files, not only argparse)."""
    if value not in choices:
        raise ConfigError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")


def package_defaults(command: str) -> dict:
    """The defaults shipped in ``cdul_fast/configs/<command>.yaml`` (empty when the command has none)."""
    res = resources.files("cdul_fast").joinpath("configs", f"{command}.yaml")
    if not res.is_file():
        return {}
    return yaml.safe_load(res.read_text(encoding="utf-8")) or {}


def load_config_file(path: str | Path, known: set[str]) -> dict:
    """A user's YAML config; unknown keys are an error (a typo must not be silently ignored)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {p}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of option: value")
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"config file {p} has unknown keys: {', '.join(unknown)} (valid: {', '.join(sorted(known))})")
    return data


def resolve(command: str, explicit: dict, config_path: str | None = None) -> dict:
    """defaults < --config file < flags given on the command line."""
    cfg = package_defaults(command)
    if config_path:
        cfg.update(load_config_file(config_path, set(cfg) | set(explicit)))
    cfg.update(explicit)
    return cfg


def parse_kv(items: list[str] | None) -> dict:
    """KEY=VALUE pairs (values parsed as YAML scalars: true, 3, 0.5, text)."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"expected KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = yaml.safe_load(value) if value else ""
    return out
