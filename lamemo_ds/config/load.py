"""YAML -> RunConfig, strictly: an unknown key or a wrong type is an error naming its path."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from .schema import ConfigError, RunConfig


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`; convert lists to tuples and ints to floats."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{path}: got {value!r}, allowed: {_type_name(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: got {value!r}, expected {_type_name(tp)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: got {value!r}, expected a list")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{path}: expected {len(args)} values, got {list(value)}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: got {value!r}, expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: got {value!r}, expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-3 or 2e5, without a dot, as text
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: got {value!r}, expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: got {value!r}, expected a string")
        return value
    raise ConfigError(f"{path}: unsupported field type {tp}")  # pragma: no cover


def build(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping, strictly."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or '<root>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key; allowed keys: "
                          f"{', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=v' -> (['a', 'b'], yaml-parsed v)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set train.max_steps=100")
    key, raw = text.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"--set {text!r}: empty key")
    return keys, yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for text in overrides or []:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            child = dict(child) if isinstance(child, dict) else {}
            node[k] = child
            node = child
        node[keys[-1]] = value
    return data


def to_dict(cfg: Any) -> dict:
    """RunConfig -> plain dict (tuples as lists), the inverse of `build`."""
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v
    return conv(cfg)


def bundled_configs() -> dict[str, Path]:
    """name -> file of the run configs shipped with lamemo_ds: lamemo_ds/configs/ in an
    installed wheel (setup.py copies them there), the repository's configs/ in a checkout."""
    from importlib import resources

    found: dict[str, Path] = {}
    packaged = Path(str(resources.files("lamemo_ds") / "configs"))
    root = Path(__file__).resolve().parents[2]  # the repository, when run from a checkout
    checkout = root / "configs" if (root / "pyproject.toml").is_file() else packaged
    for folder in (checkout, packaged):  # the packaged copy wins where both exist
        for f in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
            found[f.stem] = f
    return found


def config_path(path: str | Path) -> Path:
    """A config file's path: `path` itself when it is a file, else the shipped config of that
    name (`enwik8_base` or `enwik8_base.yaml`, see `bundled_configs`)."""
    p = Path(path)
    if p.is_file():
        return p
    bundled = bundled_configs()
    if p.parent == Path(".") and p.name.removesuffix(".yaml") in bundled:
        return bundled[p.name.removesuffix(".yaml")]
    raise ConfigError(f"config file {str(p)!r} does not exist; give a YAML file or the name of a "
                      f"shipped config: {', '.join(sorted(bundled)) or '(none found)'}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> RunConfig:
    """Load a YAML run config (a file, or a shipped config by name), apply `--set` overrides,
    build and validate it."""
    data: dict = dict(base or {})
    if path is not None:
        p = config_path(path)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        data.update(loaded)
    data = apply_overrides(data, overrides or [])
    return build(RunConfig, data).validate()


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def add_config_arguments(p: argparse.ArgumentParser, required: bool = False) -> None:
    """--config FILE and repeated --set key=value (shared by every config-taking command)."""
    p.add_argument("--config", required=required, help="YAML run config: a file, or the name "
                   "of a shipped one (configs/*.yaml, e.g. enwik8_base)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=100 (repeatable)")
