"""Typed ``-o`` options, read as qemu's QemuOpts reads them: one parser for every format's create and amend
options, driven by the format's table of :class:`CreateOption`.

The types are QemuOpts': ``size`` (qemu_strtosz: ``64k``, ``1.5G``, hex), ``number`` (qemu_strtou64 in
base 0: decimal, ``0x`` hex, ``0`` octal, a sign and leading blanks allowed), ``bool`` (``on``/``yes``/
``true``/``y`` and ``off``/``no``/``false``/``n``, as written) and ``string``. A value that does not parse,
or a name the table lacks, is refused with qemu 7.2's message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .errors import InvalidArgumentError
from .units import UINT64_MAX, parse_option_size

OptionValue = int | bool | str

_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")
_BLANKS = " \t\n\v\f\r"
# what strtoull takes in base 0, to the end of the text: hex, octal (a leading 0) or decimal
_NUMBER = re.compile(r"([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


@dataclass(frozen=True, slots=True)
class CreateOption:
    """One ``-o`` option of a format, as ``-o help`` lists it; ``default`` is what qemu's ``Formatting``
    line shows when the option is not given (None: nothing)."""

    name: str
    type: str  # "size", "bool", "number", "string"
    help: str
    default: str | None = None


def parse_bool(name: str, text: str) -> bool:
    """A QemuOpts bool (qapi_bool_parse: the words as written, no other case)."""
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidArgumentError(f"Parameter '{name}' expects 'on' or 'off'")


def parse_number(name: str, text: str) -> int:
    """A QemuOpts number: qemu_strtou64 in base 0 over the whole text; a negative number wraps modulo
    2^64 as strtoull makes it."""
    m = _NUMBER.fullmatch(text.lstrip(_BLANKS))
    if m is None:
        raise InvalidArgumentError(f"Parameter '{name}' expects a number")
    sign, digits = m.groups()
    value = int(digits, 0) if not digits.startswith("0") or digits[:2].lower() == "0x" else int(digits, 8)
    if value > UINT64_MAX:
        raise InvalidArgumentError(f"Value '{text}' is too large for parameter '{name}'")
    return (-value if sign == "-" else value) % (1 << 64)


def qapi_int(text: str) -> int | None:
    """A number option's text as a format's QAPI options read it after QemuOpts checked it (qemu_strtoi64
    in base 0: ``-1`` is -1, not 2^64 - 1), or None outside int64 (qemu: ``expects integer``)."""
    m = _NUMBER.fullmatch(text.lstrip(_BLANKS))
    if m is None:
        return None
    sign, digits = m.groups()
    value = int(digits, 0) if not digits.startswith("0") or digits[:2].lower() == "0x" else int(digits, 8)
    value = -value if sign == "-" else value
    return value if -(1 << 63) <= value < 1 << 63 else None


def parse_value(opt: CreateOption, text: str) -> OptionValue:
    """``text`` as ``opt``'s type, refused with qemu's message."""
    if opt.type == "size":
        return parse_option_size(opt.name, text)
    if opt.type == "number":
        return parse_number(opt.name, text)
    if opt.type == "bool":
        return parse_bool(opt.name, text)
    return text


def shown_value(opt: CreateOption, text: str) -> str:
    """The value as qemu's ``Formatting`` line prints a given option (qemu_opts_print): numbers and sizes
    parsed (a number as a signed 64-bit one), a string with its commas doubled, a bool as written."""
    if opt.type in ("size", "number"):
        value = int(parse_value(opt, text))
        return str(value - (1 << 64) if opt.type == "number" and value >= 1 << 63 else value)
    if opt.type == "string":
        return text.replace(",", ",,")
    return text


def parse_options(options: Mapping[str, str] | Iterable[tuple[str, str | None]],
                  table: Sequence[CreateOption]) -> dict[str, OptionValue]:
    """Check every option against ``table`` in the order given (qemu refuses the first bad one: an unknown
    name, ``Invalid parameter 'x'``, or a value of the wrong type); the typed values by name, the last
    one given winning. A bare name (``lazy_refcounts``) means ``on``."""
    known = {o.name: o for o in table}
    pairs = options.items() if isinstance(options, Mapping) else options
    out: dict[str, OptionValue] = {}
    for key, value in pairs:
        opt = known.get(key)
        if opt is None:
            raise InvalidArgumentError(f"Invalid parameter '{key}'")
        out[key] = parse_value(opt, "on" if value is None else value)
    return out

