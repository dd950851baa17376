"""Stream-optimized vmdk pieces: grain markers, deflate-compressed grains and the footer header."""

from __future__ import annotations

import struct
import zlib

from ...errors import CorruptImageError, ImageFormatError
from ...hostio import HostFile, run_blocking

SECTOR = 512
MARKER_EOS = 0
MARKER_GT = 1
MARKER_GD = 2
MARKER_FOOTER = 3

_MARKER = struct.Struct("<QII")  # value (lba or sector count), size (0 for metadata markers), type


def _inflate(data: bytes, limit: int) -> bytes:
    """Inflate a zlib stream, never producing more than ``limit`` bytes (a bomb stops there)."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, limit)
    except zlib.error as exc:
        raise CorruptImageError(f"vmdk compressed grain is corrupt: {exc}") from None
    return out


async def read_compressed_grain(hf: HostFile, host: int, grain_bytes: int, *, has_marker: bool,
                                lba: int | None = None) -> bytes:
    """Read and inflate the grain stored at byte ``host``; the result may be shorter than a grain."""
    # A compressed grain never legitimately needs more than twice the grain size (qemu bounds it alike).
    window = 2 * grain_bytes + _MARKER.size
    raw = await hf.pread(host, window)
    if has_marker:
        value, size = struct.unpack_from("<QI", raw, 0)
        if size == 0 or size > window - 12:
            raise CorruptImageError(f"vmdk grain marker at offset {host} has invalid size {size}")
        if lba is not None and value != lba:
            raise CorruptImageError(f"vmdk grain marker at offset {host} is for sector {value}, not {lba}")
        payload = raw[12:12 + size]
    else:
        payload = raw
    return await run_blocking(_inflate, payload, grain_bytes)


def _deflate_record(lba: int, data: bytes) -> bytes:
    comp = zlib.compress(data)
    record = struct.pack("<QI", lba, len(comp)) + comp
    return record + bytes(-len(record) % SECTOR)


async def grain_record(lba: int, data: bytes) -> bytes:
    """A grain marker with the deflated grain, padded to whole sectors, as written after the last grain."""
    return await run_blocking(_deflate_record, lba, data)


def parse_footer(buf: bytes) -> bytes:
    """The 512-byte header sector held in a stream-optimized footer (footer marker, header, EOS marker)."""
    if len(buf) != 3 * SECTOR:
        raise ImageFormatError("Invalid footer")
    _fval, fsize, ftype = _MARKER.unpack_from(buf, 0)
    eval_, esize, etype = _MARKER.unpack_from(buf, 2 * SECTOR)
    header = buf[SECTOR:2 * SECTOR]
    if (header[:4] != b"KDMV" or fsize != 0 or ftype != MARKER_FOOTER
            or eval_ != 0 or esize != 0 or etype != MARKER_EOS):
        raise ImageFormatError("Invalid footer")
    return header
