"""The VHD layout (Microsoft's Virtual Hard Disk Image Format Specification), its probe and create options.

All fields are big-endian. Every image ends with a 512-byte *hard disk footer*; a dynamic image also keeps
a copy at offset 0, followed by the *dynamic disk header* (at the footer's ``data_offset``) and the
*block allocation table* (BAT, at the header's ``table_offset``): one 32-bit sector number per block, where
the block's sector bitmap lies, followed by its data. A fixed image is its data, then the footer.
"""

from __future__ import annotations

from ...driver import CreateOption
from ..blocktable import Layout

COOKIE = b"conectix"
DYN_COOKIE = b"cxsparse"
SECTOR = 512
FOOTER_SIZE = 512
DYN_HEADER_SIZE = 1024
TYPE_FIXED = 2
TYPE_DYNAMIC = 3
TYPE_DIFFERENCING = 4
UNUSED = 0xFFFFFFFF  # a BAT entry of a block that is not allocated
DEFAULT_BLOCK_SIZE = 2 << 20
TIMESTAMP_BASE = 946684800  # the footer counts seconds from 2000-01-01 00:00 UTC

# the largest geometry (cylinders x heads x sectors per track) and the largest disk qemu opens (2040 GiB)
CHS_MAX = (65535, 16, 255)
MAX_GEOMETRY = 65535 * 16 * 255
MAX_SECTORS = 0xFF000000

# creator applications whose images take their size from the footer's current size, not the geometry
# (Hyper-V, qemu with force_size, disk2vhd, XenConverter, XenServer), as qemu decides
CURRENT_SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")

FOOTER = Layout(">", (
    ("cookie", "8s"),
    ("features", "I"),
    ("file_format_version", "I"),
    ("data_offset", "Q"),
    ("time_stamp", "I"),
    ("creator_application", "4s"),
    ("creator_version_major", "H"),
    ("creator_version_minor", "H"),
    ("creator_host_os", "4s"),
    ("original_size", "Q"),
    ("current_size", "Q"),
    ("disk_geometry_cylinders", "H"),
    ("disk_geometry_heads", "B"),
    ("disk_geometry_sectors", "B"),
    ("disk_type", "I"),
    ("checksum", "I"),
    ("unique_id", "16s"),
    ("saved_state", "B"),
    ("reserved", "427s"),
))
assert FOOTER.size == FOOTER_SIZE

DYN_HEADER = Layout(">", (
    ("cookie", "8s"),
    ("data_offset", "Q"),
    ("table_offset", "Q"),
    ("header_version", "I"),
    ("max_table_entries", "I"),
    ("block_size", "I"),
    ("checksum", "I"),
    ("parent_unique_id", "16s"),
    ("parent_time_stamp", "I"),
    ("reserved", "I"),
    ("parent_unicode_name", "512s"),
    ("parent_locator_entries", "192s"),  # eight of (code, data space, data length, reserved, offset)
    ("reserved2", "256s"),
))
assert DYN_HEADER.size == DYN_HEADER_SIZE

CREATE_OPTIONS: tuple[CreateOption, ...] = (
    CreateOption("size", "size", "Virtual disk size"),
    CreateOption("subformat", "string",
                 "Type of virtual hard disk format. Supported formats are {dynamic (default) | fixed} "),
    CreateOption("force_size", "bool",
                 "Force disk size calculation to use the actual size specified, rather than using the "
                 "nearest CHS-based calculation"),
)


def checksum(record: bytes, at: int) -> int:
    """The one's complement of the byte sum of ``record`` with its checksum field (at ``at``) as zeroes."""
    total = sum(record) - sum(record[at:at + 4])
    return ~total & 0xFFFFFFFF


def probe(buf: bytes, filename: str) -> int:
    """qemu's score: 100 for a footer copy at offset 0 (dynamic images). A fixed image keeps its only
    footer at the end, which qemu never looks at when probing: it probes as raw, which its data also is."""
    return 100 if buf[:8] == COOKIE else 0


def geometry(total_sectors: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) for a disk of ``total_sectors``, by the spec's algorithm
    (which may round down); sizes past the largest geometry get it."""
    total_sectors = min(total_sectors, MAX_GEOMETRY)
    if total_sectors >= 65535 * 16 * 63:
        secs, heads = 255, 16
        cyl_heads = total_sectors // secs
    else:
        secs = 17
        cyl_heads = total_sectors // secs
        heads = max(4, -(-cyl_heads // 1024))
        if cyl_heads >= heads * 1024 or heads > 16:
            secs, heads = 31, 16
            cyl_heads = total_sectors // secs
        if cyl_heads >= heads * 1024:
            secs, heads = 63, 16
            cyl_heads = total_sectors // secs
    return cyl_heads // heads, heads, secs


def rounded_geometry(size: int, force_size: bool) -> tuple[tuple[int, int, int], int]:
    """The geometry and the virtual size in sectors qemu gives a new image of ``size`` bytes.

    Without ``force_size`` the size grows to the first geometry that holds it (so that a convert never
    truncates); a size no geometry holds, or ``force_size``, gets the largest geometry and keeps its own
    size (the footer's current size then says it). None for a disk past 2040 GiB."""
    if force_size:
        chs = CHS_MAX
    else:
        want = min(MAX_GEOMETRY, -(-size // SECTOR))
        chs = (0, 0, 0)
        i = 0
        while want > chs[0] * chs[1] * chs[2]:
            chs = geometry(want + i)
            i += 1
    if chs[0] * chs[1] * chs[2] == MAX_GEOMETRY:
        return chs, size // SECTOR
    return chs, chs[0] * chs[1] * chs[2]
