"""What the registry needs before a luks image is opened: the probe and the create options (qemu 7.2's
``qemu-img create -f luks -o help``, in its order)."""

from __future__ import annotations

from ...driver import CreateOption

MAGIC = b"LUKS\xba\xbe"

CREATE_OPTIONS: tuple[CreateOption, ...] = (
    CreateOption("size", "size", "Virtual disk size"),
    CreateOption("key-secret", "string", "ID of the secret that provides the keyslot passphrase"),
    CreateOption("cipher-alg", "string", "Name of encryption cipher algorithm"),
    CreateOption("cipher-mode", "string", "Name of encryption cipher mode"),
    CreateOption("ivgen-alg", "string", "Name of IV generator algorithm"),
    CreateOption("ivgen-hash-alg", "string", "Name of IV generator hash algorithm"),
    CreateOption("hash-alg", "string", "Name of encryption hash algorithm"),
    CreateOption("iter-time", "number", "Time to spend in PBKDF in milliseconds"),
)


def probe(buf: bytes, filename: str) -> int:
    """qemu's score: 100 for a LUKS version 1 header (LUKS2 probes as raw in qemu 7.2 too), else 0."""
    return 100 if buf[:6] == MAGIC and int.from_bytes(buf[6:8], "big") == 1 else 0
