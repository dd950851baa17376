"""The vhdx block driver: opens an image as qemu 7.2 does (replaying a dirty log), reads and writes it.

Opening follows qemu's vhdx_open step by step, with its checks and errno for each (most refusals read
``Could not open 'PATH': Invalid argument``, as qemu gives no words of its own): the file type
identifier, the two headers (the valid one with the higher sequence number is active), the log (replayed
when its GUID is not zero; refused on a read-only open, with qemu's message), the region table (BAT and
metadata regions, no overlaps), the metadata items, then the BAT with every fully present block inside the
file. Differencing images are refused as qemu refuses them.

Writes allocate a payload block at the end of the file (1 MiB aligned), write the data, then write the
BAT entry through the log (log.py); headers are updated alternately, each with a sequence number one above
the other's, and the first change of a session gives both a new data write GUID. qemu's vhdx has no block
status: ``map`` shows the whole disk as data, as qemu-img shows it.

Memory is bounded by the file: the BAT is read only as far as the file reaches (entries past its end are
zero, as qemu reads them).
"""

from __future__ import annotations

import asyncio
import errno
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

from ... import progname
from ...driver import BlockDriver, Capabilities, CheckResult, OpenContext
from ...errors import (
    BlockError,
    HostIOError,
    ImageFormatError,
    NoSpaceError,
    ReadOnlyError,
    UnsupportedError,
)
from ...extent import Extent
from ...hostio import HostFile
from .layout import (
    BAT_GUID,
    BLOCK_SIZE_MAX,
    BLOCK_SIZE_MIN,
    FILE_PARAM_GUID,
    HEADER1_OFFSET,
    HEADER2_OFFSET,
    HEADER_BLOCK,
    HEADER_SIZE,
    LOG_MIN_SIZE,
    LOGICAL_SECTOR_GUID,
    META_IS_REQUIRED,
    METADATA_GUID,
    METADATA_SIGNATURE,
    METADATA_TABLE_MAX,
    OFFSET_MASK,
    PAGE83_GUID,
    PARAMS_HAS_PARENT,
    PARENT_LOCATOR_GUID,
    PAYLOAD_FULLY_PRESENT,
    PHYS_SECTOR_GUID,
    READS_ZERO,
    REGION_REQUIRED,
    REGION_SIGNATURE,
    REGION_TABLE_OFFSET,
    STATE_MASK,
    VIRTUAL_SIZE_GUID,
    ZERO_GUID,
    Header,
    MiB,
    bat_entries,
    chunk_ratio,
    header_valid,
    new_guid,
    parse_metadata_table,
    parse_region_table,
    true_bat_entries,
)
from .log import Log, LogError, LogState

__all__ = ["VhdxDriver", "check_vhdx", "open_vhdx"]

_META_ITEMS = (FILE_PARAM_GUID, VIRTUAL_SIZE_GUID, PAGE83_GUID, LOGICAL_SECTOR_GUID, PHYS_SECTOR_GUID)
_ZERO_CHUNK = bytes(1 * MiB)
# byte -> 1 where a BAT entry's low byte says "fully present", else 0
_PRESENT_MARK = bytes(1 if b & STATE_MASK == PAYLOAD_FULLY_PRESENT else 0 for b in range(256))


