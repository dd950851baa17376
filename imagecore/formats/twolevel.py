"""The engine shared by qed and qcow (version 1): a fixed L1 table, L2 tables allocated on demand at the
end of the file, data clusters allocated at the end of the file, and backing-file fall-through.

Safety, in the project's model: all table state lives on the event-loop thread behind one metadata lock,
which is released for guest-data I/O; an in-flight registry makes a second allocating write to a cluster
being allocated wait and look again; a reader sees the old mapping until the new one is linked. On disk a
new cluster is written whole (its untouched parts filled from the backing file, an old compressed
cluster or zeroes) before any table entry points to it, and a new L2 table before the L1 entry that
points to it: entries changed in memory reach the file only at a write-back, which syncs the data
first, then writes the L2 entries (and new tables), syncs again when there are new tables, then writes
their L1 entries. A crash can lose unflushed writes and leak the clusters they took, never leave an
entry pointing at a cluster the disk never got.
"""

from __future__ import annotations

import asyncio
import sys
from array import array
from collections import OrderedDict
from collections.abc import AsyncIterator

from ..driver import BlockDriver, Capabilities, OpenContext
from ..errors import ReadOnlyError, UnsupportedError
from ..extent import Extent, amerge_extents
from ..hostio import HostFile, check_range

# what an L2 entry says about its cluster
UNALLOC, ZERO, DATA, COMPRESSED = range(4)

# (kind, guest offset, length, host offset for DATA / raw entry for COMPRESSED)
Run = tuple[int, int, int, int]

TABLE_CACHE_BYTES = 32 * 1024 * 1024
ZERO_CHUNK = 4 * 1024 * 1024


def decode_table(raw: bytes | bytearray, big_endian: bool) -> array[int]:
    table = array("Q")
    table.frombytes(bytes(raw))
    if big_endian != (sys.byteorder == "big"):
        table.byteswap()
    return table


def encode_table(table: array[int], big_endian: bool) -> bytes:
    if big_endian == (sys.byteorder == "big"):
        return table.tobytes()
    out = array("Q", table)
    out.byteswap()
    return out.tobytes()


