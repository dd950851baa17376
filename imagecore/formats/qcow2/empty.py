"""Emptying a closed qcow2 image after a commit, as qemu's make_completely_empty does it.

qemu empties a committed overlay in one of two ways. An image that is v3, has no internal snapshots, no
persistent bitmaps, no encryption and no external data file, and whose L1 table fits beside the header,
refcount table and one refcount block in the clusters that one refcount block counts, is rewritten as a
fresh image of its size: header, refcount table, refcount block, L1 table and nothing else, the file cut
after them. Every other image has each cluster discarded through the driver
(:meth:`Qcow2Driver.make_empty`).

The rewrite leans on the dirty bit, as qemu's does: it is set and synced first, so a crash anywhere in
between leaves an image whose refcounts are rebuilt when it is next opened read-write (by qemu, by
``check -r all`` or by this driver). The old L1 table is zeroed and synced before anything else changes,
and the new tables are zeroed and synced before the header points at them (two syncs more than qemu's,
whose image a cut at the wrong moment leaves with data clusters taken for an L1 table), so such an image
reads through to its backing file wherever it was cut. Its data is in the backing file already: the
caller flushed it there before emptying.
"""

from __future__ import annotations

import struct

from ...hostio import HostFile
from . import layout as L
from .headio import read_header
from .tables import ones_refcount_block

_INCOMPAT_OFFSET = 72
# l1_table_offset (u64), refcount_table_offset (u64), refcount_table_clusters (u32), contiguous from 40
_TABLES = struct.Struct(">QQI")
_TABLES_OFFSET = 40


def _l1_clusters(h: L.Header) -> int:
    return -(-h.l1_size * 8 // h.cluster_size)


async def completely_emptiable(hf: HostFile) -> bool:
    """Whether qemu would rewrite this image as an empty one rather than discard its clusters."""
    h = await read_header(hf)
    per_block = h.cluster_size * 8 >> h.refcount_order
    return (h.version >= 3 and h.nb_snapshots == 0 and h.extension(L.EXT_BITMAPS) is None
            and h.crypt_method == 0 and not h.incompatible_features & L.INCOMPAT_DATA_FILE
            and 3 + _l1_clusters(h) <= per_block)


async def make_completely_empty(hf: HostFile) -> None:
    """Rewrite the closed, writable, locked qcow2 image in ``hf`` as an empty image of the same size and
    backing file (the caller checked :func:`completely_emptiable`)."""
    h = await read_header(hf)
    cs = h.cluster_size
    l1_clusters = _l1_clusters(h)
    dirty = h.incompatible_features | L.INCOMPAT_DIRTY
    # from here until the refcounts are whole again the image says so
    await hf.pwrite(_INCOMPAT_OFFSET, dirty.to_bytes(8, "big"))
    await hf.fdatasync()
    if l1_clusters:
        await hf.pwrite(h.l1_table_offset, bytes(l1_clusters * cs))
        # qemu does not sync here; a cut could then keep the zeroing below but not this, and the old L1
        # table would point into clusters that were zeroed (data the guest would read as zeroes)
        await hf.fdatasync()
    # the refcount table (cluster 1), its one block (cluster 2) and the new L1 table (cluster 3 on), all
    # empty; this may overwrite the old tables, which the dirty bit allows
    await hf.pwrite(cs, bytes((2 + l1_clusters) * cs))
    # and on the disk before the header points at them (qemu syncs only after both): the clusters may
    # have held data, which the header must never take for an L1 table
    await hf.fdatasync()
    await hf.pwrite(_TABLES_OFFSET, _TABLES.pack(3 * cs, cs, 1))
    await hf.fdatasync()
    # the refcount block before the table entry that points at it
    await hf.pwrite(2 * cs, ones_refcount_block(3 + l1_clusters, h.refcount_order, cs))
    await hf.fdatasync()
    await hf.pwrite(cs, (2 * cs).to_bytes(8, "big"))
    await hf.fdatasync()
    await hf.pwrite(_INCOMPAT_OFFSET, (dirty & ~L.INCOMPAT_DIRTY).to_bytes(8, "big"))
    await hf.fdatasync()
    await hf.truncate((3 + l1_clusters) * cs)
    await hf.fdatasync()
