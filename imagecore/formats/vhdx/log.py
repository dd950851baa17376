"""The vhdx metadata log: finding the active sequence and replaying it on open, and writing through it.

The log is a circular buffer of 4 KiB sectors. An entry is a header and descriptors (each a 4 KiB sector
to write, or a run of zeroes) followed by the data sectors; its CRC-32C covers the whole entry. The header
names the log GUID of the image's active header: entries with another GUID are stale.

On open, a log whose GUID is not zero is searched and its active sequence replayed exactly as qemu 7.2's
vhdx_log_search / vhdx_log_flush do it (including their quirks: the second entry of a sequence is not
held to the first's sequence number, a damaged descriptor fails the open, a last file offset that is a
whole number of MiB does not grow the file). A writer (qemu's vhdx_log_write_and_flush) flushes the data
it changed, writes the entry with a fresh log GUID in both headers, flushes it, writes the sectors in place
and then clears the log GUID: a crash anywhere leaves either the old metadata or a log that replays to the
new one.

Memory stays bounded whatever the header says: the log is read through one 1 MiB window, a descriptor area
larger than the file is refused before it is read, and a zero descriptor may not reach past the file's
last offset.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ...errors import BlockError, ImageFormatError
from ...hostio import HostFile
from .layout import (
    DESC_SIGNATURE,
    LOG_DESC_SIZE,
    LOG_HEADER_SIZE,
    LOG_SECTOR,
    LOG_SIGNATURE,
    ZERO_GUID,
    ZERO_SIGNATURE,
    LogDescriptor,
    LogHeader,
    MiB,
    checksum,
    crc32c,
    data_sector,
    desc_sectors,
    new_guid,
    sector_of,
)

_WINDOW = 1 * MiB

# update_headers(generate_data_guid, log_guid or None): qemu's vhdx_update_headers, provided by the driver
UpdateHeaders = Callable[[bool, "bytes | None"], Awaitable[None]]


class LogError(ImageFormatError):
    """A log that cannot be searched or replayed; qemu fails the open with this errno."""

    def __init__(self, code: int = errno.EINVAL) -> None:
        super().__init__(os.strerror(code))
        self.errno = code


@dataclass(slots=True)
class LogState:
    """qemu's VHDXLogEntries: where the log is, and its read and write indices (byte offsets into it)."""

    offset: int
    length: int
    read: int = 0
    write: int = 0
    sequence: int = 0
    tail: int = 0

    def copy(self) -> LogState:
        return LogState(self.offset, self.length, self.read, self.write, self.sequence, self.tail)

    def inc(self, idx: int) -> int:
        idx += LOG_SECTOR
        return 0 if idx >= self.length else idx


@dataclass(slots=True)
class Sequence:
    """The active log sequence: ``count`` entries from ``log.read`` up to ``log.write``."""

    log: LogState
    count: int
    hdr: LogHeader


@dataclass(slots=True)
class _Reader:
    """Reads log sectors through one cached window (sectors past the end of the file read as zeroes)."""

    hf: HostFile
    file_size: int
    base: int = -1
    buf: bytearray = field(default_factory=bytearray)

    async def sector(self, offset: int) -> bytes:
        start = offset - offset % _WINDOW
        if start != self.base:
            n = max(0, min(_WINDOW, self.file_size - start))
            self.buf = bytearray(_WINDOW)
            if n:
                await self.hf.readinto(start, memoryview(self.buf)[:n])
            self.base = start
        at = offset - start
        return bytes(self.buf[at:at + LOG_SECTOR])