class TwoLevelDriver(BlockDriver):
    """A two-level image; a format subclass fills in the geometry, the entry kinds and the allocator."""

    big_endian = False
    # data runs' host offsets in extents (map's "offset"); False where the file holds no plain data
    # there (encrypted clusters)
    host_offsets = True

    def __init__(self, hf: HostFile, ctx: OpenContext) -> None:
        self.hf = hf
        self.ctx = ctx
        self.filename = ctx.path
        self.read_only = ctx.read_only or hf.read_only
        self.caps = Capabilities(writable=not self.read_only, zero=True, fast_zero=False, trim=False)
        self.backing = None
        self.size = 0
        self.cs = 0                 # cluster size
        self.l2_entries = 0         # entries per L2 table
        self.l2_bytes = 0           # bytes per L2 table on disk
        self.l1: array[int] = array("Q")
        self.l1_offset = 0
        self._tables: OrderedDict[int, array[int]] = OrderedDict()   # L1 index -> L2 table
        self._dirty: dict[int, tuple[int, int]] = {}                 # L1 index -> changed entries [lo, hi)
        self._new: set[int] = set()                                   # tables whose L1 entry is unwritten
        self._meta = asyncio.Lock()
        self._inflight: dict[int, asyncio.Event] = {}
        self._budget = 4

    # -- what a format supplies --------------------------------------------------------------------
    def kind(self, entry: int) -> int:
        raise NotImplementedError

    def check_data_entry(self, entry: int) -> None:
        """Raise for a data entry that points where no data cluster can be."""

    def check_table_offset(self, offset: int) -> None:
        """Raise for an L1 entry that points where no L2 table can be."""

    def alloc_data(self, n: int) -> int:
        """Host offset of ``n`` new contiguous data clusters (the file grows when they are written)."""
        raise NotImplementedError

    def alloc_table(self) -> int:
        raise NotImplementedError

    async def read_compressed(self, entry: int) -> bytes:
        raise UnsupportedError("compressed clusters are not supported by this format")

    # zero clusters, where the format has them (qed's entry 1), for whole-cluster zero writes
    zero_entry: int | None = None

    # -- set-up ------------------------------------------------------------------------------------
    def _setup_cache(self) -> None:
        self._budget = max(4, TABLE_CACHE_BYTES // max(1, self.l2_bytes))

    @property
    def span(self) -> int:
        return self.cs * self.l2_entries

    # -- tables ------------------------------------------------------------------------------------
    async def _table(self, l1i: int) -> array[int] | None:
        """The L2 table of L1 entry ``l1i``, loaded into the cache; None where the entry is empty.
        Called with the metadata lock held."""
        tbl = self._tables.get(l1i)
        if tbl is not None:
            self._tables.move_to_end(l1i)
            return tbl
        off = self.l1[l1i]
        if off == 0:
            return None
        self.check_table_offset(off)
        raw = await self.hf.pread(off, self.l2_bytes)
        if len(raw) < self.l2_bytes:
            raw = raw + bytes(self.l2_bytes - len(raw))
        tbl = decode_table(raw, self.big_endian)
        self._tables[l1i] = tbl
        self._evict()
        return tbl

    def _evict(self) -> None:
        excess = len(self._tables) - self._budget
        if excess <= 0:
            return
        for idx in list(self._tables)[:-1]:
            if excess <= 0:
                break
            if idx in self._dirty or idx in self._new:
                continue
            del self._tables[idx]
            excess -= 1

    async def _map(self, offset: int, length: int) -> list[Run]:
        """Runs of equal kind covering the range (data runs contiguous on the host). Lock held."""
        runs: list[Run] = []
        cs, span = self.cs, self.span
        pos, end = offset, offset + length

        def add(kind: int, g: int, n: int, host: int) -> None:
            if runs:
                k, g0, n0, h0 = runs[-1]
                if k == kind and kind != COMPRESSED and (kind != DATA or h0 + n0 == host):
                    runs[-1] = (k, g0, n0 + n, h0)
                    return
            runs.append((kind, g, n, host))

        while pos < end:
            l1i = pos // span
            tend = min((l1i + 1) * span, end)
            tbl = await self._table(l1i) if l1i < len(self.l1) else None
            if tbl is None:
                add(UNALLOC, pos, tend - pos, 0)
                pos = tend
                continue
            base = l1i * self.l2_entries
            while pos < tend:
                c, within = divmod(pos, cs)
                n = min(cs - within, tend - pos)
                entry = tbl[c - base]
                kind = self.kind(entry)
                if kind == DATA:
                    self.check_data_entry(entry)
                    add(DATA, pos, n, entry + within)
                else:
                    add(kind, pos, n, entry)
                pos += n
        return runs

    def _mark(self, l1i: int, idx: int) -> None:
        lo, hi = self._dirty.get(l1i, (idx, idx + 1))
        self._dirty[l1i] = (min(lo, idx), max(hi, idx + 1))

    async def _set_entries(self, first_cluster: int, values: list[int]) -> None:
        """Point clusters at new values in memory; they reach the file at the next write-back.
        Lock held."""
        for i, value in enumerate(values):
            c = first_cluster + i
            l1i, idx = divmod(c, self.l2_entries)
            tbl = await self._table(l1i)
            if tbl is None:
                off = self.alloc_table()
                tbl = array("Q", bytes(8 * self.l2_entries))
                self.l1[l1i] = off
                self._tables[l1i] = tbl
                self._new.add(l1i)
            tbl[idx] = value
            self._mark(l1i, idx)
        if len(self._dirty) + len(self._new) > self._budget:
            await self._write_back_locked()

    async def write_back(self) -> None:
        async with self._meta:
            await self._write_back_locked()

    async def _write_back_locked(self) -> None:
        if not self._dirty and not self._new:
            return
        # the clusters the entries name reach the disk before the entries do
        await self.hf.fdatasync()
        new = sorted(self._new)
        for l1i in sorted(set(self._dirty) | self._new):
            tbl = self._tables[l1i]
            if l1i in self._new:
                lo, hi = 0, self.l2_entries
            else:
                lo, hi = self._dirty[l1i]
            await self.hf.pwrite(self.l1[l1i] + 8 * lo, encode_table(tbl[lo:hi], self.big_endian))
        self._dirty.clear()
        if new:
            # a new table is on disk before the L1 entry that points to it
            await self.hf.fdatasync()
            for l1i in new:
                await self.hf.pwrite(self.l1_offset + 8 * l1i,
                                     encode_table(array("Q", [self.l1[l1i]]), self.big_endian))
            self._new.clear()
        self._evict()

    # -- backing fall-through ----------------------------------------------------------------------
    async def read_below(self, offset: int, view: memoryview) -> None:
        """What this layer lacks: the backing file's bytes, zeroes past its end or without one."""
        b = self.backing
        n = len(view)
        inside = 0 if b is None else max(0, min(n, b.size - offset))
        if inside:
            assert b is not None
            if not b.readinto_nowait(offset, view[:inside]):
                await b.readinto(offset, view[:inside])
        if inside < n:
            view[inside:] = bytes(n - inside)

    async def extents_below(self, offset: int, length: int) -> AsyncIterator[Extent]:
        b = self.backing
        inside = 0 if b is None else max(0, min(length, b.size - offset))
        if inside:
            assert b is not None
            async for e in b.extents(offset, inside):
                e.depth += 1
                yield e
        if inside < length:
            yield Extent(offset + inside, length - inside, data=False, zero=True, present=False)

    # -- reads -------------------------------------------------------------------------------------
    async def read_data(self, host: int, guest: int, view: memoryview) -> None:
        """A data run's bytes, from ``host`` in the file (zeroes past its end); ``guest`` is where the run
        starts in the guest (an encrypting format's IVs)."""
        got = await self.hf.readinto(host, view)
        if got < len(view):
            view[got:] = bytes(len(view) - got)

    async def readinto(self, offset: int, buf: memoryview) -> None:
        check_range(offset, len(buf), self.size)
        async with self._meta:
            runs = await self._map(offset, len(buf))
        for kind, g, n, host in runs:
            view = buf[g - offset:g - offset + n]
            if kind == DATA:
                await self.read_data(host, g, view)
            elif kind == ZERO:
                view[:] = bytes(n)
            elif kind == UNALLOC:
                await self.read_below(g, view)
            else:
                data = await self.read_compressed(host)
                within = g % self.cs
                view[:] = data[within:within + n]

    # -- writes ------------------------------------------------------------------------------------
    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError(f"'{self.filename}' is open read-only")

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        self._check_writable()
        check_range(offset, len(data), self.size)
        mv = memoryview(data).cast("B")
        await self._write(offset, mv)
        if fua:
            await self.flush()

    def _busy(self, g: int, n: int) -> asyncio.Event | None:
        """The allocation in flight on a cluster of ``[g, g+n)``, if any."""
        cs = self.cs
        for c in range(g // cs, (g + n - 1) // cs + 1):
            ev = self._inflight.get(c)
            if ev is not None:
                return ev
        return None

    async def _write(self, offset: int, mv: memoryview) -> None:
        cs = self.cs
        pos, end = offset, offset + len(mv)
        while pos < end:
            done: asyncio.Event | None = None
            async with self._meta:
                runs = await self._map(pos, end - pos)
                kind, g, n, host = runs[0]
                busy = None if kind == DATA else self._busy(g, n)
                if kind != DATA and busy is None:
                    # claimed under the lock that linking takes, so no other write allocates them
                    done = asyncio.Event()
                    for c in range(g // cs, (g + n - 1) // cs + 1):
                        self._inflight[c] = done
            if busy is not None:
                await busy.wait()
                continue  # look again: the clusters are linked now
            if kind == DATA:
                await self.hf.pwrite(host, mv[g - offset:g - offset + n])
            else:
                assert done is not None
                await self._allocate(g, mv[g - offset:g - offset + n], runs[0], done)
            pos = g + n

    async def _allocate(self, g: int, chunk: memoryview, run: Run, done: asyncio.Event) -> None:
        """Write ``chunk`` (at guest ``g``, inside ``run``) into new clusters, whole, then link them;
        the clusters are claimed in ``done`` by the caller and released here."""
        cs = self.cs
        kind = run[0]
        first, last = g // cs, (g + len(chunk) - 1) // cs
        try:
            n = last - first + 1
            base = first * cs
            buf = bytearray(n * cs)
            head, tail_end = g - base, g - base + len(chunk)
            if head or tail_end < n * cs:
                await self._fill(kind, run[3], base, memoryview(buf), head, tail_end)
            buf[head:tail_end] = chunk
            # the image's last cluster may run past the guest end: it is still written whole
            async with self._meta:
                host = self.alloc_data(n)
            await self.hf.pwrite(host, buf)
            async with self._meta:
                await self._set_entries(first, [host + i * cs for i in range(n)])
        finally:
            for c in range(first, last + 1):
                del self._inflight[c]
            done.set()

    async def _fill(self, kind: int, entry: int, base: int, buf: memoryview, head: int, tail: int) -> None:
        """The parts of new clusters the write does not cover: what they showed before."""
        if kind == ZERO:
            return
        if kind == COMPRESSED:
            # a compressed run is one cluster
            data = await self.read_compressed(entry)
            buf[:head] = data[:head]
            buf[tail:] = data[tail:len(buf)]
            return
        end = min(base + len(buf), self.size)
        if head:
            await self.read_below(base, buf[:head])
        if base + tail < end:
            await self.read_below(base + tail, buf[tail:end - base])

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool,
                           fua: bool = False) -> None:
        if fast:
            raise UnsupportedError(f"fast zeroing is not supported by the {self.format_name} driver")
        self._check_writable()
        check_range(offset, length, self.size)
        cs = self.cs
        pos, end = offset, offset + length
        while pos < end:
            async with self._meta:
                runs = await self._map(pos, end - pos)
            kind, g, n, host = runs[0]
            if kind == ZERO or (kind == UNALLOC and (self.backing is None or g >= self.backing.size)):
                pos = g + n
                continue
            if kind == DATA:
                n = min(n, ZERO_CHUNK)
                await self.hf.pwrite(host, bytes(n))
                pos = g + n
                continue
            a, b = -(-g // cs) * cs, (g + n) // cs * cs
            if self.zero_entry is not None and kind == UNALLOC and b > a:
                if a > g:
                    n = a - g  # the partial head first, then the whole clusters
                else:
                    async with self._meta:
                        busy = self._busy(a, b - a)
                        if busy is None:
                            # re-read under the lock: nothing was linked there meanwhile
                            again = await self._map(a, b - a)
                            if len(again) == 1 and again[0][0] == UNALLOC:
                                await self._set_entries(a // cs, [self.zero_entry] * ((b - a) // cs))
                                pos = b
                                continue
                    if busy is not None:
                        await busy.wait()
                    continue
            n = min(n, ZERO_CHUNK)
            await self._write(g, memoryview(bytes(n)))
            pos = g + n
        if fua:
            await self.flush()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        # neither format can give clusters back; discard is advisory
        self._check_writable()
        if fua:
            await self.flush()

    async def flush(self) -> None:
        if self.read_only:
            return
        await self.write_back()
        await self.hf.fdatasync()

    # -- status ------------------------------------------------------------------------------------
    async def extents(self, offset: int, length: int) -> AsyncIterator[Extent]:
        async for e in amerge_extents(self._raw_extents(offset, length)):
            yield e

    async def _raw_extents(self, offset: int, length: int) -> AsyncIterator[Extent]:
        pos, end = offset, offset + length
        cs = self.cs
        step = max(self.span, cs)
        # A window at a time, 32 clusters first and each next one 16 times larger up to a table (extents()
        # merges across them): a block-status request with NBD_CMD_FLAG_REQ_ONE (QEMU's always has it)
        # wants one run, and mapping the rest of the table for each made `qemu-img map` over NBD of a
        # qed image of 16,384 runs take 75 s (qemu-nbd: 1.8 s).
        window = 32 * cs
        while pos < end:
            tend = min((pos // step + 1) * step, end, pos - pos % cs + window)
            window = min(window * 16, step)
            async with self._meta:
                runs = await self._map(pos, tend - pos)
            for kind, g, n, host in runs:
                if kind == DATA:
                    yield Extent(g, n, data=True, zero=False, offset=host if self.host_offsets else None)
                elif kind == ZERO:
                    yield Extent(g, n, data=False, zero=True)
                elif kind == COMPRESSED:
                    yield Extent(g, n, data=True, zero=False, compressed=True)
                else:
                    async for e in self.extents_below(g, n):
                        yield e
            pos = tend

    # -- closing -----------------------------------------------------------------------------------
    async def close(self) -> None:
        try:
            if not self.read_only:
                await self.write_back()
                await self.hf.fdatasync()
                await self.on_close()
        finally:
            self.hf.close()
            if self.backing is not None:
                backing, self.backing = self.backing, None
                await backing.close()

    async def on_close(self) -> None:
        """A format's own clean-shutdown step, after the tables are in the file."""

    def data_host_file(self) -> HostFile | None:
        return self.hf

    def cluster_size(self) -> int | None:
        return self.cs
