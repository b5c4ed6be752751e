"""One home for defaults: the YAML files the CLI reads, the config dataclasses and the CLI flags agree."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from cdul_fast.cli import build_parser
from cdul_fast.config import package_defaults
from cdul_fast.discover.trainer import DiscoverConfig
from cdul_fast.label.pipeline import LabelConfig
from cdul_fast.label.rescore import RescoreConfig
from cdul_fast.report.build import ReportConfig
from cdul_fast.train.trainer import TrainConfig

RUNTIME_ONLY = {"out", "labels", "source", "resume", "overwrite", "progress"}  # per run, never a default in a file
UNSET = {"rescore": "the source store's"}  # what --help says for a null default (else "none")
SET_THROUGH = {"dataset_options": "--dataset-opt", "test_dataset_options": None}  # not flags of their own


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command,cls", [("label", LabelConfig), ("train", TrainConfig),
                                         ("rescore", RescoreConfig), ("report", ReportConfig),
                                         ("discover", DiscoverConfig)])
def test_yaml_defaults_equal_the_dataclass_defaults(command, cls):
    yaml_defaults = package_defaults(command)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(yaml_defaults) == set(fields) - RUNTIME_ONLY
    differ = {}
    for key, value in yaml_defaults.items():
        want = _default(fields[key])
        if (list(want) if isinstance(want, tuple) else want) != value:
            differ[key] = (value, want)
    assert not differ, f"configs/{command}.yaml vs {cls.__name__} (yaml, dataclass): {differ}"


@pytest.mark.parametrize("command", ["label", "train", "predict", "rescore", "tags", "report", "discover"])
def test_every_default_has_a_flag_that_shows_it(command):
    actions = {a.dest: a for a in _subparser(command)._actions}
    for key, value in package_defaults(command).items():
        if key in SET_THROUGH:
            continue
        assert key in actions, f"configs/{command}.yaml key {key!r} has no --flag"
        act = actions[key]
        if not isinstance(act, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            shown = value if value not in (None, [], {}) else UNSET.get(command, "none")
            assert f"(default: {shown})" in act.help, (key, act.help)
        else:  # a boolean default on, switched off by a --no-... flag (and the reverse)
            assert isinstance(act, argparse._StoreFalseAction) == bool(value), key
