"""What the registry needs before a qcow (version 1) image is opened: the probe and the create options."""

from __future__ import annotations

from ...driver import CreateOption

MAGIC = b"QFI\xfb"

CREATE_OPTIONS: tuple[CreateOption, ...] = (
    CreateOption("size", "size", "Virtual disk size"),
    CreateOption("backing_file", "string", "File name of a base image"),
    CreateOption("backing_fmt", "string", "Format of the backing image"),
    CreateOption("encryption", "bool",
                 "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)"),
    CreateOption("encrypt.format", "string", "Encrypt the image, format choices: 'aes'"),
    CreateOption("encrypt.key-secret", "string", "ID of the secret that provides the AES encryption key"),
)


def probe(buf: bytes, filename: str) -> int:
    """qemu's score: the qcow2 magic with version 1 (versions 2 and 3 are qcow2's)."""
    return 100 if buf[:4] == MAGIC and int.from_bytes(buf[4:8], "big") == 1 else 0
