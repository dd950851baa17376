"""A one-level block table driver: guest block index -> host offset or unallocated (vdi, vpc, parallels).

The formats that map their guest space through a single table of fixed-size blocks share everything but
their layout: reads walk the table, a write to an unallocated block allocates one at the end of the file,
extents report each block as allocated (data) or not (zeroes). :class:`BlockTableDriver` does that once;
a format subclasses it and supplies the layout:

- ``table``: one ``array('I')`` of the decoded entries, one per guest block (the format decodes them
  from the file and chooses the entry values: a block number for vdi, a sector for vpc and parallels);
- :meth:`~BlockTableDriver.block_host` turns an entry into the host offset of the block's first guest
  byte, or None when the block is not allocated (it then reads as zeroes);
- :meth:`~BlockTableDriver.place_block` picks where a new block goes (the end of the file), prepares the
  space (vpc's sector bitmap and the footer after it) and returns the new entry;
- :meth:`~BlockTableDriver.write_table_entries` and :meth:`~BlockTableDriver.before_table_write` write the
  changed entries (and the header fields that count them) to the file.

Data safety, as for qcow2 and vmdk (ARCHITECTURE.md): a new block is placed past the current end of the
file (or zeroed first when something is already there), so it reads as zeroes until written, never as
stale data. Its table entry stays in memory until a write-back, which first makes the data durable
(fdatasync), then writes the format's header fields, then the table sectors that changed. ``flush`` is a
write-back followed by its own fdatasync; so is ``close``, and an allocation once too many entries are
pending. A crash can lose unflushed writes and leave space past the table's end, never make a table
entry point at data that did not reach the disk.

Concurrency: allocations run under one lock, and the in-memory entry is set before the lock is released,
so two writers to one new block never both allocate it; guest data is written outside the lock.
"""

from __future__ import annotations

import asyncio
import struct
import sys
from array import array
from collections.abc import AsyncIterator, Sequence
from typing import Any

from ..driver import BlockDriver
from ..errors import ReadOnlyError, UnsupportedError
from ..extent import Extent
from ..hostio import HostFile

# entries allocated since the last write-back before an allocation writes them back itself: keeps the
# number of blocks a crash can leak, and the table sectors held dirty, bounded
MAX_PENDING = 4096

# A table bigger than this must lie inside the file: a hostile header cannot make us allocate gigabytes
# for entries that would all read as zero past the end of the file anyway.
MAX_TABLE_PAST_EOF = 64 << 20


class Layout:
    """A fixed binary record (a header, a footer), declared once as ``(field name, struct code)`` pairs in
    the spec's order and words; unpacks to a dict and packs from one (absent fields are zero)."""

    def __init__(self, byteorder: str, fields: Sequence[tuple[str, str]]) -> None:
        self.names = tuple(name for name, _ in fields)
        self.codes = tuple(code for _, code in fields)
        self.struct = struct.Struct(byteorder + "".join(self.codes))
        self.size = self.struct.size
        self._offsets: dict[str, int] = {}
        pos = 0
        for name, code in fields:
            self._offsets[name] = pos
            pos += struct.calcsize(byteorder + code)

    def offset(self, name: str) -> int:
        """Where field ``name`` starts in the record."""
        return self._offsets[name]

    def unpack(self, buf: bytes | bytearray) -> dict[str, Any]:
        """The record at the start of ``buf`` (zero-filled when short, as a read past EOF gives)."""
        raw = bytes(buf[:self.size])
        if len(raw) < self.size:
            raw += bytes(self.size - len(raw))
        return dict(zip(self.names, self.struct.unpack(raw), strict=True))

    def pack(self, values: dict[str, Any]) -> bytes:
        out = []
        for name, code in zip(self.names, self.codes, strict=True):
            default: Any = b"" if code.endswith("s") else 0
            out.append(values.get(name, default))
        return self.struct.pack(*out)


def decode_table(raw: bytes, count: int, *, big_endian: bool) -> array[int]:
    """``count`` 32-bit entries from ``raw`` (zero-filled past its end, as a read past EOF gives)."""
    need = count * 4
    if len(raw) < need:
        raw = raw + bytes(need - len(raw))
    table = array("I")
    table.frombytes(raw[:need])
    if (sys.byteorder == "big") != big_endian:
        table.byteswap()
    return table


