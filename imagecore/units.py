"""Sizes as qemu writes and parses them (qemu_strtosz): shared by the CLI, the verbs and the admin socket."""

from __future__ import annotations

import math
import re

from .errors import InvalidArgumentError

INT64_MAX = (1 << 63) - 1

_SIZE_RE = re.compile(r"\s*(0[xX][0-9a-fA-F]+|[0-9]+)(\.[0-9]*)?\s*([bBkKmMgGtTpPeE]?)\Z")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}

SIZE_HELP = ("Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, "
             "megabytes, gigabytes, terabytes, petabytes and exabytes.")


def parse_size(text: str, *, default_unit: str = "") -> int:
    """Parse a size as qemu_strtosz does: decimal or hex, optional fraction, optional binary suffix."""
    m = _SIZE_RE.match(text)
    if m is None:
        raise InvalidArgumentError(SIZE_HELP)
    whole, frac, unit = m.group(1), m.group(2), m.group(3).lower() or default_unit
    mul = _UNITS[unit]
    hexa = whole[:2].lower() == "0x"
    if hexa and frac:
        raise InvalidArgumentError(SIZE_HELP)
    value = int(whole, 16 if hexa else 10) * mul
    if frac and len(frac) > 1:
        if mul == 1:
            raise InvalidArgumentError(SIZE_HELP)
        # qemu rounds the fractional part of a scaled size to the nearest byte.
        value += math.floor(float("0" + frac) * mul + 0.5)
    if value > INT64_MAX:
        raise InvalidArgumentError(f"Invalid image size specified. Must be between 0 and {INT64_MAX}.")
    return value
