"""YAML presets + dotted overrides -> a checked `RunConfig`.

Hand-written rather than Hydra/OmegaConf because what users need most is
the error: an unknown key or a value of the wrong type must fail at load
time, name the full dotted key, and for a typo suggest the closest valid
one. Dataclass field types are the schema, so there is nothing else to keep
in sync.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from harness.config.schema import RunConfig

PRESET_DIR = Path(__file__).parent / "presets"
INHERIT_KEY = "inherit"
# Keys that were removed, with what replaces them (the unknown-key error says so).
RENAMED_KEYS = {"train.tensorboard": "train.log_with=[tensorboard] (or train.log_with=[] for no tracker)"}


class ConfigError(ValueError):
    """A config that cannot describe a valid run; the message says how to fix it."""


def list_presets() -> list[str]:
    """Runnable presets (files starting with '_' are shared bases)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def _preset_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    candidate = PRESET_DIR / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    known = list_presets()
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"unknown preset '{name}'{hint} Presets: {', '.join(known)} (or pass a .yaml path)")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML file, resolving `inherit: base` chains (child keys win).

    A file without `inherit:` sits on the dataclass defaults of `schema.py`
    (which validate as a run), not on an implicit preset: the file plus the
    schema is then the whole config, and its meaning cannot change when a
    preset is retuned. `inherit: quickstart` opts into a preset explicitly.
    """
    if path in seen:
        raise ConfigError(f"config inheritance loops through {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level, got {type(data).__name__}")
    base = data.pop(INHERIT_KEY, None)
    if base is None:
        return data
    return _merge(_read_yaml(_base_path(path, str(base)), seen + (path,)), data)


def _base_path(child: Path, base: str) -> Path:
    """`inherit:` names a preset or a YAML file; a relative file is read beside the
    file that inherits it, not from the working directory, so configs move together."""
    candidate = Path(base).expanduser()
    if candidate.suffix in (".yaml", ".yml") and not candidate.is_absolute():
        candidate = child.parent / candidate
    return _preset_path(str(candidate))


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.path=value (e.g. optim.weight_decay=1e-5)")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override '{item}' has an empty key")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def _apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node: Any = data
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            node = node[_list_index(path, i, node)]
            continue
        node = node.setdefault(part, {})
        if node is None:  # an optional section that was null: start it empty
            node = {}
    last = path[-1]
    if isinstance(node, list):
        node[_list_index(path, len(path) - 1, node)] = value
    else:
        node[last] = value


def _list_index(path: list[str], i: int, node: list) -> int:
    try:
        index = int(path[i])
    except ValueError:
        raise ConfigError(f"'{'.'.join(path[:i])}' is a list: index it with a number, e.g. .0.") from None
    if not -len(node) <= index < len(node):
        raise ConfigError(f"{'.'.join(path[: i + 1])}: index out of range (list has {len(node)} items)")
    return index


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _yaml11_number(value: Any) -> Any:
    """YAML 1.1 reads `1e-5` (no dot) as a string; users mean the number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, building nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        value = _yaml11_number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported annotation {tp!r}")  # a schema bug, not a user error


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else key
            if full in RENAMED_KEYS:
                raise ConfigError(f"config key '{full}' was replaced: use {RENAMED_KEYS[full]}")
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{full}'{hint} Valid keys here: {', '.join(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            full = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], full)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field (no default) is missing
        raise ConfigError(f"{prefix or cls.__name__}: {err}") from None


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    return _build(RunConfig, data)


def load_config(name: str = "quickstart", overrides: list[str] | tuple[str, ...] = (), *, check: bool = True) -> RunConfig:
    """Load a preset name or YAML path, apply `key.path=value` overrides, validate."""
    data = _read_yaml(_preset_path(name))
    for item in overrides:
        path, value = _parse_override(item)
        _apply_override(data, path, value)
    cfg = config_from_dict(data)
    if check:
        from harness.config.validate import validate

        validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, width=100)
