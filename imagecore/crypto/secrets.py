"""Passphrases from QEMU's ``secret`` objects (``--object secret,id=ID,data=...|file=...``), named by an
image's ``key-secret`` or ``encrypt.key-secret`` option."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import InvalidArgumentError


def key_secret_of(options: Mapping[str, Any], prefix: str) -> str | None:
    """The secret id an open's or a create's options name: ``PREFIXkey-secret``, flat or nested (json:
    names give ``{"encrypt": {"key-secret": ...}}``)."""
    flat = options.get(prefix + "key-secret")
    if flat is not None:
        return str(flat)
    node: Any = options
    for part in prefix.rstrip(".").split(".") if prefix else ():
        node = node.get(part) if isinstance(node, Mapping) else None
    if prefix and isinstance(node, Mapping) and node.get("key-secret") is not None:
        return str(node["key-secret"])
    return None


def password(ident: str | None, prefix: str) -> bytes:
    """The passphrase of secret ``ident`` as qemu takes it (UTF-8, up to a NUL); qemu's messages for a
    missing option and an unknown id."""
    from ..filenames import OBJECTS

    if ident is None:
        raise InvalidArgumentError(f"Parameter '{prefix}key-secret' is required for cipher")
    data = OBJECTS.secret(ident).data
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgumentError(f"Data from secret {ident} is not valid UTF-8") from None
    return data.split(b"\0", 1)[0]
