"""Reading a qcow2 header from a host file: its first cluster, which holds the header and its extensions.

The cluster size is only known once the header is read, so 4 KiB are read first and the rest of the
cluster only when it is larger; reading a fixed 2 MiB (the largest cluster) would cost every open and
every check a 2 MiB read and copy.
"""

from __future__ import annotations

from ...hostio import HostFile
from .layout import MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, Header, parse_header, parse_header_fields

_FIRST_READ = 4096


def cluster_bits_of(buf: bytes) -> int:
    """The cluster bits of a header, bounded, so that the first cluster can be read."""
    h = parse_header_fields(buf)
    return min(max(h.cluster_bits, MIN_CLUSTER_BITS), MAX_CLUSTER_BITS)


async def read_first_cluster(hf: HostFile) -> bytes:
    """The image's first cluster (or the whole file, when it is shorter)."""
    fsize = hf.size()
    first = bytearray(min(fsize, _FIRST_READ))
    await hf.readinto(0, memoryview(first))
    cs = 1 << cluster_bits_of(bytes(first))
    if cs > len(first) and fsize > len(first):
        first = bytearray(min(fsize, cs))
        await hf.readinto(0, memoryview(first))
    return bytes(first)


async def read_header(hf: HostFile, *, writable: bool = False, check: bool = False, io: bool = True
                      ) -> Header:
    """The decoded and validated header of the image in ``hf`` (see parse_header for the keywords)."""
    return parse_header(await read_first_cluster(hf), hf.size(), writable=writable, check=check, io=io)
