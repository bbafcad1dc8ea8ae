"""Typed dataclass configs that round-trip to YAML, with dotted overrides (`optim.lr=1e-4`).

The machinery here knows nothing about specific configs: any (nested) dataclass whose fields are typed with
scalars (`int`, `float`, `bool`, `str`, `Path`), nested dataclasses, `X | None`, `list[X]`, `tuple[X, ...]`,
`dict[str, X]`, `Literal[...]` or `Any` can be loaded, checked, overridden and saved.

Loading rules:

- Unknown keys are an error naming the full dotted path, the valid keys and the closest match.
- Wrong types are an error naming the dotted path, the expected type and the value. Coercions are few and
  lossless: `int` -> `float`, an integral float -> `int` (`max_steps: 1e5`), `"1e-4"` -> `float`,
  `"true"`/`"false"` -> `bool`, `str` -> `Path`, `list` <-> `tuple`. Nothing else (a number is not a `str`:
  quote it in YAML).
- YAML 1.1, which PyYAML implements, reads `1e-4` (no dot) as a string. This module's loader and dumper read and
  write such numbers as floats, so `lr: 1e-4` in a file and `optim.lr=1e-4` on the command line both work.
- A nested section given in part keeps the rest of its field's default, key by key: with
  `stage2: BridgeTraining = field(default_factory=lambda: BridgeTraining(steps=400))`, `stage2.lr=2e-3` still
  has 400 steps (not the class's own default), and a `dict` field's default keys stay unless overridden.
- A top-level `base: other.yaml` key (a path relative to the file) loads that file first and deep-merges this
  file on top of it: mappings merge key by key, anything else (scalars, lists, null) is replaced. Bases can
  chain. Overrides are applied last, so precedence is base < file < overrides. `base` is therefore reserved as
  a top-level key.
- Overrides are `dotted.key=value`; the value is parsed as YAML (`3e-5`, `true`, `[1, 2]`, `null`, `{a: 1}`),
  and an empty value is the empty string. Lists are replaced whole.

Dataclasses must be defined at module level: field types are resolved with `typing.get_type_hints`, which
cannot see names local to a function when annotations are strings (`from __future__ import annotations`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from vlbridge.errors import ConfigError
from vlbridge.utils.io import write_text

__all__ = ["apply_overrides", "from_dict", "load_yaml", "save_yaml", "to_dict"]

T = TypeVar("T")

BASE_KEY = "base"

# YAML 1.2 floats that YAML 1.1 reads as strings: an exponent without a dot (`1e-4`) or without a sign (`1.0e5`).
_FLOAT_RE = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """`yaml.SafeLoader` that also reads `1e-4` as a float."""


class _Dumper(yaml.SafeDumper):
    """`yaml.SafeDumper` that quotes strings such as `"1e-4"`, so that `_Loader` reads them back as strings."""


for _cls in (_Loader, _Dumper):
    # add_implicit_resolver copies the parent's table first, so the plain SafeLoader/SafeDumper are untouched.
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


# --------------------------------------------------------------------------------------------------------------
# dict -> dataclass


def from_dict(cls: type[T], data: Mapping[str, Any], *, path: str = "") -> T:
    """Build a (nested) dataclass from a plain mapping, checking keys and types.

    Args:
        cls: The dataclass to build.
        data: Its fields by name; missing fields take their defaults.
        path: Dotted path of `data` within a larger config, used in error messages.

    Returns:
        An instance of `cls`.

    Raises:
        ConfigError: A key is unknown, a required key is missing, or a value has the wrong type.
    """
    if not dataclasses.is_dataclass(cls) or not isinstance(cls, type):
        raise TypeError(f"from_dict expects a dataclass type, got {cls!r}")
    if not isinstance(data, Mapping):
        where = f"config section '{path}'" if path else "config"
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {_show(data)}")
    hints = _field_types(cls)
    factories = {
        f.name: f.default_factory for f in dataclasses.fields(cls) if f.default_factory is not dataclasses.MISSING
    }
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in hints:
            raise _unknown_key(str(key), hints, path)
        if isinstance(value, Mapping) and key in factories:  # a partial section: on top of the field's default
            default = factories[key]()
            if dataclasses.is_dataclass(default):
                value = _deep_merge(to_dict(default), value)
            elif isinstance(default, Mapping):
                value = _deep_merge(dict(default), value)
        kwargs[key] = _convert(hints[key], value, _join(path, key))
    for f in dataclasses.fields(cls):
        if f.init and f.name not in kwargs and _is_required(f):
            raise ConfigError(f"missing required config key '{_join(path, f.name)}'")
    return cls(**kwargs)


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Resolved types of the fields a dataclass accepts in `__init__`, in declaration order."""
    try:
        hints = typing.get_type_hints(cls)
    except NameError as e:
        raise TypeError(f"cannot resolve the field types of {cls.__qualname__} (define it at module level): {e}") from e
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Check `value` against the type `tp` and coerce it where that is lossless; `path` is for error messages."""
    if tp is Any or tp is object:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _type_error(path, tp, value)
    origin = get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return _convert_union(tp, value, path)
    if origin is Literal:
        return _convert_literal(tp, value, path)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _type_error(path, tp, value, hint="a mapping of its fields")
        return from_dict(tp, value, path=path)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        return _convert_sequence(tp, value, path)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise _type_error(path, tp, value)
        key_tp, value_tp = get_args(tp) or (Any, Any)
        return {_convert(key_tp, k, path): _convert(value_tp, v, _join(path, str(k))) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise _type_error(path, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _type_error(path, tp, value)
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.replace("_", ""))
            except ValueError:
                pass
        raise _type_error(path, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(path, tp, value, hint="quote it in YAML" if _is_scalar(value) else "")
    if isinstance(tp, type) and issubclass(tp, Path):
        if isinstance(value, str | os.PathLike):
            return tp(value)
        raise _type_error(path, tp, value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _type_error(path, tp, value)


def _convert_union(tp: Any, value: Any, path: str) -> Any:
    args = get_args(tp)
    if value is None and type(None) in args:
        return None
    options = [a for a in args if a is not type(None)]
    if len(options) == 1:
        (option,) = options
        try:
            return _convert(option, value, path)
        except ConfigError:
            if _is_plain_class(option):  # say "int | None"; errors from inside containers stay more precise
                raise _type_error(path, tp, value) from None
            raise
    for option in options:  # an exact scalar match first, so that `int | float` keeps an int an int
        if isinstance(option, type) and type(value) is option:
            return value
    for option in options:
        try:
            return _convert(option, value, path)
        except ConfigError:
            continue
    raise _type_error(path, tp, value)


def _convert_literal(tp: Any, value: Any, path: str) -> Any:
    allowed = get_args(tp)
    # `type(...) is` so that True does not pass for 1, nor 1 for True.
    if any(value == a and type(value) is type(a) for a in allowed):
        return value
    hint = ""
    if isinstance(value, str):
        close = difflib.get_close_matches(value, [a for a in allowed if isinstance(a, str)], n=1)
        hint = f"did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        f"config key '{path}': expected one of {', '.join(map(repr, allowed))}, got {_show(value)}"
        + (f"; {hint}" if hint else "")
    )


def _convert_sequence(tp: Any, value: Any, path: str) -> list[Any] | tuple[Any, ...]:
    if not isinstance(value, list | tuple):
        raise _type_error(path, tp, value)
    args = get_args(tp)
    origin = get_origin(tp) or tp
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):  # fixed-length tuple[X, Y]
        if len(value) != len(args):
            raise _type_error(path, tp, value, hint=f"{len(args)} items, not {len(value)}")
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    item_tp = args[0] if args else Any
    items = [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


# --------------------------------------------------------------------------------------------------------------
# dataclass -> dict


def to_dict(obj: Any) -> dict[str, Any]:
    """Turn a dataclass into a plain, YAML-safe dict (nested dataclasses -> dicts, tuples -> lists, Paths -> str).

    Only fields accepted by `__init__` are included, so `from_dict(type(obj), to_dict(obj)) == obj`.

    Args:
        obj: A dataclass instance.

    Returns:
        Plain dicts, lists and scalars only.
    """
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"to_dict expects a dataclass instance, got {obj!r}")
    return _plain(obj, "")


def _plain(value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _plain(getattr(value, f.name), _join(path, f.name)) for f in dataclasses.fields(value) if f.init
        }
    if isinstance(value, Mapping):
        return {k: _plain(v, _join(path, str(k))) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"config value '{path}' cannot be written to YAML: {value!r}")


# --------------------------------------------------------------------------------------------------------------
# YAML files and overrides


def load_yaml(cls: type[T], path: str | os.PathLike, overrides: Sequence[str] = ()) -> T:
    """Load a config from a YAML file, resolving `base:` inheritance and applying dotted overrides.

    Args:
        cls: The config dataclass.
        path: The YAML file. A top-level `base: other.yaml` (relative to this file) is loaded first and this
            file is deep-merged on top of it.
        overrides: `dotted.key=value` strings, applied after the file; values are parsed as YAML.

    Returns:
        An instance of `cls`.

    Raises:
        ConfigError: The file is missing or malformed, a key is unknown, or a value has the wrong type.
    """
    path = Path(path)
    data = _read_with_base(path, ())
    for key in _override_keys(overrides):
        _check_key(cls, key)
    data = apply_overrides(data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        source = f"{path} with overrides" if overrides else str(path)  # the bad value may come from either
        raise ConfigError(f"{source}: {e}") from None


def save_yaml(obj: Any, path: str | os.PathLike) -> None:
    """Write a dataclass config to YAML atomically (a temporary file in the same folder, then `os.replace`).

    Args:
        obj: A dataclass instance (or an already plain mapping).
        path: Destination; missing parent folders are created.
    """
    data = obj if isinstance(obj, Mapping) else to_dict(obj)
    text = yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text)


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a deep copy of `data` with `dotted.key=value` overrides applied.

    Missing intermediate sections (or ones that are null) are created. Keys are not checked against any config
    here; `load_yaml` checks them against the dataclass, and `from_dict` would reject them anyway.

    Args:
        data: Nested plain dicts, as read from YAML.
        overrides: `dotted.key=value` strings; each value is parsed as YAML (`1e-4`, `true`, `[1, 2]`, `null`),
            and an empty value is the empty string.

    Returns:
        The new nested dict; `data` is left unchanged.

    Raises:
        ConfigError: An override is malformed or descends into a value that is not a mapping.
    """
    out = _deep_copy(data)
    for override, key in zip(overrides, _override_keys(overrides)):
        value = _parse_value(override.partition("=")[2], override)
        parts = key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                prefix = ".".join(parts[: i + 1])
                raise ConfigError(f"override '{override}': '{prefix}' is {_show(child)}, not a section with keys")
            node = child
        node[parts[-1]] = value
    return out


