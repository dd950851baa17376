"""The parallels layout (the ploop image header, as qemu's block/parallels.c reads it), probe, create options.

All fields are little-endian. A 64-byte header, then the block allocation table (BAT): one 32-bit entry per
cluster of ``tracks`` sectors, 0 for an unallocated cluster. With the ``WithoutFreeSpace`` signature an
entry counts sectors; with ``WithouFreSpacExt`` (what qemu creates) it counts clusters. ``inuse`` holds
a magic number while a writer has the image open.
"""

from __future__ import annotations

from ...driver import CreateOption
from ..blocktable import Layout

MAGIC = b"WithoutFreeSpace"
MAGIC_EXT = b"WithouFreSpacExt"
VERSION = 2
INUSE_MAGIC = 0x746F6E59
SECTOR = 512
DEFAULT_CLUSTER_SIZE = 1 << 20
HEADS = 16  # the geometry qemu writes, which nothing reads
SECTORS_PER_CYLINDER = 32
MAX_IMAGE_FACTOR = 1 << 32  # the largest image is this many clusters

HEADER = Layout("<", (
    ("magic", "16s"),
    ("version", "I"),
    ("heads", "I"),
    ("cylinders", "I"),
    ("tracks", "I"),  # sectors per cluster
    ("bat_entries", "I"),
    ("nb_sectors", "Q"),
    ("inuse", "I"),
    ("data_off", "I"),  # first data sector
    ("flags", "I"),
    ("ext_off", "Q"),
))
assert HEADER.size == 64

CREATE_OPTIONS: tuple[CreateOption, ...] = (
    CreateOption("size", "size", "Virtual disk size"),
    CreateOption("cluster_size", "size", "Parallels image cluster size", str(DEFAULT_CLUSTER_SIZE)),
)


def probe(buf: bytes, filename: str) -> int:
    """qemu's score: 100 for either signature with version 2."""
    if buf[:16] in (MAGIC, MAGIC_EXT) and int.from_bytes(buf[16:20], "little") == VERSION:
        return 100
    return 0
