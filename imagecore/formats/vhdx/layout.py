"""The on-disk structures of MS-VHDX 1.0 as bytes: headers, region table, metadata, BAT entries, log entries.

Pure functions over buffers; no I/O. Every multi-byte field is little-endian and every GUID is kept as the
16 bytes it has on disk (MS GUIDs: data1-3 little-endian, data4 as bytes), so GUIDs compare byte for byte.

Checksums are CRC-32C (Castagnoli), computed with the ``crc32c`` package where it is installed and with
Debian's ``crcmod`` (its C extension) otherwise; neither is written here.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass


def _crc32c_extension() -> Callable[..., int]:
    """The ``crc32c`` package's C function, loaded without the package's ``__init__``: that looks its own
    version up through importlib.metadata, which cost every vhdx command 50 ms of its start-up."""
    import importlib.machinery
    import importlib.util
    import sys

    name = "crc32c._crc32c"
    mod = sys.modules.get(name)
    if mod is None:
        pkg = importlib.util.find_spec("crc32c")  # a top-level spec: the package is not imported
        if pkg is None or not pkg.submodule_search_locations:
            raise ImportError(name)
        spec = importlib.machinery.PathFinder.find_spec(name, list(pkg.submodule_search_locations))
        if spec is None or spec.loader is None:
            raise ImportError(name)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules[name] = mod
    fn: Callable[..., int] = mod.crc32c
    return fn


try:
    _crc32c = _crc32c_extension()

    def _crc(data: bytes | bytearray | memoryview, value: int = 0) -> int:
        return int(_crc32c(data, value))
except ImportError:  # pragma: no cover - depends on the machine
    import crcmod.predefined  # type: ignore[import-not-found,import-untyped,unused-ignore]

    _crcmod_fn: Callable[..., int] = crcmod.predefined.mkCrcFun("crc-32c")

    def _crc(data: bytes | bytearray | memoryview, value: int = 0) -> int:
        return int(_crcmod_fn(bytes(data), value))

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

HEADER_BLOCK = 64 * KiB
HEADER1_OFFSET = 1 * HEADER_BLOCK
HEADER2_OFFSET = 2 * HEADER_BLOCK
REGION_TABLE_OFFSET = 3 * HEADER_BLOCK
REGION_TABLE2_OFFSET = 4 * HEADER_BLOCK
HEADER_SECTION_END = 1 * MiB
HEADER_SIZE = 4 * KiB  # the header's checksum covers its first 4 KiB

HEADER_SIGNATURE = b"head"
REGION_SIGNATURE = b"regi"
METADATA_SIGNATURE = b"metadata"
LOG_SIGNATURE = b"loge"
DESC_SIGNATURE = b"desc"
ZERO_SIGNATURE = b"zero"
DATA_SIGNATURE = b"data"

LOG_SECTOR = 4096
LOG_HEADER_SIZE = 64
LOG_DESC_SIZE = 32
LOG_MIN_SIZE = 1 * MiB

BLOCK_SIZE_MIN = 1 * MiB
BLOCK_SIZE_MAX = 256 * MiB
MAX_IMAGE_SIZE = 64 * TiB
MAX_SECTORS_PER_BLOCK = 1 << 23
METADATA_TABLE_MAX = 32 * (2047 + 1)

# payload block states (the low 3 bits of a BAT entry)
PAYLOAD_NOT_PRESENT = 0
PAYLOAD_UNDEFINED = 1
PAYLOAD_ZERO = 2
PAYLOAD_UNMAPPED_V095 = 3
PAYLOAD_UNMAPPED = 5
PAYLOAD_FULLY_PRESENT = 6
PAYLOAD_PARTIALLY_PRESENT = 7
STATE_MASK = 0x7
OFFSET_MASK = 0xFFFFFFFFFFF00000  # the upper 44 bits: the file offset in MiB units
READS_ZERO = frozenset({PAYLOAD_NOT_PRESENT, PAYLOAD_UNDEFINED, PAYLOAD_ZERO, PAYLOAD_UNMAPPED_V095,
                        PAYLOAD_UNMAPPED})

PARAMS_LEAVE_BLOCKS_ALLOCATED = 0x1
PARAMS_HAS_PARENT = 0x2
META_IS_USER = 0x1
META_IS_VIRTUAL_DISK = 0x2
META_IS_REQUIRED = 0x4
REGION_REQUIRED = 0x1


def guid(data1: int, data2: int, data3: int, data4: bytes) -> bytes:
    """An MS GUID as the 16 bytes it is stored as."""
    return struct.pack("<IHH", data1, data2, data3) + data4


BAT_GUID = guid(0x2DC27766, 0xF623, 0x4200, bytes.fromhex("9d64115e9bfd4a08"))
METADATA_GUID = guid(0x8B7CA206, 0x4790, 0x4B9A, bytes.fromhex("b8fe575f050f886e"))
FILE_PARAM_GUID = guid(0xCAA16737, 0xFA36, 0x4D43, bytes.fromhex("b3b633f0aa44e76b"))
VIRTUAL_SIZE_GUID = guid(0x2FA54224, 0xCD1B, 0x4876, bytes.fromhex("b2115dbed83bf4b8"))
PAGE83_GUID = guid(0xBECA12AB, 0xB2E6, 0x4523, bytes.fromhex("93efc309e000c746"))
LOGICAL_SECTOR_GUID = guid(0x8141BF1D, 0xA96F, 0x4709, bytes.fromhex("ba47f233a8faab5f"))
PHYS_SECTOR_GUID = guid(0xCDA348C7, 0x445D, 0x4471, bytes.fromhex("9cc9e9885251c556"))
PARENT_LOCATOR_GUID = guid(0xA8D35F2D, 0xB30B, 0x454D, bytes.fromhex("abf7d3d84834ab0c"))
ZERO_GUID = bytes(16)


def new_guid() -> bytes:
    """A random GUID (qemu copies a random UUID's bytes as they are)."""
    return uuid.uuid4().bytes


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """CRC-32C of ``data``, continuing from the CRC ``value`` of what came before."""
    return _crc(data, value)


def checksum(buf: bytes | bytearray | memoryview, at: int = 4) -> int:
    """The CRC-32C of ``buf`` with its 4-byte checksum field at ``at`` taken as zero."""
    mv = memoryview(buf)
    crc = crc32c(mv[:at])
    crc = crc32c(b"\0\0\0\0", crc)
    return crc32c(mv[at + 4:], crc)


def checksum_ok(buf: bytes | bytearray | memoryview, at: int = 4) -> bool:
    return checksum(buf, at) == int.from_bytes(bytes(buf[at:at + 4]), "little")


def set_checksum(buf: bytearray, at: int = 4) -> None:
    buf[at:at + 4] = b"\0\0\0\0"
    buf[at:at + 4] = crc32c(buf).to_bytes(4, "little")


# -- headers ------------------------------------------------------------------------------------------

_HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")


@dataclass(slots=True)
class Header:
    """One of the two 4 KiB headers (only its defined 80 bytes; the rest is kept on disk as it is)."""

    sequence: int
    file_write_guid: bytes
    data_write_guid: bytes
    log_guid: bytes
    log_version: int
    version: int
    log_length: int
    log_offset: int
    signature: bytes = HEADER_SIGNATURE

    @classmethod
    def parse(cls, buf: bytes) -> Header:
        sig, _crc, seq, fwg, dwg, lg, lv, ver, ll, lo = _HEADER.unpack_from(buf)
        return cls(seq, fwg, dwg, lg, lv, ver, ll, lo, sig)

    def pack(self) -> bytes:
        return _HEADER.pack(self.signature, 0, self.sequence, self.file_write_guid, self.data_write_guid,
                            self.log_guid, self.log_version, self.version, self.log_length, self.log_offset)

    def block(self, old: bytes | bytearray = b"") -> bytearray:
        """The 4 KiB header area with this header over ``old`` (the area as it is on disk, or zeroes),
        checksummed."""
        area = bytearray(HEADER_SIZE)
        area[:len(old[:HEADER_SIZE])] = old[:HEADER_SIZE]
        area[:_HEADER.size] = self.pack()
        set_checksum(area)
        return area


def header_valid(area: bytes) -> Header | None:
    """The header in a 4 KiB area, or None when its checksum, signature or version is wrong."""
    if len(area) < HEADER_SIZE or not checksum_ok(area[:HEADER_SIZE]):
        return None
    hdr = Header.parse(area)
    if hdr.signature != HEADER_SIGNATURE or hdr.version != 1:
        return None
    return hdr


# -- region table ---------------------------------------------------------------------------------------

_REGION_HEADER = struct.Struct("<4sIII")
_REGION_ENTRY = struct.Struct("<16sQII")


@dataclass(frozen=True, slots=True)
class Region:
    guid: bytes
    offset: int
    length: int
    flags: int


def region_table(entries: list[Region]) -> bytearray:
    buf = bytearray(HEADER_BLOCK)
    _REGION_HEADER.pack_into(buf, 0, REGION_SIGNATURE, 0, len(entries), 0)
    for i, r in enumerate(entries):
        _REGION_ENTRY.pack_into(buf, 16 + 32 * i, r.guid, r.offset, r.length, r.flags)
    set_checksum(buf)
    return buf


def parse_region_table(buf: bytes) -> tuple[bytes, int, list[Region]] | None:
    """(signature, entry count, entries) of a checksummed table, None for a bad checksum. The count is
    returned as stored: the caller refuses more than 2047 before the entries are read."""
    if not checksum_ok(buf):
        return None
    sig, _crc, count, _res = _REGION_HEADER.unpack_from(buf)
    entries = [Region(*_REGION_ENTRY.unpack_from(buf, 16 + 32 * i)) for i in range(min(count, 2047))]
    return sig, count, entries


# -- metadata -------------------------------------------------------------------------------------------

_META_HEADER = struct.Struct("<8sHH20x")
_META_ENTRY = struct.Struct("<16sIII4x")


@dataclass(frozen=True, slots=True)
class MetaEntry:
    item: bytes
    offset: int
    length: int
    flags: int


def parse_metadata_table(buf: bytes) -> tuple[bytes, int, list[MetaEntry]]:
    sig, _res, count = _META_HEADER.unpack_from(buf)
    entries: list[MetaEntry] = []
    if count * 32 <= len(buf) - 32:
        entries = [MetaEntry(*_META_ENTRY.unpack_from(buf, 32 + 32 * i)) for i in range(count)]
    return sig, count, entries


def metadata_table(entries: list[MetaEntry]) -> bytearray:
    buf = bytearray(HEADER_BLOCK)
    _META_HEADER.pack_into(buf, 0, METADATA_SIGNATURE, 0, len(entries))
    for i, e in enumerate(entries):
        _META_ENTRY.pack_into(buf, 32 + 32 * i, e.item, e.offset, e.length, e.flags)
    return buf


# -- geometry -------------------------------------------------------------------------------------------

U32 = 0xFFFFFFFF


def chunk_ratio(block_size: int, logical_sector: int) -> int:
    """Payload blocks per sector bitmap block."""
    return MAX_SECTORS_PER_BLOCK * logical_sector // block_size


def bat_entries(virtual_size: int, block_size: int, ratio: int) -> int:
    """qemu's count of BAT entries (payload and interleaved bitmap entries), in its 32-bit arithmetic: a
    zero-sized disk counts one bitmap entry per 2^32 / ratio blocks (qemu makes a 64 MiB BAT for it)."""
    data_blocks = (-(-virtual_size // block_size)) & U32
    return (data_blocks + (((data_blocks - 1) & U32) >> (ratio.bit_length() - 1))) & U32


def true_bat_entries(virtual_size: int, block_size: int, ratio: int) -> int:
    """The BAT entries a disk of this size really needs (no 32-bit wrap-around)."""
    data_blocks = -(-virtual_size // block_size)
    return data_blocks + max(0, data_blocks - 1) // ratio


def default_block_size(size: int) -> int:
    """qemu's automatic block size: keeps the BAT small."""
    if size > 32 * TiB:
        return 64 * MiB
    if size > 100 * GiB:
        return 32 * MiB
    if size > 1 * GiB:
        return 16 * MiB
    return 8 * MiB


# -- log entries ----------------------------------------------------------------------------------------

_LOG_HEADER = struct.Struct("<4sIIIQII16sQQ")
_LOG_DESC = struct.Struct("<4sIQQQ")


@dataclass(slots=True)
class LogHeader:
    checksum: int
    entry_length: int
    tail: int
    sequence: int
    descriptor_count: int
    log_guid: bytes
    flushed_file_offset: int
    last_file_offset: int
    signature: bytes = LOG_SIGNATURE

    @classmethod
    def parse(cls, buf: bytes | bytearray | memoryview) -> LogHeader:
        sig, crc, length, tail, seq, count, _res, lg, flushed, last = _LOG_HEADER.unpack_from(buf)
        return cls(crc, length, tail, seq, count, lg, flushed, last, sig)

    def pack(self) -> bytes:
        return _LOG_HEADER.pack(self.signature, self.checksum, self.entry_length, self.tail, self.sequence,
                                self.descriptor_count, 0, self.log_guid, self.flushed_file_offset,
                                self.last_file_offset)


@dataclass(slots=True)
class LogDescriptor:
    """A data descriptor (``desc``: one 4 KiB sector, whose first 8 and last 4 bytes it carries) or a zero
    descriptor (``zero``: ``zero_length`` bytes of zeroes)."""

    signature: bytes
    trailing: int  # a data descriptor's last 4 bytes of the sector (reserved in a zero descriptor)
    leading: int   # a data descriptor's first 8 bytes; a zero descriptor's length
    file_offset: int
    sequence: int

    @classmethod
    def parse(cls, buf: bytes | bytearray | memoryview, at: int) -> LogDescriptor:
        return cls(*_LOG_DESC.unpack_from(buf, at))

    def pack(self) -> bytes:
        return _LOG_DESC.pack(self.signature, self.trailing, self.leading, self.file_offset, self.sequence)

    def valid_for(self, hdr: LogHeader) -> bool:
        if self.sequence != hdr.sequence or self.file_offset % LOG_SECTOR:
            return False
        if self.signature == ZERO_SIGNATURE:
            return self.leading % LOG_SECTOR == 0
        return self.signature == DESC_SIGNATURE


def desc_sectors(count: int) -> int:
    """Sectors holding the entry header and ``count`` descriptors (never 0)."""
    return -(-(count + 2) // 128)


def data_sector(sector: bytes, sequence: int) -> tuple[bytes, int, int]:
    """A 4 KiB payload sector as a log data sector, with the leading and trailing bytes its descriptor
    carries."""
    body = struct.pack("<4sI", DATA_SIGNATURE, sequence >> 32) + sector[8:4092] + \
        struct.pack("<I", sequence & U32)
    return body, int.from_bytes(sector[:8], "little"), int.from_bytes(sector[4092:], "little")


def sector_of(data: bytes | bytearray | memoryview, desc: LogDescriptor) -> bytes | None:
    """The 4 KiB sector a data descriptor writes, from its data sector; None when the data sector's
    sequence number is not the descriptor's."""
    high = int.from_bytes(bytes(data[4:8]), "little")
    low = int.from_bytes(bytes(data[4092:4096]), "little")
    if (high << 32 | low) != desc.sequence:
        return None
    return desc.leading.to_bytes(8, "little") + bytes(data[8:4092]) + desc.trailing.to_bytes(4, "little")