def _override_keys(overrides: Sequence[str]) -> list[str]:
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not one string")
    keys = []
    for override in overrides:
        key, eq, _ = override.partition("=")
        key = key.strip()
        if not eq or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"malformed override {override!r}: expected 'dotted.key=value', e.g. 'optim.lr=1e-4'")
        keys.append(key)
    return keys


def _parse_value(text: str, override: str) -> Any:
    if not text.strip():
        return ""
    try:
        return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader: no arbitrary objects
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: value is not valid YAML: {_one_line(e)}") from None


def _check_key(cls: type, key: str) -> None:
    """Raise ConfigError unless the dotted `key` names a field of `cls` (or lies inside a free-form dict field)."""
    tp: Any = cls
    parts = key.split(".")
    for i, part in enumerate(parts):
        tp = _strip_optional(tp)
        prefix = ".".join(parts[:i])
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            hints = _field_types(tp)
            if part not in hints:
                raise _unknown_key(part, hints, prefix, what="override key")
            tp = hints[part]
        elif tp is Any or tp is dict or get_origin(tp) in (dict, Mapping):
            return  # free-form below here
        else:
            raise ConfigError(f"unknown override key '{key}': '{prefix}' is a {_type_name(tp)}, not a section")


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        if len(options) == 1:
            return options[0]
    return tp


