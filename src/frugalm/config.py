"""TOML configs for every capability: loading, `--set section.key=value` overrides, strict keys.

Each capability owns one dataclass per concern (``ModelConfig``, ``TrainConfig``, ...). A run config is
a TOML file whose top-level tables are named sections; this module turns a section into its
dataclass and refuses keys the dataclass does not have, so a typo never silently becomes a default.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file, override or field value that cannot be used; the message names the key."""


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def parse_value(text: str) -> Any:
    """Parse an override's right-hand side as a TOML value; bare words stay strings.

    ``true``/``1e-4``/``[1, 2]``/``"x"`` parse as TOML; ``cosine`` (not valid TOML) is kept as a string so
    users need not quote enum-like values on the command line.
    """
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a nested dict (in place, also returned)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        dotted, text = item.split("=", 1)
        keys = [k.strip() for k in dotted.strip().split(".")]
        if not all(keys):
            raise ConfigError(f"override {item!r} has an empty key")
        node = raw
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {k!r} is a value, not a section")
            node = child
        node[keys[-1]] = parse_value(text.strip())
    return raw


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one value against a dataclass field's annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], section: str = "", *, ignore: tuple[str, ...] = (),
              base: Any = None) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys are an error naming them and the section.

    Keys not in ``data`` come from ``base`` (an instance of ``cls``) if given, else from the class
    defaults. A nested table starts from the field's own default instance, so a partial table overrides
    only what it names (``[distill.sft] max_steps`` keeps the distillation SFT's learning rate, not
    `SFTConfig`'s class default).
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(k for k in data if k not in fields and k not in ignore)
    if unknown:
        prefix = f"[{section}] " if section else ""
        raise ConfigError(
            f"{prefix}unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {name: getattr(base, name) for name in fields} if base is not None else {}
    for name, value in data.items():
        if name in ignore:
            continue
        where = f"{section}.{name}" if section else name
        nested = None
        if isinstance(value, Mapping):
            nested = kwargs.get(name) if base is not None else _default_instance(fields[name])
        if dataclasses.is_dataclass(nested) and not isinstance(nested, type):
            kwargs[name] = from_dict(type(nested), value, where, base=nested)
        else:
            kwargs[name] = _coerce(value, hints[name], where)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"[{section}] {e}" if section else str(e)) from None


def _default_instance(f: dataclasses.Field) -> Any:
    """What a field defaults to when its default is built by ``default_factory`` (None otherwise)."""
    if f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
        return None
    return f.default_factory()  # type: ignore[misc]


def to_dict(obj: Any) -> dict[str, Any]:
    """Dataclass → plain dict of TOML/JSON-friendly values (tuples become lists)."""
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(obj)


def dump_toml(data: Mapping[str, Any]) -> str:
    """Write a nested dict of sections as TOML (None values are omitted, as TOML has no null)."""
    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {val(x)}" for k, x in v.items() if x is not None) + "}"
        raise TypeError(f"cannot write {v!r} as TOML")

    lines: list[str] = []
    for name, section in data.items():
        if not isinstance(section, Mapping):
            if section is not None:
                lines.append(f"{name} = {val(section)}")
            continue
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {val(v)}" for k, v in section.items() if v is not None)
        lines.append("")
    return "\n".join(lines)
