"""What the registry needs before a qed image is opened: the probe and the create options."""

from __future__ import annotations

from ...driver import CreateOption

MAGIC = b"QED\0"

CREATE_OPTIONS: tuple[CreateOption, ...] = (
    CreateOption("size", "size", "Virtual disk size"),
    CreateOption("backing_file", "string", "File name of a base image"),
    CreateOption("backing_fmt", "string", "Image format of the base image"),
    CreateOption("cluster_size", "size", "Cluster size (in bytes)", "65536"),
    CreateOption("table_size", "size", "L1/L2 table size (in clusters)"),
)


def probe(buf: bytes, filename: str) -> int:
    """qemu's score: 100 for the magic (the probe buffer always holds a whole header)."""
    return 100 if buf[:4] == MAGIC else 0
