"""Sizes as qemu writes and parses them (qemu_strtosz): shared by the CLI, the verbs and the admin socket."""

from __future__ import annotations

import re

from .errors import InvalidArgumentError

INT64_MAX = (1 << 63) - 1

UINT64_MAX = (1 << 64) - 1

_UNITS = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}
_WHITESPACE = " \t\n\v\f\r"
_DIGITS = re.compile(r"[+-]?[0-9]+")
_HEX = re.compile(r"[+-]?0[xX]([0-9a-fA-F]+)")
# what strtod takes after the point: digits, then an exponent only with digits of its own
_FRACTION = re.compile(r"\.([0-9]+)([eE][+-]?[0-9]+)?")

SIZE_HELP = ("Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, "
             "megabytes, gigabytes, terabytes, petabytes and exabytes.")


def strtosz(text: str, *, default_unit: str = "b") -> int:
    """qemu's qemu_strtosz: a decimal or hex number (leading blanks and a plus sign allowed, never a minus),
    a fraction only before a suffix (``1.5k``; ``1.k`` and ``1.`` too), one binary suffix (b, k, M, G, T,
    P, E in either case) and nothing after it. ValueError for what qemu calls EINVAL, OverflowError for
    ERANGE (2^64 or more)."""
    start = len(text) - len(text.lstrip(_WHITESPACE))
    m = _DIGITS.match(text, start)
    if m is None or "-" in m.group():
        raise ValueError(text)
    value, end = int(m.group()), m.end()
    if value > UINT64_MAX:
        raise OverflowError(text)
    frac = 0.0
    if value == 0 and text[end:end + 1] in ("x", "X"):
        h = _HEX.match(text, start)
        if h is None:
            raise ValueError(text)  # "0x" alone: the x is left over
        value, end = int(h.group(1), 16), h.end()
        if value > UINT64_MAX:
            raise OverflowError(text)
        if text[end:end + 1] == "." or text[end:end + 1].lower() in _UNITS:
            raise ValueError(text)  # hex takes neither a fraction nor a suffix
    elif text[end:end + 1] == ".":
        f = _FRACTION.match(text, end)
        if f is None:
            end += 1  # strtod found no number: the point alone is skipped
        elif f.group(2):
            raise ValueError(text)  # an exponent makes the whole input invalid
        else:
            frac, end = float(f.group()), f.end()
    suffix = text[end:end + 1].lower()
    if suffix and suffix in _UNITS:
        mul, end = _UNITS[suffix], end + 1
    else:
        mul = _UNITS[default_unit.lower() or "b"]
    if end != len(text):
        raise ValueError(text)
    if mul == 1:
        if frac:
            raise ValueError(text)  # a fraction needs a scale
        return value
    # qemu's 64.64 fixed point: the fraction truncated to 64 bits, the product rounded half up
    part = int(frac * (1 << 64)) * mul
    total = value * mul + (part >> 64) + ((part >> 63) & 1)
    if total > UINT64_MAX:
        raise OverflowError(text)
    return total


def parse_size(text: str, *, default_unit: str = "") -> int:
    """Parse a size as qemu-img's cvtnum does (qemu_strtosz, then at most INT64_MAX)."""
    try:
        value = strtosz(text, default_unit=default_unit)
    except ValueError:
        raise InvalidArgumentError(SIZE_HELP) from None
    except OverflowError:
        value = UINT64_MAX + 1
    if value > INT64_MAX:
        raise InvalidArgumentError(f"Invalid image size specified. Must be between 0 and {INT64_MAX}.")
    return value


def parse_option_size(name: str, text: str) -> int:
    """A size option (``-o cluster_size=64k``, ``1.5G``, ``512``) as QemuOpts reads it, with
    qemu_strtosz (up to 2^64 - 1); its refusal ends in qemu's hint, the lines after the message."""
    try:
        return strtosz(text)
    except OverflowError:
        raise InvalidArgumentError(f"Value '{text}' is out of range for parameter '{name}'") from None
    except ValueError:
        raise InvalidArgumentError(
            f"Parameter '{name}' expects a non-negative number below 2^64\n"
            "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
            "and exabytes, respectively.") from None