def _read_with_base(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """Read one YAML mapping; if it names a `base`, read that first and deep-merge this file on top."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise ConfigError(f"config 'base' files form a cycle: {cycle}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with path.open(encoding="utf-8") as f:
            data = yaml.load(f, Loader=_Loader)  # _Loader is a SafeLoader: no arbitrary objects
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {_one_line(e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {_show(data)}")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str | os.PathLike):
        raise ConfigError(f"{path}: '{BASE_KEY}' must be a path to another YAML file, got {_show(base)}")
    parent = _read_with_base(path.parent / base, (*chain, resolved))
    return _deep_merge(parent, data)


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; any other value in `top` (list, scalar, null) replaces the one in `base`."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------------------
# Error messages


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _unknown_key(key: str, valid: Mapping[str, Any], path: str, what: str = "config key") -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=1)
    guess = f"; did you mean '{close[0]}'?" if close else ""
    where = f"'{path}'" if path else "the top level"
    return ConfigError(f"unknown {what} '{_join(path, key)}'{guess} (valid keys at {where}: {', '.join(valid)})")


def _type_error(path: str, tp: Any, value: Any, hint: str = "") -> ConfigError:
    where = f"config key '{path}'" if path else "config"
    return ConfigError(f"{where}: expected {_type_name(tp)}, got {_show(value)}" + (f" ({hint})" if hint else ""))


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if tp is Any:
        return "Any"
    if tp is Ellipsis:
        return "..."
    origin = get_origin(tp)
    args = get_args(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return f"Literal[{', '.join(map(repr, args))}]"
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type_name(a) for a in args)}]" if args else name
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _is_plain_class(tp: Any) -> bool:
    return isinstance(tp, type) and get_origin(tp) is None and not dataclasses.is_dataclass(tp)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, bool | int | float)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())