def encode_entries(table: array[int], first: int, last: int, *, big_endian: bool) -> bytes:
    """Entries ``[first, last)`` of ``table`` as the file stores them."""
    part = array("I", table[first:last])
    if (sys.byteorder == "big") != big_endian:
        part.byteswap()
    return part.tobytes()


class BlockTableDriver(BlockDriver):
    """Shared I/O of the one-level block table formats; see the module docstring for the contract."""

    hf: HostFile
    block_size: int
    table: array[int]
    table_offset: int  # host offset of entry 0
    big_endian: bool
    # Static vdi and fixed vpc are mapped through the file (qemu's BDRV_BLOCK_RECURSE/RAW): a host hole
    # inside an allocated block reports data *and* zero, as qemu-img map shows it.
    recurse_host: bool = False
    # Table sectors are written back in units of this many bytes (the sector the entries lie in).
    table_unit: int = 512
    # False where qemu reports unallocated blocks as not allocated at all (a format with backing support,
    # parallels): qemu-img map's "present": false
    unallocated_present: bool = True

    def init_table(self, read_only: bool) -> None:
        self._alloc_lock = asyncio.Lock()
        self._pending: set[int] = set()  # guest blocks whose entries are not yet in the file
        self._read_only = read_only

    # -- the format's part ------------------------------------------------------------------------
    def block_host(self, entry: int) -> int | None:
        """Host offset of the first guest byte of a block with table entry ``entry``; None: unallocated."""
        raise NotImplementedError

    async def place_block(self, index: int) -> int:
        """Reserve space for guest block ``index`` at the end of the file; return its new table entry.

        Runs under the allocation lock; the space must read as zeroes when this returns."""
        raise NotImplementedError

    async def touch_block(self, index: int, entry: int) -> None:
        """Called before a write into block ``index``, already allocated with ``entry``: the format may
        update per-block metadata (vpc's sector bitmap)."""

    async def before_table_write(self) -> None:
        """Write the header fields that count allocations; called after the data sync, before the table."""

    # -- helpers for formats ---------------------------------------------------------------------
    async def zero_new_space(self, start: int, end: int) -> None:
        """Make ``[start, end)`` of the file read as zeroes: past EOF by growing the file, else by zeroing."""
        size = self.hf.size()
        if start < size:
            stop = min(end, size)
            try:
                await self.hf.zero_range(start, stop - start)
            except UnsupportedError:
                await self.hf.write_zeroes_slow(start, stop - start)
        if end > size:
            await self.hf.truncate(end)

    # -- reads ------------------------------------------------------------------------------------
    def _pieces(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(guest offset, length, block index) pieces of a range, each inside one block."""
        bs = self.block_size
        out = []
        end = offset + length
        while offset < end:
            idx = offset // bs
            n = min(end, (idx + 1) * bs) - offset
            out.append((offset, n, idx))
            offset += n
        return out

    def _host_of(self, idx: int) -> int | None:
        if idx >= len(self.table):
            return None
        return self.block_host(self.table[idx])

    async def readinto(self, offset: int, buf: memoryview) -> None:
        pos = 0
        run_host: int | None = None
        run_start = run_len = 0
        # adjacent pieces that lie contiguously in the file are read with one call
        for goff, n, idx in self._pieces(offset, len(buf)):
            host = self._host_of(idx)
            if host is not None:
                host += goff - idx * self.block_size
            if run_len and run_host is not None and host == run_host + run_len:
                run_len += n
            else:
                await self._read_run(run_host, buf, run_start, run_len)
                run_host, run_start, run_len = host, pos, n
            pos += n
        await self._read_run(run_host, buf, run_start, run_len)

    async def _read_run(self, host: int | None, buf: memoryview, at: int, n: int) -> None:
        if not n:
            return
        view = buf[at:at + n]
        if host is None:
            view[:] = bytes(n)
        else:
            await self.hf.readinto(host, view)

    # -- writes -----------------------------------------------------------------------------------
    def _check_writable(self) -> None:
        if self._read_only or self.hf.read_only:
            raise ReadOnlyError("Image is read-only")

    async def _allocate(self, idx: int) -> int:
        """The host offset of block ``idx``, allocating it when needed."""
        async with self._alloc_lock:
            host = self._host_of(idx)
            if host is not None:
                return host
            if len(self._pending) >= MAX_PENDING:
                await self._writeback_locked()
            entry = await self.place_block(idx)
            self.table[idx] = entry
            self._pending.add(idx)
            host = self.block_host(entry)
            assert host is not None
            return host

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        self._check_writable()
        pos = 0
        for goff, n, idx in self._pieces(offset, len(data)):
            host = self._host_of(idx)
            if host is None:
                host = await self._allocate(idx)
            else:
                await self.touch_block(idx, self.table[idx])
            await self.hf.pwrite(host + goff - idx * self.block_size, data[pos:pos + n])
            pos += n
        if fua:
            await self.flush()

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool,
                           fua: bool = False) -> None:
        self._check_writable()
        # An unallocated block already reads as zeroes: nothing to write (qemu writes zero buffers and
        # allocates; leaving the block unallocated reads the same and keeps the image small).
        for goff, n, idx in self._pieces(offset, length):
            host = self._host_of(idx)
            if host is None:
                continue
            at = host + goff - idx * self.block_size
            try:
                await self.hf.zero_range(at, n)
            except UnsupportedError:
                if fast:
                    raise
                await self.hf.write_zeroes_slow(at, n)
        if fua:
            await self.flush()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        # qemu's vdi and vpc drivers do not discard: a trim is advisory and changes nothing
        self._check_writable()

    # -- write-back -------------------------------------------------------------------------------
    async def _writeback_locked(self) -> None:
        if not self._pending:
            return
        pending = sorted(self._pending)
        await self.hf.fdatasync()  # the new blocks' data first
        await self.before_table_write()
        unit = self.table_unit // 4
        first_unit = None
        last_unit = -1
        # contiguous runs of changed table sectors, each written once
        for idx in pending:
            u = idx // unit
            if first_unit is not None and u <= last_unit + 1:
                last_unit = u
                continue
            if first_unit is not None:
                await self._write_units(first_unit, last_unit)
            first_unit = last_unit = u
        if first_unit is not None:
            await self._write_units(first_unit, last_unit)
        self._pending.clear()

    async def _write_units(self, first: int, last: int) -> None:
        unit = self.table_unit // 4
        lo = first * unit
        hi = min((last + 1) * unit, len(self.table))
        await self.hf.pwrite(self.table_offset + lo * 4,
                             encode_entries(self.table, lo, hi, big_endian=self.big_endian))

    async def writeback(self) -> None:
        async with self._alloc_lock:
            await self._writeback_locked()

    async def flush(self) -> None:
        if self._read_only or self.hf.read_only:
            return
        await self.writeback()
        await self.hf.fdatasync()

    async def close(self) -> None:
        try:
            if not (self._read_only or self.hf.read_only) and self._pending:
                await self.flush()
        finally:
            self.hf.close()

    # -- extents ----------------------------------------------------------------------------------
    async def extents(self, offset: int, length: int) -> AsyncIterator[Extent]:
        end = min(offset + length, self.size)
        bs = self.block_size
        pos = offset
        while pos < end:
            idx = pos // bs
            host = self._host_of(idx)
            stop = min(end, (idx + 1) * bs)
            if host is None:
                # unallocated blocks in a row make one run; past the table's end everything is
                # unallocated (a hostile size with a short table must not cost a step per block)
                while stop < end and self._host_of(stop // bs) is None:
                    if stop // bs >= len(self.table):
                        stop = end
                        break
                    stop = min(end, stop + bs)
                yield Extent(pos, stop - pos, data=False, zero=True, present=self.unallocated_present)
            else:
                at = host + pos - idx * bs
                if self.recurse_host:
                    for hs, he, is_data in self.hf.iter_data_runs(at, at + stop - pos):
                        yield Extent(pos + hs - at, he - hs, data=True, zero=not is_data, offset=hs)
                else:
                    yield Extent(pos, stop - pos, data=True, zero=False, offset=at)
            pos = stop

    def data_host_file(self) -> HostFile | None:
        return self.hf

    def cluster_size(self) -> int | None:
        return self.block_size
