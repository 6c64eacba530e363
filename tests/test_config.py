"""Config system: defaults < YAML < CLI, strict keys and types, docstrings for every field, reproducible dumps."""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from rlhfkit.cli import COMMANDS
from rlhfkit.config import (OptimConfig, RunConfig, coerce, field_docs, help_text, load_config, parse_cli,
                            to_yaml, write_run_files)
from rlhfkit.errors import UserError


@dataclass
class Inner:
    lr: float = 0.1
    """learning rate"""
    mode: Literal["a", "b"] = "a"
    """a mode"""


@dataclass
class Outer:
    run: RunConfig = field(default_factory=RunConfig)
    inner: Inner = field(default_factory=Inner)
    steps: int = 10
    """steps"""
    name: Optional[str] = None
    """optional name"""
    tags: list[str] = field(default_factory=list)
    """tags"""
    flag: bool = False
    """a flag"""

    def validate(self) -> None:
        if self.steps > 1000 and self.inner.lr > 1:
            raise UserError("steps: too many steps for such a large inner.lr")


def test_precedence_defaults_yaml_cli(tmp_path):
    cfg = load_config(Outer)
    assert (cfg.steps, cfg.inner.lr) == (10, 0.1)
    path = tmp_path / "c.yaml"
    path.write_text("steps: 20\ninner:\n  lr: 0.5\n  mode: b\n")
    cfg = load_config(Outer, str(path))
    assert (cfg.steps, cfg.inner.lr, cfg.inner.mode) == (20, 0.5, "b")
    cfg = load_config(Outer, str(path), ["inner.lr=1e-4", "flag=true", "tags=x,y", "name=none"])
    assert (cfg.steps, cfg.inner.lr, cfg.flag, cfg.tags, cfg.name) == (20, 1e-4, True, ["x", "y"], None)


def test_unknown_key_is_named_with_suggestion(tmp_path):
    with pytest.raises(UserError, match=r"unknown config key 'inner\.lrr' \(did you mean 'inner\.lr'\?\)"):
        load_config(Outer, None, ["inner.lrr=1"])
    path = tmp_path / "bad.yaml"
    path.write_text("inner:\n  moed: b\n")
    with pytest.raises(UserError, match=r"bad\.yaml: unknown config key 'inner\.moed'"):
        load_config(Outer, str(path))


@pytest.mark.parametrize("override, message", [
    ("steps=ten", r"steps: expected int, got 'ten'"),
    ("steps=1.5", r"steps: expected int"),
    ("inner.lr=fast", r"inner\.lr: expected float"),
    ("flag=maybe", r"flag: expected bool"),
    ("inner.mode=c", r"inner\.mode: expected one of a, b"),
    ("inner=3", r"inner: is a section"),
    ("steps", r"expected key=value"),
])
def test_wrong_types_name_the_key(override, message):
    with pytest.raises(UserError, match=message):
        load_config(Outer, None, [override])


def test_yaml_types_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: [1, 2]\n")
    with pytest.raises(UserError, match=r"c\.yaml: steps: expected int"):
        load_config(Outer, str(path))
    path.write_text("inner:\n  lr: 3e-4\n")  # YAML 1.1 reads 3e-4 as a string; we accept it for a float
    assert load_config(Outer, str(path)).inner.lr == pytest.approx(3e-4)
    path.write_text("steps: [1,\n")
    with pytest.raises(UserError, match=r"c\.yaml:\d+: invalid YAML"):
        load_config(Outer, str(path))
    with pytest.raises(UserError, match="config file not found"):
        load_config(Outer, str(tmp_path / "missing.yaml"))


def test_validate_runs_cross_field_rules():
    with pytest.raises(UserError, match="too many steps"):
        load_config(Outer, None, ["steps=2000", "inner.lr=2"])
    with pytest.raises(UserError, match=r"optim\.lr: must be > 0"):
        load_config(OptimConfig, None, ["lr=0"])


def test_coerce_bool_and_optional():
    assert coerce("yes", bool, "k", from_cli=True) is True
    assert coerce("0", bool, "k", from_cli=True) is False
    assert coerce("null", Optional[int], "k", from_cli=True) is None
    assert coerce("3", Optional[int], "k", from_cli=True) == 3
    with pytest.raises(UserError):
        coerce(True, int, "k")


def test_print_config_round_trips(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        parse_cli(Outer, ["steps=7", "inner.mode=b", "--print-config"], prog="x")
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    again = load_config(Outer, str(path))
    assert dataclasses.asdict(again) == dataclasses.asdict(load_config(Outer, None, ["steps=7", "inner.mode=b"]))


def test_run_files_reproduce_the_config(tmp_path):
    cfg = parse_cli(Outer, ["steps=9", "--resume", "run.seed=3"], prog="x")
    assert cfg.run.resume is True
    write_run_files(cfg, tmp_path, ["rlhfkit", "x", "steps=9"])
    assert (tmp_path / "command.txt").read_text().strip() == "rlhfkit x steps=9"
    reloaded = parse_cli(Outer, ["--config", str(tmp_path / "config.yaml")], prog="x")
    assert dataclasses.asdict(reloaded) == dataclasses.asdict(cfg)
    assert yaml.safe_load(to_yaml(cfg))["run"]["seed"] == 3


def test_unknown_option_and_positional():
    with pytest.raises(UserError, match="unknown option '--stepz'"):
        parse_cli(Outer, ["--stepz"], prog="x")
    with pytest.raises(UserError, match="unexpected argument 'oops'"):
        parse_cli(Outer, ["oops"], prog="x")


def _leaf_fields(cls, prefix=""):
    obj = cls()
    docs = field_docs(cls)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaf_fields(type(value), prefix + f.name + ".")
        else:
            yield prefix + f.name, docs.get(f.name, "")


def _stage_configs():
    def walk(table):
        for name, entry in table.items():
            if isinstance(entry[1], dict):
                yield from ((f"{name} {n}", c) for n, c in walk(entry[1]))
            else:
                yield name, entry
    for name, (_, module, cls) in walk(COMMANDS):
        yield name, getattr(importlib.import_module(module), cls)


@pytest.mark.parametrize("name, cls", list(_stage_configs()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_field_of_every_stage_is_documented(name, cls):
    missing = [key for key, doc in _leaf_fields(cls) if not doc]
    assert not missing, f"rlhfkit {name}: fields without a docstring: {missing}"
    text = help_text(cls, f"rlhfkit {name}")
    for key, doc in _leaf_fields(cls):
        assert key in text and doc.split()[0] in text