class VhdxDriver(BlockDriver):
    format_name = "vhdx"

    def __init__(self, hf: HostFile, ctx: OpenContext) -> None:
        self.hf = hf
        self.ctx = ctx
        self.filename = ctx.path
        self.read_only = ctx.read_only
        self.size = 0
        self.caps = Capabilities(writable=False)
        self.backing = None
        self.headers: list[Header | None] = [None, None]
        self.curr = 0
        self.session_guid = new_guid()
        self.first_visible_write = True
        self.regions: list[tuple[int, int]] = []
        self.block_size = 0
        self.logical_sector = 512
        self.physical_sector = 512
        self.ratio = 1
        self.bat_offset = 0
        self.bat_length = 0
        self.nentries = 0
        self._bat = bytearray()
        self._bat_extra: dict[int, int] = {}
        self.log_replayed = False
        self.log: Log | None = None
        self._meta = asyncio.Lock()
        self.reports: list[str] = []  # qemu's error_report lines, in order

    # -- opening ---------------------------------------------------------------------------------
    def _fail(self, code: int = errno.EINVAL, reports: list[str] | None = None) -> ImageFormatError:
        """qemu's failed open without words of its own, after the lines it reported on the way: those
        come first in the message (the CLI prints each line as a report of its own, as qemu-img has)."""
        lines = [*self.reports, *(reports or [])]
        self.reports.clear()
        path = self.filename
        text = f"Could not open '{path}': {os.strerror(code)}"
        if lines:
            text = "\n".join([*lines, f"Could not open '{path}': {text}"])
        exc = ImageFormatError(text)
        exc.errno = code
        if lines:
            exc.image_prefix = path  # the verb's "Could not open 'PATH': " is in its place already
            exc.vhdx_reports = (lines, f"Could not open '{path}': {os.strerror(code)}")  # type: ignore[attr-defined]
        return exc

    async def _pread(self, offset: int, length: int) -> bytes:
        if offset >= self.hf.size():
            return bytes(length)
        return await self.hf.pread(offset, length)

    async def open(self, *, check: bool = False) -> None:
        hf = self.hf
        if (await self._pread(0, 8)) != b"vhdxfile":
            raise self._fail()
        await self._parse_headers()
        hdr = self._header
        self.regions.append((hdr.log_offset, hdr.log_offset + hdr.log_length))
        await self._parse_log()
        await self._parse_region_table()
        await self._parse_metadata()
        self.nentries = bat_entries(self.virtual_size, self.block_size, self.ratio)
        if (self.nentries > self.bat_length // 8
                or true_bat_entries(self.virtual_size, self.block_size, self.ratio) > self.bat_length // 8):
            # the second test stands where qemu's 32-bit count wraps around and reads past its BAT
            raise self._fail()
        need = self.nentries * 8
        have = max(0, min(need, hf.size() - self.bat_offset)) // 8 * 8
        self._bat = bytearray(await hf.pread(self.bat_offset, have)) if have else bytearray()
        self.size = (self.virtual_size >> (self.logical_sector.bit_length() - 1)) * 512
        if not check:
            bad, reports = self.check_bat(stop_at_first=True)
            if bad:
                raise self._fail(reports=reports)
        writable = not self.read_only
        self.caps = Capabilities(writable=writable, zero=writable, fast_zero=False, trim=False, flush=True,
                                 fua=writable, extents=True, multi_conn=False)

    @property
    def _header(self) -> Header:
        hdr = self.headers[self.curr]
        assert hdr is not None
        return hdr

    async def _parse_headers(self) -> None:
        raw1 = await self._pread(HEADER1_OFFSET, HEADER_SIZE)
        raw2 = await self._pread(HEADER2_OFFSET, HEADER_SIZE)
        h1, h2 = header_valid(raw1), header_valid(raw2)
        if h1 is not None and h2 is None:
            self.curr = 0
        elif h1 is None and h2 is not None:
            self.curr = 1
        elif h1 is None or h2 is None:
            raise ImageFormatError("No valid VHDX header found")
        elif h1.sequence > h2.sequence:
            self.curr = 0
        elif h2.sequence > h1.sequence:
            self.curr = 1
        elif raw1[:80] == raw2[:80]:
            self.curr = 0  # identical headers (Disk2VHD writes them so) are not corrupt
        else:
            raise ImageFormatError("No valid VHDX header found")
        # an invalid header's slot is rewritten from the active one on the next update
        self.headers = [h1 or Header.parse(bytes(80)), h2 or Header.parse(bytes(80))]

    async def _parse_log(self) -> None:
        hdr = self._header
        state = LogState(hdr.log_offset, hdr.log_length)
        self.log = Log(self.hf, state, hdr.log_guid)
        if hdr.log_offset < LOG_MIN_SIZE or hdr.log_offset % LOG_MIN_SIZE or hdr.log_version != 0:
            raise self._fail()
        if hdr.log_guid == ZERO_GUID or hdr.log_length == 0:
            return
        if hdr.log_length % LOG_MIN_SIZE:
            raise self._fail()
        try:
            logs = await self.log.search()
            if logs is None:
                return
            if self.read_only:
                exc = ImageFormatError(
                    f"VHDX image file '{self.filename}' opened read-only, but contains a log that needs to "
                    "be replayed")
                exc.errno = errno.EPERM
                exc.hint = f"To replay the log, run:\nqemu-img check -r all '{self.filename}'"
                raise exc
            await self.log.flush(logs, self._update_headers, self._visible_write)
        except LogError as err:
            raise self._fail(err.errno) from None
        except (HostIOError, NoSpaceError) as err:
            # a replay write the host refused (a descriptor far past any file size): qemu's open fails
            # with that errno
            raise self._fail(err.errno) from None
        self.log_replayed = True

    def _region_overlaps(self, start: int, length: int) -> bool:
        end = start + length
        for rs, re in reversed(self.regions):
            if not (start >= re or end <= rs):
                self.reports.append(f"VHDX region {start}-{end} overlaps with region {rs}-{re if re else ''}")
                return True
        return False

    async def _parse_region_table(self) -> None:
        parsed = parse_region_table(await self._pread(REGION_TABLE_OFFSET, HEADER_BLOCK))
        if parsed is None:
            raise self._fail()
        sig, count, entries = parsed
        if sig != REGION_SIGNATURE or count > 2047:
            raise self._fail()
        bat = meta = None
        for r in entries:
            if self._region_overlaps(r.offset, r.length):
                raise self._fail()
            self.regions.append((r.offset, r.offset + r.length))
            if r.guid == BAT_GUID:
                if bat is not None:
                    raise self._fail()
                bat = r
            elif r.guid == METADATA_GUID:
                if meta is not None:
                    raise self._fail()
                meta = r
            elif r.flags & REGION_REQUIRED:
                raise self._fail(errno.ENOTSUP)
        if bat is None or meta is None:
            raise self._fail()
        self.bat_offset, self.bat_length = bat.offset, bat.length
        self.meta_offset = meta.offset

    async def _parse_metadata(self) -> None:
        sig, count, entries = parse_metadata_table(await self._pread(self.meta_offset, METADATA_TABLE_MAX))
        if sig != METADATA_SIGNATURE or count * 32 > METADATA_TABLE_MAX - 32:
            raise self._fail()
        found: dict[bytes, int] = {}
        for e in entries:
            if e.item in _META_ITEMS or e.item == PARENT_LOCATOR_GUID:
                if e.item in found:
                    raise self._fail()
                found[e.item] = e.offset
            elif e.flags & META_IS_REQUIRED:
                raise self._fail(errno.ENOTSUP)
        if any(item not in found for item in _META_ITEMS):
            raise self._fail(errno.ENOTSUP)

        async def item(guid: bytes, n: int) -> int:
            return int.from_bytes(await self._pread(self.meta_offset + found[guid], n), "little")

        params = await item(FILE_PARAM_GUID, 8)
        block_size, bits = params & 0xFFFFFFFF, params >> 32
        if bits & PARAMS_HAS_PARENT:
            # qemu does not support differencing images yet
            raise self._fail(errno.ENOTSUP if PARENT_LOCATOR_GUID in found else errno.EINVAL)
        self.virtual_size = await item(VIRTUAL_SIZE_GUID, 8)
        self.logical_sector = await item(LOGICAL_SECTOR_GUID, 4)
        self.physical_sector = await item(PHYS_SECTOR_GUID, 4)
        if not BLOCK_SIZE_MIN <= block_size <= BLOCK_SIZE_MAX:
            raise self._fail()
        if self.logical_sector != 512:
            # qemu 7.2 opens 512-byte logical sectors only (4 KiB ones too are "not supported")
            raise self._fail(errno.ENOTSUP)
        if block_size & (block_size - 1):
            raise self._fail()
        self.block_size = block_size
        self.ratio = chunk_ratio(block_size, self.logical_sector)

    # -- the BAT ---------------------------------------------------------------------------------
    def bat(self, idx: int) -> int:
        at = idx * 8
        if at + 8 <= len(self._bat):
            return int.from_bytes(self._bat[at:at + 8], "little")
        return self._bat_extra.get(idx, 0)

    def _set_bat(self, idx: int, value: int) -> None:
        at = idx * 8
        if at + 8 <= len(self._bat):
            self._bat[at:at + 8] = value.to_bytes(8, "little")
        else:
            self._bat_extra[idx] = value

    def check_bat(self, *, stop_at_first: bool) -> tuple[int, list[str]]:
        """qemu's vhdx_check_bat_entries: fully present blocks must lie inside the file and outside the
        metadata regions. Returns (errors, the lines qemu reports)."""
        file_size = self.hf.size()
        total = self.size
        errors = 0
        lines: list[str] = []
        payblocks = self.ratio
        for i in self._present_indices():
            entry = self.bat(i)
            offset = entry & OFFSET_MASK
            length = max(0, min(self.block_size, total - i * self.block_size))
            bad = False
            if offset > (1 << 63) - 1 - self.block_size:
                lines.append(f"VHDX BAT entry {i} offset overflow.")
                bad = True
            if offset >= file_size:
                lines.append(f"VHDX BAT entry {i} start offset {offset} points after end of file "
                             f"({file_size}). Image has probably been truncated.")
                bad = True
            elif offset + length > file_size:
                lines.append(f"VHDX BAT entry {i} end offset {offset + length - 1} points after end "
                             f"of file ({file_size}). Image has probably been truncated.")
                bad = True
            if payblocks:
                payblocks -= 1
                end = offset + self.block_size
                for rs, re in reversed(self.regions):
                    if not (offset >= re or end <= rs):
                        lines.append(f"VHDX region {offset}-{end} overlaps with region "
                                     f"{rs}-{re if re else ''}")
                        bad = True
                        break
            else:
                payblocks = self.ratio
            if bad:
                errors += 1
                if stop_at_first:
                    break
        return errors, lines

    def _present_indices(self) -> list[int]:
        """The BAT indices whose state is fully present, in order (qemu counts its payload blocks over
        these alone)."""
        out: list[int] = []
        # the state is in each entry's first byte: mark the present ones and find them in C, so that a
        # large, mostly empty BAT costs no Python loop over its entries
        marks = bytes(self._bat[0::8]).translate(_PRESENT_MARK)
        i = marks.find(1)
        while i >= 0:
            out.append(i)
            i = marks.find(1, i + 1)
        out += sorted(i for i, v in self._bat_extra.items()
                      if i < self.nentries and v & STATE_MASK == PAYLOAD_FULLY_PRESENT)
        return out

    def _locate(self, offset: int) -> tuple[int, int, int]:
        """(BAT index, offset in the block, bytes left in the block) of guest ``offset``."""
        block, within = divmod(offset, self.block_size)
        return block + block // self.ratio, within, self.block_size - within

    # -- headers ---------------------------------------------------------------------------------
    async def _update_header(self, generate_data_guid: bool, log_guid: bytes | None) -> None:
        other = 1 - self.curr
        active = self._header
        inactive = self.headers[other]
        assert inactive is not None
        if inactive.signature != b"head" or inactive.version != 1:
            inactive = Header(0, active.file_write_guid, active.data_write_guid, active.log_guid,
                              active.log_version, active.version, active.log_length, active.log_offset)
        inactive.sequence = active.sequence + 1
        inactive.file_write_guid = self.session_guid
        if generate_data_guid:
            inactive.data_write_guid = new_guid()
        if log_guid is not None:
            inactive.log_guid = log_guid
        where = HEADER2_OFFSET if other else HEADER1_OFFSET
        old = await self._pread(where, HEADER_SIZE)
        area = inactive.block(old)
        await self.hf.pwrite(where, bytes(area[:80]) if old[80:] == bytes(area[80:]) else area)
        await self.hf.fdatasync()
        self.headers[other] = inactive
        self.curr = other

    async def _update_headers(self, generate_data_guid: bool, log_guid: bytes | None) -> None:
        """Both headers in turn, as the spec asks, each a sequence number above the other."""
        await self._update_header(generate_data_guid, log_guid)
        await self._update_header(generate_data_guid, log_guid)

    async def _visible_write(self) -> None:
        if self.first_visible_write:
            self.first_visible_write = False
            await self._update_headers(True, None)

    # -- BlockDriver -----------------------------------------------------------------------------
    def _check_write(self) -> None:
        if self.read_only:
            raise ReadOnlyError(f"'{self.filename}' is open read-only")

    async def readinto(self, offset: int, buf: memoryview) -> None:
        pos = 0
        while pos < len(buf):
            idx, within, left = self._locate(offset + pos)
            n = min(left, len(buf) - pos)
            view = buf[pos:pos + n]
            entry = self.bat(idx)
            state = entry & STATE_MASK
            if state in READS_ZERO:
                for at in range(0, n, len(_ZERO_CHUNK)):
                    k = min(n - at, len(_ZERO_CHUNK))
                    view[at:at + k] = _ZERO_CHUNK[:k]
            elif state == PAYLOAD_FULLY_PRESENT:
                base = entry & OFFSET_MASK
                # qemu reads a present block without a file offset from the start of the file
                await self.hf.readinto(base + within if base else 0, view)
            else:
                raise HostIOError(os.strerror(errno.EIO))
            pos += n

    def readinto_nowait(self, offset: int, buf: memoryview) -> bool:
        idx, within, left = self._locate(offset)
        if len(buf) > left or len(buf) > len(_ZERO_CHUNK):
            return False
        entry = self.bat(idx)
        state = entry & STATE_MASK
        if state in READS_ZERO:
            buf[:] = _ZERO_CHUNK[:len(buf)]
            return True
        base = entry & OFFSET_MASK
        if state != PAYLOAD_FULLY_PRESENT or not base:
            return False
        # a short count is the end of the file or an uncached page: the slow path tells them apart
        return self.hf.read_nowait(base + within, buf) == len(buf)

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        self._check_write()
        if self.first_visible_write:
            async with self._meta:
                await self._visible_write()
        pos = 0
        while pos < len(data):
            idx, within, left = self._locate(offset + pos)
            n = min(left, len(data) - pos)
            await self._write_piece(idx, within, data[pos:pos + n])
            pos += n
        if fua:
            await self.flush()

    async def _write_piece(self, idx: int, within: int, data: memoryview) -> None:
        entry = self.bat(idx)
        state = entry & STATE_MASK
        if state == PAYLOAD_FULLY_PRESENT:
            await self._write_present(entry, within, data)
            return
        if state not in READS_ZERO:
            raise HostIOError(os.strerror(errno.EIO))
        async with self._meta:
            entry = self.bat(idx)
            if entry & STATE_MASK == PAYLOAD_FULLY_PRESENT:
                await self._write_present(entry, within, data)
                return
            # a new block at the end of the file (1 MiB aligned); the file grows over it first, so the
            # parts of it this write leaves read as zeroes
            start = -(-self.hf.size() // MiB) * MiB
            await self.hf.truncate(start + self.block_size)
            await self.hf.pwrite(start + within, data)
            new = start | PAYLOAD_FULLY_PRESENT
            assert self.log is not None
            await self.log.write_and_flush(self.bat_offset + idx * 8, new.to_bytes(8, "little"),
                                           self._update_headers, self._visible_write,
                                           self._header.log_length, self._header.log_guid)
            self._set_bat(idx, new)

    async def _write_present(self, entry: int, within: int, data: memoryview) -> None:
        base = entry & OFFSET_MASK
        host = base + within if base else 0
        if host < MiB:
            raise HostIOError(os.strerror(errno.EFAULT))
        await self.hf.pwrite(host, data)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool,
                           fua: bool = False) -> None:
        """Zeroes: blocks that read as zeroes stay as they are, present blocks get zeroes written."""
        if fast:
            raise UnsupportedError("fast zeroing is not supported by the vhdx driver")
        self._check_write()
        pos = 0
        while pos < length:
            idx, _within, left = self._locate(offset + pos)
            n = min(left, length - pos)
            entry = self.bat(idx)
            if entry & STATE_MASK not in READS_ZERO:
                done = 0
                while done < n:
                    k = min(n - done, len(_ZERO_CHUNK))
                    await self.write(offset + pos + done, memoryview(_ZERO_CHUNK)[:k])
                    done += k
            pos += n
        if fua:
            await self.flush()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        # qemu's vhdx has no discard: advisory, nothing to give back
        self._check_write()
        if fua:
            await self.flush()

    async def flush(self) -> None:
        if not self.read_only:
            await self.hf.fdatasync()

    async def extents(self, offset: int, length: int) -> AsyncIterator[Extent]:
        # qemu's vhdx reports no block status: everything is data, as its generic fallback says
        if length > 0:
            yield Extent(offset, length, data=True, zero=False, present=True, depth=0)

    async def close(self) -> None:
        try:
            if not self.read_only and self.hf.has_unsynced_writes:
                await self.hf.fdatasync()
        finally:
            self.hf.close()

    # -- description -----------------------------------------------------------------------------
    def cluster_size(self) -> int | None:
        return self.block_size

    def data_host_file(self) -> HostFile | None:
        return self.hf

    def format_specific(self) -> dict[str, Any] | None:
        return None


async def open_vhdx(hf: HostFile, ctx: OpenContext, *, check: bool = False) -> VhdxDriver:
    drv = VhdxDriver(hf, ctx)
    try:
        await drv.open(check=check)
    except BaseException:
        hf.close()
        raise
    return drv


async def check_vhdx(hf: HostFile, ctx: OpenContext, repair: str | None) -> CheckResult:
    """qemu's vhdx check: a log replayed by this (read-write) open is a corruption fixed; every fully
    present block outside the file or over the metadata is a corruption."""
    # the verb closes hf itself; the driver gets its own descriptor so that closing it leaves hf open
    own = HostFile.open(hf.path, read_only=hf.read_only)
    own.sync_enabled = hf.sync_enabled
    try:
        drv = await open_vhdx(own, ctx, check=True)
    except BlockError as exc:
        exc.open_failure = True  # type: ignore[attr-defined]
        reports = getattr(exc, "vhdx_reports", None)
        if reports is not None:
            # qemu-img check prints what the open reported before its one-line error
            lines, exc.message = reports
            exc.image_prefix = None
            for line in lines:
                sys.stderr.write(f"{progname.name()}: {line}\n")
        raise
    try:
        errors, lines = drv.check_bat(stop_at_first=False)
        return CheckResult(corruptions=errors, corruptions_fixed=1 if drv.log_replayed else 0,
                           messages=[f"{progname.name()}: {line}" for line in lines])
    finally:
        await drv.close()
