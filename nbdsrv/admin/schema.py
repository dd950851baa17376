"""Typed argument models for admin commands: validation with QMP's messages, and QAPI-style introspection.

A command's arguments are a frozen dataclass. Its field names, in kebab-case on the wire (``read_only`` is
``read-only``), are the only members accepted; its type hints say what each must be; a field with a
default is optional. The same model gives the ``query-qmp-schema`` entries and the generated docs, so the
three cannot disagree.

Supported hints: ``str``, ``int``, ``bool``, ``float``, ``Any``, ``X | None`` (optional, may be null),
``Literal[...]`` (an enum of strings), ``list[X]``, ``dict[str, Any]`` and ``str | int`` (sizes, which take
a number of bytes or a string with a suffix).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from imagecore.errors import InvalidArgumentError

_JSON_NAMES: dict[type, str] = {str: "string", int: "integer", bool: "boolean", float: "number",
                                list: "array", dict: "object"}
_QAPI_BUILTINS: dict[type, str] = {str: "str", int: "int", bool: "bool", float: "number"}


def wire_name(field: str) -> str:
    return field.replace("_", "-")


def _hints(model: type) -> dict[str, Any]:
    return typing.get_type_hints(model)


def _is_union(hint: Any) -> bool:
    return get_origin(hint) in (Union, types.UnionType)


def _expected(hint: Any) -> str:
    """The JSON type named in QEMU's "expected: ..." message."""
    if _is_union(hint):
        parts = [a for a in get_args(hint) if a is not type(None)]
        return _expected(parts[0]) if len(parts) == 1 else " or ".join(_expected(p) for p in parts)
    if get_origin(hint) is Literal:
        return "string"
    origin = get_origin(hint) or hint
    return _JSON_NAMES.get(origin, "value")


def _convert(value: Any, hint: Any, name: str) -> Any:
    if hint is Any:
        return value
    if _is_union(hint):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors: list[InvalidArgumentError] = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _convert(value, opt, name)
            except InvalidArgumentError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise InvalidArgumentError(f"Invalid parameter type for '{name}', expected: {_expected(hint)}")
    origin = get_origin(hint)
    if origin is Literal:
        if not isinstance(value, str):
            raise InvalidArgumentError(f"Invalid parameter type for '{name}', expected: string")
        if value not in get_args(hint):
            raise InvalidArgumentError(f"Parameter '{name}' does not accept value '{value}'")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise InvalidArgumentError(f"Invalid parameter type for '{name}', expected: array")
        (item,) = get_args(hint)
        return [_convert(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise InvalidArgumentError(f"Invalid parameter type for '{name}', expected: object")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise InvalidArgumentError(f"Invalid parameter type for '{name}', expected: boolean")
        return value
    if hint is int:
        # JSON has one number type: 1.0 is not an integer argument, and neither is true
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgumentError(f"Invalid parameter type for '{name}', expected: integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgumentError(f"Invalid parameter type for '{name}', expected: number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise InvalidArgumentError(f"Invalid parameter type for '{name}', expected: string")
        return value
    raise TypeError(f"unsupported argument hint {hint!r} for '{name}'")


def parse_arguments(model: type | None, raw: dict[str, Any]) -> Any:
    """Build ``model`` from a command's ``arguments`` object, refusing unknown, missing and mistyped ones."""
    if model is None:
        for key in raw:
            raise InvalidArgumentError(f"Parameter '{key}' is unexpected")
        return None
    hints = _hints(model)
    fields = {wire_name(f.name): f for f in dataclasses.fields(model)}
    for key in raw:
        if key not in fields:
            raise InvalidArgumentError(f"Parameter '{key}' is unexpected")
    values: dict[str, Any] = {}
    for wname, f in fields.items():
        if wname in raw:
            values[f.name] = _convert(raw[wname], hints[f.name], wname)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise InvalidArgumentError(f"Parameter '{wname}' is missing")
    return model(**values)


# -- introspection -------------------------------------------------------------------------------------

def _type_name(hint: Any, out: dict[str, dict[str, Any]]) -> str:
    """The introspection name of ``hint``, adding the entries it needs to ``out``."""
    if hint is Any:
        out.setdefault("any", {"name": "any", "meta-type": "builtin", "json-type": "value"})
        return "any"
    if _is_union(hint):
        parts = [a for a in get_args(hint) if a is not type(None)]
        if len(parts) == 1:
            return _type_name(parts[0], out)
        names = [_type_name(p, out) for p in parts]
        name = "-or-".join(names)
        out.setdefault(name, {"name": name, "meta-type": "alternate",
                              "members": [{"type": n} for n in names]})
        return name
    origin = get_origin(hint)
    if origin is Literal:
        values = [str(v) for v in get_args(hint)]
        name = "enum-" + "-".join(values)
        out.setdefault(name, {"name": name, "meta-type": "enum", "values": values,
                              "members": [{"name": v} for v in values]})
        return name
    if origin is list:
        item = _type_name(get_args(hint)[0], out)
        name = f"[{item}]"
        out.setdefault(name, {"name": name, "meta-type": "array", "element-type": item})
        return name
    if origin is dict or hint is dict:
        return _type_name(Any, out)
    base = _QAPI_BUILTINS[hint]
    out.setdefault(base, {"name": base, "meta-type": "builtin", "json-type": _JSON_NAMES[hint]})
    return base


def object_entry(name: str, model: type | None, out: dict[str, dict[str, Any]]) -> str:
    """Add the object type for ``model`` (named ``name``) to ``out`` and return its name."""
    members: list[dict[str, Any]] = []
    if model is not None:
        hints = _hints(model)
        for f in dataclasses.fields(model):
            member: dict[str, Any] = {"name": wire_name(f.name), "type": _type_name(hints[f.name], out)}
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                member["default"] = None
            members.append(member)
    out[name] = {"name": name, "meta-type": "object", "members": members}
    return name


def describe_arguments(model: type | None) -> list[tuple[str, str, bool]]:
    """(wire name, JSON type, required) of each argument, for the generated docs."""
    if model is None:
        return []
    hints = _hints(model)
    rows = []
    for f in dataclasses.fields(model):
        hint = hints[f.name]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if get_origin(hint) is Literal:
            kind = " \\| ".join(f"`{v}`" for v in get_args(hint))
        elif _is_union(hint) and any(get_origin(a) is Literal for a in get_args(hint)):
            lit = next(a for a in get_args(hint) if get_origin(a) is Literal)
            kind = " \\| ".join(f"`{v}`" for v in get_args(lit))
        else:
            kind = _expected(hint)
        rows.append((wire_name(f.name), kind, required))
    return rows


__all__ = ["describe_arguments", "object_entry", "parse_arguments", "wire_name"]
