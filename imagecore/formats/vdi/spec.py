"""The vdi layout (VirtualBox's VDI 1.1 header, as qemu's block/vdi.c reads it), its probe and create options.

All fields are little-endian. The header is one 512-byte sector at offset 0; the block map (``bmap``),
one 32-bit entry per guest block, starts at ``offset_bmap``; block ``n`` of the file lies at
``offset_data + n * block_size``.
"""

from __future__ import annotations

from ...driver import CreateOption
from ..blocktable import Layout

SIGNATURE = 0xBEDA107F
VERSION_1_1 = 0x00010001
TYPE_DYNAMIC = 1
TYPE_STATIC = 2
SECTOR = 512
BLOCK_SIZE = 1 << 20  # the only block size qemu opens or creates
HEADER_SIZE_FIELD = 0x180  # what qemu writes in header_size
# the text qemu puts in the banner; VirtualBox's own images carry theirs, which nobody reads
TEXT = b"<<< QEMU VM Virtual Disk Image >>>\n"

# A never-allocated block (reads as zeroes) and a discarded one (also zeroes); entries below are blocks.
UNALLOCATED = 0xFFFFFFFF
DISCARDED = 0xFFFFFFFE

# qemu's limits: a block map must fit in INT_MAX bytes rounded down to a sector
BLOCKS_IN_IMAGE_MAX = ((0x7FFFFFFF // SECTOR) * SECTOR) // 4
DISK_SIZE_MAX = BLOCKS_IN_IMAGE_MAX * BLOCK_SIZE

HEADER = Layout("<", (
    ("text", "64s"),
    ("signature", "I"),
    ("version", "I"),
    ("header_size", "I"),
    ("image_type", "I"),
    ("image_flags", "I"),
    ("description", "256s"),
    ("offset_bmap", "I"),
    ("offset_data", "I"),
    ("cylinders", "I"),
    ("heads", "I"),
    ("sectors", "I"),
    ("sector_size", "I"),
    ("unused1", "I"),
    ("disk_size", "Q"),
    ("block_size", "I"),
    ("block_extra", "I"),
    ("blocks_in_image", "I"),
    ("blocks_allocated", "I"),
    ("uuid_image", "16s"),
    ("uuid_last_snap", "16s"),
    ("uuid_link", "16s"),
    ("uuid_parent", "16s"),
    ("unused2", "56s"),
))
assert HEADER.size == SECTOR

CREATE_OPTIONS: tuple[CreateOption, ...] = (
    CreateOption("size", "size", "Virtual disk size"),
    CreateOption("static", "bool", "VDI static (pre-allocated) image", "off"),
)


def probe(buf: bytes, filename: str) -> int:
    """qemu's score: 100 when the signature follows the 64-byte banner."""
    return 100 if int.from_bytes(buf[0x40:0x44], "little") == SIGNATURE else 0