class Log:
    """The log of one open image."""

    def __init__(self, hf: HostFile, state: LogState, log_guid: bytes) -> None:
        self.hf = hf
        self.state = state
        self.log_guid = log_guid
        self._reader = _Reader(hf, hf.size())

    # -- reading (qemu's peek / read_sectors / read_desc) ---------------------------------------------
    async def _peek(self, log: LogState) -> LogHeader:
        if log.read % LOG_SECTOR:
            raise LogError(errno.EFAULT)
        read = log.read
        if read + LOG_HEADER_SIZE > log.length:
            read = 0
        if read == log.write:
            raise LogError()
        return LogHeader.parse(await self._reader.sector(log.offset + read))

    async def _read_sectors(self, log: LogState, count: int) -> list[bytes]:
        out: list[bytes] = []
        read = log.read
        while count:
            if read == log.write:
                break
            out.append(await self._reader.sector(log.offset + read))
            read = log.inc(read)
            count -= 1
        log.read = read
        return out

    def _hdr_valid(self, log: LogState, hdr: LogHeader) -> bool:
        return (hdr.signature == LOG_SIGNATURE and hdr.entry_length <= log.length
                and hdr.entry_length % LOG_SECTOR == 0 and hdr.sequence != 0
                and hdr.log_guid == self.log_guid
                and hdr.descriptor_count * LOG_DESC_SIZE <= hdr.entry_length)

    async def _read_desc(self, log: LogState) -> tuple[LogHeader, bytes, list[LogDescriptor]]:
        hdr = await self._peek(log)
        if not self._hdr_valid(log, hdr):
            raise LogError()
        nsec = desc_sectors(hdr.descriptor_count)
        if nsec * LOG_SECTOR > self._reader.file_size:
            # more descriptor sectors than the file holds: some lie past its end, read as zeroes, and
            # fail validation; refused before they are read
            raise LogError()
        sectors = await self._read_sectors(log, nsec)
        if len(sectors) != nsec:
            raise LogError()
        raw = b"".join(sectors)
        descs: list[LogDescriptor] = []
        for i in range(hdr.descriptor_count):
            d = LogDescriptor.parse(raw, LOG_HEADER_SIZE + i * LOG_DESC_SIZE)
            if not d.valid_for(hdr):
                raise LogError()
            descs.append(d)
        return hdr, raw, descs

    async def _validate(self, log: LogState, seq: int) -> LogHeader | None:
        """qemu's vhdx_validate_log_entry: the entry at ``log.read`` when it is whole, else None (with the
        read index moved on); a damaged descriptor raises."""
        try:
            hdr = await self._peek(log)
        except LogError:
            log.read = log.inc(log.read)
            return None
        if not self._hdr_valid(log, hdr) or (seq > 0 and hdr.sequence != seq + 1):
            log.read = log.inc(log.read)
            return None
        total = hdr.entry_length // LOG_SECTOR
        hdr, raw, _descs = await self._read_desc(log)
        nsec = len(raw) // LOG_SECTOR
        crc = checksum(raw)
        for _ in range(max(0, total - nsec)):
            got = await self._read_sectors(log, 1)
            if len(got) != 1:
                return None
            crc = crc32c(got[0], crc)
        if crc != hdr.checksum:
            return None
        return hdr

    async def search(self) -> Sequence | None:
        """qemu's vhdx_log_search: the valid sequence with the highest first sequence number, or None."""
        cur = self.state.copy()
        cur.write = cur.length  # as if full
        cur.read = 0
        candidate: Sequence | None = None
        steps = 0
        limit = 4 * (cur.length // LOG_SECTOR) + 4
        while True:
            seq = 0
            tail = cur.read
            hdr = await self._validate(cur, seq)
            current: Sequence | None = None
            if hdr is not None:
                current = Sequence(cur.copy(), 1, hdr)
                current.log.read = tail
                current.log.write = cur.read
                while True:
                    steps += 1
                    if steps > limit:
                        raise LogError()
                    nxt = await self._validate(cur, seq)
                    if nxt is None:
                        break
                    current.log.write = cur.read
                    current.count += 1
                    seq = nxt.sequence
            if current is not None and (candidate is None or current.hdr.sequence > candidate.hdr.sequence):
                candidate = current
            steps += 1
            if cur.read < tail or steps > limit:
                break
        if candidate is not None:
            self.state.sequence = candidate.hdr.sequence + 1
        return candidate

    # -- replaying (qemu's vhdx_log_flush) ------------------------------------------------------------
    async def flush(self, logs: Sequence, update_headers: UpdateHeaders,
                    visible_write: Callable[[], Awaitable[None]]) -> None:
        """Write every entry of ``logs`` in place, then mark the log empty (a new, zero log GUID)."""
        await visible_write()
        log = logs.log
        for _ in range(logs.count):
            peek = await self._peek(log)
            file_len = self.hf.size()
            if peek.flushed_file_offset > file_len:
                raise LogError()
            hdr, _raw, descs = await self._read_desc(log)
            limit = max(file_len, hdr.last_file_offset)
            for d in descs:
                if d.signature == DESC_SIGNATURE:
                    got = await self._read_sectors(log, 1)
                    if len(got) != 1:
                        raise LogError()
                    sector = sector_of(got[0], d)
                    if sector is None:
                        raise LogError()
                    await self.hf.pwrite(d.file_offset, sector)
                elif d.signature == ZERO_SIGNATURE:
                    if d.file_offset + d.leading > limit:
                        # qemu would write these zeroes one sector at a time however far they reach
                        raise LogError()
                    await _write_zeroes(self.hf, d.file_offset, d.leading)
            if self.hf.size() < hdr.last_file_offset:
                size = hdr.last_file_offset
                if size % MiB:
                    try:
                        await self.hf.truncate(-(-size // MiB) * MiB)
                    except BlockError:
                        pass  # qemu ignores the result of this truncate
            self._reader = _Reader(self.hf, self.hf.size())
        # the replayed sectors are durable before the log is declared empty: a crash before then
        # replays the (idempotent) log again
        await self.hf.fdatasync()
        self.state.read = self.state.write = 0
        await update_headers(False, ZERO_GUID)
        self.log_guid = ZERO_GUID

    # -- writing (qemu's vhdx_log_write_and_flush) ----------------------------------------------------
    async def write_and_flush(self, offset: int, data: bytes, update_headers: UpdateHeaders,
                              visible_write: Callable[[], Awaitable[None]], log_length: int,
                              guid_now: bytes) -> None:
        """Write ``data`` at file ``offset`` through the log: flush what came before, log it, flush the
        log, write it in place, flush, and clear the log GUID."""
        await self.hf.fdatasync()
        await self._write(offset, data, update_headers, visible_write, log_length, guid_now)
        logs = Sequence(self.state.copy(), 1, LogHeader(0, 0, 0, 0, 0, ZERO_GUID, 0, 0))
        await self.hf.fdatasync()
        self._reader = _Reader(self.hf, self.hf.size())
        await self.flush(logs, update_headers, visible_write)
        self.state = logs.log

    async def _write(self, offset: int, data: bytes, update_headers: UpdateHeaders,
                     visible_write: Callable[[], Awaitable[None]], log_length: int, guid_now: bytes) -> None:
        if len(data) > log_length:
            raise LogError()
        if guid_now != ZERO_GUID:
            raise LogError(errno.ENOTSUP)  # the log is flushed after every write
        fresh = new_guid()
        await update_headers(False, fresh)
        self.log_guid = fresh
        st = self.state
        if st.sequence == 0:
            st.sequence = 1
        # whole 4 KiB sectors of the file, the partial ones merged with what the file holds
        first = offset - offset % LOG_SECTOR
        end = offset + len(data)
        last = -(-end // LOG_SECTOR) * LOG_SECTOR
        span = bytearray(await self.hf.pread(first, last - first))
        span[offset - first:offset - first + len(data)] = data
        count = (last - first) // LOG_SECTOR
        nsec = desc_sectors(count)
        size = self.hf.size()
        hdr = LogHeader(0, (nsec + count) * LOG_SECTOR, st.tail, st.sequence, count, fresh, size, size)
        head = bytearray(nsec * LOG_SECTOR)
        bodies: list[bytes] = []
        for i in range(count):
            sector = bytes(span[i * LOG_SECTOR:(i + 1) * LOG_SECTOR])
            body, lead, trail = data_sector(sector, st.sequence)
            desc = LogDescriptor(DESC_SIGNATURE, trail, lead, first + i * LOG_SECTOR, st.sequence)
            at = LOG_HEADER_SIZE + i * LOG_DESC_SIZE
            head[at:at + LOG_DESC_SIZE] = desc.pack()
            bodies.append(body)
        head[:LOG_HEADER_SIZE] = hdr.pack()
        entry = bytearray(head + b"".join(bodies))
        entry[4:8] = checksum(entry).to_bytes(4, "little")
        await visible_write()
        write = st.write
        for i in range(len(entry) // LOG_SECTOR):
            pos = st.offset + write
            write = st.inc(write)
            if write == st.read:
                raise LogError()  # the log is full (an entry larger than it)
            await self.hf.pwrite(pos, memoryview(entry)[i * LOG_SECTOR:(i + 1) * LOG_SECTOR])
            st.write = write
        st.sequence += 1
        st.tail = st.write


async def _write_zeroes(hf: HostFile, offset: int, length: int) -> None:
    chunk = bytes(min(length, _WINDOW))
    while length > 0:
        n = min(length, len(chunk))
        await hf.pwrite(offset, memoryview(chunk)[:n])
        offset += n
        length -= n
