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
METHODS: tuple[str, ...] = ("cdul", "an", "ls", "epr", "role")
"""cdul (KL + latent updates) and the baselines on the same loop: assume negative, label smoothing, EPR, ROLE."""
PRED_SOURCES: tuple[str, ...] = ("eval", "train")
"""Where cdul's latent update takes Y_p: a fixed-network pass after the epoch (paper 3.2) or the training pass."""
TARGETS: tuple[str, ...] = ("soft", "hard")
SCHEDULERS: tuple[str, ...] = ("cosine", "none")
CACHE_MODES: tuple[str, ...] = ("auto", "yes", "no")
PROVIDERS: tuple[str, ...] = ("auto", "cuda", "cpu")


def check_choice(flag: str, value: object, choices: tuple[str, ...]) -> None:
    """One-line error for a value outside its named choices (configs can come from YAML files, not only argparse)."""
    if value not in choices:
        raise ConfigError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")


def check_number(flag: str, value: object, lo: float | None = None, hi: float | None = None,
                 integer: bool = False, optional: bool = False) -> None:
    """One-line error for a value that is not a finite number in [lo, hi] (NaN and inf slip past plain < checks)."""
    import math

    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not integer or float(value).is_integer())
    ok = ok and (lo is None or value >= lo) and (hi is None or value <= hi)
    if not ok:
        span = f" in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ConfigError(f"{flag} must be a finite {'integer' if integer else 'number'}{span}, got {value!r}")


SEED_MAX = 2**63 - 1


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
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {p}: {getattr(exc, 'strerror', None) or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of option: value")
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"config file {p} has unknown keys: {', '.join(unknown)} (valid: {', '.join(sorted(known))})")
    return data


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _typed(key: str, value: object, default: object, source: Path) -> object:
    """A config file's value in the type of the shipped default: YAML 1.1 reads ``1e-3`` as a string and a quoted
    'false' is a (truthy) string, so both are converted; anything else of the wrong type is one line."""
    where = f"config file {source}: {key}"
    if default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}")
    for kinds, what in ((str, "a string"), ((list, tuple), "a list"), (dict, "a mapping of option: value")):
        if isinstance(default, kinds):
            if isinstance(value, kinds):
                return value
            raise ConfigError(f"{where} must be {what}, got {value!r}")
    return value


def resolve(command: str, explicit: dict, config_path: str | None = None) -> dict:
    """defaults < --config file < flags given on the command line."""
    cfg = package_defaults(command)
    if config_path:
        data = load_config_file(config_path, set(cfg) | set(explicit))
        cfg.update({k: _typed(k, v, cfg.get(k), Path(config_path)) for k, v in data.items()})
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
