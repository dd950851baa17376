"""Formats imagecore recognises but cannot open yet: their probes, scored as qemu 7.2's drivers score them.

Each probe sees what qemu's ``bdrv_probe`` callbacks see: the first 2048 bytes of the file, zero-filled
past its end, and the file name. Without these a foreign container would probe as raw and be copied or
exported byte for byte, which reads as garbage inside the guest; with them probing names the format and
opening it is refused (see ``driver.probe_format``). A format that gets a driver moves out of this table.
"""

from __future__ import annotations

from ..driver import ForeignFormat, register_foreign_format


def _le32(buf: bytes, at: int) -> int:
    return int.from_bytes(buf[at:at + 4], "little")


def _cstr_is(buf: bytes, at: int, text: bytes) -> bool:
    """C's ``strcmp(buf + at, text) == 0``: the text followed by its NUL."""
    return buf[at:at + len(text) + 1] == text + b"\0"




def probe_dmg(buf: bytes, filename: str) -> int:
    # dmg has no signature at the start; qemu goes by the (case-sensitive) name and scores just above raw.
    return 2 if len(filename) > 4 and filename.endswith(".dmg") else 0


CLOOP_MAGIC = (b"#!/bin/sh\n#V2.0 Format\n"
               b"modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")


def probe_cloop(buf: bytes, filename: str) -> int:
    return 2 if buf.startswith(CLOOP_MAGIC) else 0


def probe_bochs(buf: bytes, filename: str) -> int:
    if (_cstr_is(buf, 0, b"Bochs Virtual HD Image") and _cstr_is(buf, 32, b"Redolog")
            and _cstr_is(buf, 48, b"Growing") and _le32(buf, 64) in (0x00020000, 0x00010000)):
        return 100
    return 0


FOREIGN_FORMATS: tuple[ForeignFormat, ...] = (
    ForeignFormat("dmg", probe_dmg),
    ForeignFormat("cloop", probe_cloop),
    ForeignFormat("bochs", probe_bochs),
)

for _f in FOREIGN_FORMATS:
    register_foreign_format(_f)
