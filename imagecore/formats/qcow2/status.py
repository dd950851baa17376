"""qcow2 block status beyond the L2 tables: when to ask the host file about holes, and what it answers.

qemu's qcow2 driver reports an allocated data cluster as data (with its host offset) and leaves the host
file out of it, except in an image it takes for metadata-preallocated: there it adds BDRV_BLOCK_RECURSE,
and the block layer asks the file under the data whether those bytes are a hole, which then reads as
zeroes (block/io.c, ``bdrv_co_block_status``). It decides that once, at its first block status, by
comparing the clusters the refcounts say are in use with the clusters the file has allocated
(``qcow2_detect_metadata_preallocation``): preallocation=metadata leaves a file of holes that the
refcounts claim entirely. :func:`metadata_preallocated` is that test, :func:`host_runs` that question to
the file, asked only when the test said yes. Everywhere else an allocated cluster is data, whatever the
file system keeps under it (a hole punched in it, an unwritten extent of preallocation=falloc), as in
qemu-img map, qemu-nbd's block status and qemu-img convert's choice of what to read.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

from ...errors import CorruptImageError
from ...extent import Extent
from ...hostio import HostFile
from .alloc import Refcounts
from .layout import REFT_OFFSET_MASK
from .tables import REFCOUNT_CODES, unpack_refcounts


def in_use(block: bytes | bytearray, order: int, entries: int) -> int:
    """How many of the first ``entries`` refcounts of a stored refcount block are not zero (a zero entry
    is zero in either byte order, so the entries are counted undecoded, in C)."""
    if order >= 3:
        width = 1 << (order - 3)
        raw = memoryview(block)[:entries * width]
        if width == 1:
            return entries - bytes(raw).count(0)
        a = array(REFCOUNT_CODES[order])
        a.frombytes(raw)
        return entries - a.count(0)
    return entries - unpack_refcounts(bytes(block), order)[:entries].count(0)


async def metadata_preallocated(hf: HostFile, refs: Refcounts, refcount_order: int) -> bool:
    """qemu's qcow2_detect_metadata_preallocation: the clusters of the image file in use by the refcounts
    reach 10/9 of the clusters the file has allocated (at least two more). The count stops as soon as
    it gets there, as qemu's does. A refcount table entry no consistent image has ends it with False, as
    qemu's error does (which then leaves the host file out of block status; both mark the image corrupt on
    the way); an I/O error is raised, as every failed read of metadata is here, rather than taken for an
    answer."""
    if not hf.local:
        return False  # no allocation to compare with (qemu's bdrv_get_allocated_file_size fails over NBD)
    cs = refs.cs
    real = hf.allocated_size() // cs
    threshold = max(real * 10 // 9, real + 2)
    end = -(-hf.size() // cs)  # clusters of the file
    per = 1 << refs.geo.refblock_bits
    count = 0
    for index, entry in enumerate(refs.reftable):
        first = index * per
        if first >= end or count >= threshold:
            break
        if not entry & REFT_OFFSET_MASK:
            continue
        try:
            block, _ = await refs.block_for(first * cs)
        except CorruptImageError:
            return False
        if block is not None:
            count += in_use(block, refcount_order, min(per, end - first))
    return count >= threshold


def host_runs(hf: HostFile, g: int, n: int, host: int) -> Iterator[Extent]:
    """The data run ``[g, g + n)`` at ``host`` in ``hf``, split where the file has holes: a hole is data
    that reads as zeroes (BDRV_BLOCK_DATA | BDRV_BLOCK_ZERO, with its host offset), as qemu reports a
    data cluster of a metadata-preallocated image.

    Past the end of the file everything reads as zeroes, and so does the rest of the run once a hole
    reaches the end of the file (block/io.c marks the whole answer zero then). Each run is looked up when
    it is asked for: a block-status request with NBD_CMD_FLAG_REQ_ONE wants the first one only.
    """
    base = g - host
    for s, t, d in hf.iter_data_runs(host, host + n):
        yield Extent(base + s, t - s, True, not d, 0, True, s)


__all__ = ["host_runs", "in_use", "metadata_preallocated"]
