"""Growing a closed qcow2 image in place: a new virtual size that its L1 table already has room for.

The L1 table occupies whole clusters, so it usually has unused entries past ``l1_size`` (with 64 KiB
clusters one L1 cluster maps 4 TiB). Growing into them needs no allocation and no refcount change: the
new entries are zeroed and flushed first, then the header's ``size`` and ``l1_size`` are written together
in one sector-sized write and flushed. A crash between the two steps leaves the old, consistent image.
"""

from __future__ import annotations

import struct

from ...errors import ImageFormatError, UnsupportedError
from ...hostio import HostFile
from . import layout as L
from .headio import read_header

# size (u64), crypt_method (u32), l1_size (u32): the contiguous header fields at offset 24
_SIZE_TO_L1 = struct.Struct(">QII")
_SIZE_OFFSET = 24


async def grow(hf: HostFile, size: int) -> int:
    """Set the virtual size of the qcow2 image in ``hf`` to ``size`` (>= the current one); returns the old."""
    h = await read_header(hf)
    if h.incompatible_features & L.INCOMPAT_CORRUPT:
        raise ImageFormatError("qcow2 image is marked corrupt; repair it with check -r all first")
    if h.incompatible_features & L.INCOMPAT_DIRTY:
        raise ImageFormatError("qcow2 image was not closed cleanly; repair it with check -r all first")
    if h.nb_snapshots:
        raise UnsupportedError("Can't resize an image which has snapshots")
    if h.data_file is not None:
        raise UnsupportedError("resizing qcow2 images with an external data file is not supported yet")
    if size % 512:
        raise UnsupportedError("The new size must be a multiple of 512")
    if size > L.MAX_VIRTUAL_SIZE:
        raise UnsupportedError("Image size exceeds the maximum of the qcow2 format")
    old = h.size
    if size < old:
        raise UnsupportedError("shrinking qcow2 images is not supported yet")
    if size == old:
        return old
    cs = h.cluster_size
    need = -(-size // (cs * h.l2_entries))
    capacity = (-(-h.l1_size * 8 // cs) * cs) // 8 if h.l1_size else 0
    if need > capacity:
        raise UnsupportedError("growing this qcow2 image needs a larger L1 table, which is not supported yet")
    if need > h.l1_size:
        await hf.pwrite(h.l1_table_offset + h.l1_size * 8, bytes((need - h.l1_size) * 8))
        await hf.fdatasync()
    await hf.pwrite(_SIZE_OFFSET, _SIZE_TO_L1.pack(size, h.crypt_method, max(need, h.l1_size)))
    await hf.fdatasync()
    return old
