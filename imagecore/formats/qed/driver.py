"""The qed block driver: header, open-time checks and need-check handling, the consistency check, create.

The tables, allocation and backing fall-through are the shared two-level engine's (``formats.twolevel``);
this module adds what is qed's own, worded and ordered as qemu 7.2's ``block/qed*.c``:
- open refuses a bad header with qemu's messages, in qemu's order, and resets unknown autoclear bits
  when writable;
- an image whose need-check flag is set (not closed cleanly by a writer that relied on it) is checked
  and repaired when opened writable, then marked clean, as qemu does; read-only opens leave it;
- the engine's write order (data synced before the entries that name it) keeps the image consistent
  at every instant, so this driver never needs to set the flag itself: a crash only leaks clusters;
- ``check`` is qemu's: invalid table and cluster offsets are corruptions (cleared with ``-r``),
  clusters referenced twice are corruptions, unreferenced ones are leaks (never repaired).
"""

from __future__ import annotations

import os
import struct

from ...driver import CheckResult, OpenContext
from ...errors import BlockError, ImageFormatError, InvalidArgumentError, NoSpaceError, UnsupportedError
from ...hostio import HostFile
from ...units import parse_option_size
from ..twolevel import DATA, UNALLOC, ZERO, TwoLevelDriver, decode_table, encode_table
from .spec import MAGIC

__all__ = ["QedDriver", "change_backing_file", "check_qed", "create_qed", "open_qed", "resize_qed"]

_HEADER = struct.Struct("<4sIIIQQQQQII")
HEADER_BYTES = _HEADER.size  # 64

F_BACKING_FILE = 0x01
F_NEED_CHECK = 0x02
F_BACKING_FORMAT_NO_PROBE = 0x04
FEATURE_MASK = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE

MIN_CLUSTER = 4 * 1024
MAX_CLUSTER = 64 * 1024 * 1024
MIN_TABLE, MAX_TABLE, DEFAULT_TABLE = 1, 16, 4
DEFAULT_CLUSTER = 65536
# qemu's table buffers hold PATH_MAX bytes of backing file name
MAX_BACKING_NAME = 4096
# A table is read whole into memory: bound it (qemu's largest, 64 MiB clusters x 16, is 1 GiB)
MAX_TABLE_BYTES = 64 * 1024 * 1024


class QedHeader:
    def __init__(self, raw: bytes) -> None:
        (self.magic, self.cluster_size, self.table_size, self.header_size, self.features,
         self.compat_features, self.autoclear_features, self.l1_table_offset, self.image_size,
         self.backing_filename_offset, self.backing_filename_size) = _HEADER.unpack(raw)

    def pack(self) -> bytes:
        return _HEADER.pack(self.magic, self.cluster_size, self.table_size, self.header_size, self.features,
                            self.compat_features, self.autoclear_features, self.l1_table_offset,
                            self.image_size, self.backing_filename_offset, self.backing_filename_size)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def cluster_size_valid(cs: int) -> bool:
    return MIN_CLUSTER <= cs <= MAX_CLUSTER and _pow2(cs)


def table_size_valid(ts: int) -> bool:
    return MIN_TABLE <= ts <= MAX_TABLE and _pow2(ts)


def max_image_size(cs: int, ts: int) -> int:
    entries = ts * cs // 8
    return entries * cs * entries


def image_size_valid(size: int, cs: int, ts: int) -> bool:
    return size % 512 == 0 and size <= max_image_size(cs, ts)


class QedDriver(TwoLevelDriver):
    format_name = "qed"
    big_endian = False
    zero_entry = 1

    def __init__(self, hf: HostFile, ctx: OpenContext, header: QedHeader) -> None:
        super().__init__(hf, ctx)
        self.header = header
        self.cs = header.cluster_size
        self.l2_entries = header.cluster_size * header.table_size // 8
        self.l2_bytes = header.cluster_size * header.table_size
        self.l1_offset = header.l1_table_offset
        self.size = header.image_size
        self.file_size = hf.size() // self.cs * self.cs  # qemu's s->file_size: the allocation point
        self.backing_name: str | None = None
        self._setup_cache()

    # -- the engine's hooks ------------------------------------------------------------------------
    def kind(self, entry: int) -> int:
        if entry == 0:
            return UNALLOC
        if entry == 1:
            return ZERO
        return DATA

    def cluster_offset_valid(self, offset: int) -> bool:
        h = self.header
        return offset % self.cs == 0 and h.header_size * self.cs <= offset < self.file_size

    def table_offset_valid(self, offset: int) -> bool:
        end = offset + (self.header.table_size - 1) * self.cs
        if end <= offset:
            # qemu's own test, which also refuses every table of one cluster (qemu cannot open those)
            return False
        return self.cluster_offset_valid(offset) and self.cluster_offset_valid(end)

    def check_data_entry(self, entry: int) -> None:
        if not self.cluster_offset_valid(entry):
            raise InvalidArgumentError("Invalid argument")

    def check_table_offset(self, offset: int) -> None:
        if not self.table_offset_valid(offset):
            raise InvalidArgumentError("Invalid argument")

    def alloc_data(self, n: int) -> int:
        off = self.file_size
        self.file_size += n * self.cs
        return off

    def alloc_table(self) -> int:
        return self.alloc_data(self.header.table_size)

    # -- opening -----------------------------------------------------------------------------------
    async def _open(self, *, for_check: bool) -> None:
        h, ctx = self.header, self.ctx
        if h.features & F_BACKING_FILE:
            if h.backing_filename_offset + h.backing_filename_size > self.cs * h.header_size:
                raise InvalidArgumentError("QED backing filename offset is invalid")
            if h.backing_filename_size >= MAX_BACKING_NAME:
                raise InvalidArgumentError("Invalid argument")
            raw = await self.hf.pread(h.backing_filename_offset, h.backing_filename_size)
            raw = raw.ljust(h.backing_filename_size, b"\0")
            # a C string: it ends at its first NUL
            self.backing_name = raw.split(b"\0", 1)[0].decode("utf-8", errors="surrogateescape")
        if h.autoclear_features and not self.read_only:
            # unknown autoclear bits are knocked out, as qemu does, so that their owner sees them gone
            h.autoclear_features = 0
            await self.hf.pwrite(0, h.pack())
            await self.hf.fdatasync()
        raw = await self.hf.pread(self.l1_offset, self.l2_bytes)
        self.l1 = decode_table(raw.ljust(self.l2_bytes, b"\0"), False)
        if not for_check and h.features & F_NEED_CHECK and not self.read_only:
            # not closed cleanly: check and repair before writing, as qemu's open does
            await self.check(fix=True)
        if self.backing_name and not ctx.options.get("no_backing"):
            fmt = "raw" if h.features & F_BACKING_FORMAT_NO_PROBE else None
            self.backing = await ctx.opener.open_backing(self.backing_name, fmt, ctx)

    # -- the consistency check ---------------------------------------------------------------------
    async def check(self, *, fix: bool) -> CheckResult:
        """qemu's qed_check: walk L1 and every L2 table; with ``fix`` clear invalid offsets and, when
        nothing is left wrong, clear the need-check flag."""
        h, cs = self.header, self.cs
        res = CheckResult(total_clusters=-(-h.image_size // cs))
        nclusters = -(-self.file_size // cs)
        used = bytearray(nclusters)
        allocated = fragmented = 0
        failed = False

        def set_used(offset: int, n: int) -> bool:
            first = -(-offset // cs)
            dup = 0
            for c in range(first, first + n):
                if used[c]:
                    dup += 1
                used[c] = 1
            res.corruptions += dup
            return dup == 0

        set_used(self.l1_offset, h.table_size)
        invalid_l1 = 0
        for i in range(len(self.l1)):
            off = self.l1[i]
            if off == 0:
                continue
            if not self.table_offset_valid(off):
                if fix:
                    self.l1[i] = 0
                    res.corruptions_fixed += 1
                else:
                    res.corruptions += 1
                invalid_l1 += 1
                continue
            if not set_used(off, h.table_size):
                continue
            try:
                raw = await self.hf.pread(off, self.l2_bytes)
            except BlockError:
                res.check_errors += 1
                failed = True
                continue
            tbl = decode_table(raw.ljust(self.l2_bytes, b"\0"), False)
            invalid = 0
            last = 0
            for j in range(len(tbl)):
                e = tbl[j]
                if e <= 1:
                    continue
                allocated += 1
                if last and last + cs != e:
                    fragmented += 1
                last = e
                if not self.cluster_offset_valid(e):
                    if fix:
                        tbl[j] = 0
                        res.corruptions_fixed += 1
                    else:
                        res.corruptions += 1
                    invalid += 1
                    continue
                set_used(e, 1)
            if invalid and fix:
                await self.hf.pwrite(off, encode_table(tbl, False))
                self._tables.pop(i, None)
        if invalid_l1 and fix:
            await self.hf.pwrite(self.l1_offset, encode_table(self.l1, False))
        if not failed:
            res.leaks = sum(1 for c in range(h.header_size, nclusters) if not used[c])
        res.allocated_clusters = allocated
        res.fragmented_clusters = fragmented
        if fix and not res.corruptions and not res.check_errors and h.features & F_NEED_CHECK:
            # the repairs reach the disk before the flag says the image is clean
            await self.hf.fdatasync()
            h.features &= ~F_NEED_CHECK
            await self.hf.pwrite(0, h.pack())
            await self.hf.fdatasync()
        return res

    # -- description -------------------------------------------------------------------------------
    def is_dirty(self) -> bool:
        # qemu 7.2's qemu-img info reports false for qed whatever the need-check flag says
        return False

    def backing_filename(self) -> str | None:
        return self.backing_name or None

    def backing_format(self) -> str | None:
        if self.backing_name and self.header.features & F_BACKING_FORMAT_NO_PROBE:
            return "raw"
        return None


async def _read_header(hf: HostFile) -> QedHeader:
    raw = await hf.pread(0, HEADER_BYTES)
    h = QedHeader(raw.ljust(HEADER_BYTES, b"\0"))
    if h.magic != MAGIC:
        raise ImageFormatError("Image not in QED format")
    if h.features & ~FEATURE_MASK:
        raise UnsupportedError(f"Unsupported QED features: {h.features & ~FEATURE_MASK:x}")
    if not cluster_size_valid(h.cluster_size):
        raise InvalidArgumentError("QED cluster size is invalid")
    if not table_size_valid(h.table_size):
        raise InvalidArgumentError("QED table size is invalid")
    if not image_size_valid(h.image_size, h.cluster_size, h.table_size):
        raise InvalidArgumentError("QED image size is invalid")
    return h


async def _open(hf: HostFile, ctx: OpenContext, *, for_check: bool = False) -> QedDriver:
    h = await _read_header(hf)
    drv = QedDriver(hf, ctx, h)
    if not drv.table_offset_valid(h.l1_table_offset):
        raise InvalidArgumentError("QED table offset is invalid")
    if h.header_size > 0xFFFFFFFF // h.cluster_size:
        raise InvalidArgumentError("QED header size is invalid")
    if drv.l2_bytes > MAX_TABLE_BYTES:
        raise UnsupportedError(f"QED tables of {drv.l2_bytes} bytes are too large for imagecore")
    try:
        await drv._open(for_check=for_check)
    except BaseException:
        if drv.backing is not None:
            await drv.backing.close()
        raise
    return drv


async def open_qed(hf: HostFile, ctx: OpenContext) -> QedDriver:
    return await _open(hf, ctx)


async def check_qed(hf: HostFile, ctx: OpenContext, repair: str | None) -> CheckResult:
    """qemu-img check for qed: any ``-r`` repairs what qed can repair (invalid offsets)."""
    try:
        drv = await _open(hf, OpenContext(opener=ctx.opener, read_only=ctx.read_only, path=ctx.path,
                                          chain=ctx.chain, options=dict(ctx.options, no_backing=True)),
                          for_check=True)
    except BlockError as exc:
        exc.open_failure = True  # type: ignore[attr-defined]
        raise
    try:
        return await drv.check(fix=repair is not None)
    finally:
        # the check works on the caller's HostFile: leave it open
        drv.read_only = True
        if drv.backing is not None:
            await drv.backing.close()


async def resize_qed(hf: HostFile, size: int, preallocation: str) -> None:
    """qemu's bdrv_qed_co_truncate: growing only, to a valid size; the header takes the new size (the
    tables already cover every size the geometry allows)."""
    h = await _read_header(hf)
    if preallocation != "off":
        raise UnsupportedError(f"Unsupported preallocation mode '{preallocation}'")
    if not image_size_valid(size, h.cluster_size, h.table_size):
        raise InvalidArgumentError("Invalid image size specified")
    if size < h.image_size:
        raise UnsupportedError("Shrinking images is currently not supported")
    h.image_size = size
    await hf.pwrite(0, h.pack())
    await hf.fdatasync()


async def change_backing_file(hf: HostFile, name: str | None, fmt: str | None) -> None:
    """qemu's bdrv_qed_change_backing_file: the name right after the header, the feature bits to match
    (no-probe for a raw backing file); ENOSPC when it does not fit the header clusters."""
    h = await _read_header(hf)
    raw = os.fsencode(name) if name is not None else b""
    if name is not None and h.compat_features:
        raise UnsupportedError("Operation not supported")
    if HEADER_BYTES + len(raw) > h.header_size * h.cluster_size:
        raise NoSpaceError("No space left on device")
    h.features &= ~(F_BACKING_FILE | F_BACKING_FORMAT_NO_PROBE)
    if name is not None:
        h.features |= F_BACKING_FILE
        if fmt == "raw":
            h.features |= F_BACKING_FORMAT_NO_PROBE
    h.backing_filename_offset, h.backing_filename_size = HEADER_BYTES, len(raw)
    await hf.pwrite(0, h.pack() + raw)
    await hf.fdatasync()


# -- create -------------------------------------------------------------------------------------------

def _size_option(options: dict[str, str], name: str, default: int) -> int:
    text = options.get(name)
    return default if text is None else parse_option_size(name, text)


async def create_qed(path: str, size: int, options: dict[str, str], *, opener: object = None,
                     unsafe: bool = False) -> None:
    """qemu's bdrv_qed_co_create: header, backing file name after it, a zeroed L1 table at cluster 1."""
    cs = _size_option(options, "cluster_size", DEFAULT_CLUSTER)
    ts = _size_option(options, "table_size", DEFAULT_TABLE)
    size = -(-size // 512) * 512
    if not cluster_size_valid(cs):
        raise InvalidArgumentError(
            f"QED cluster size must be within range [{MIN_CLUSTER}, {MAX_CLUSTER}] and power of 2")
    if not table_size_valid(ts):
        raise InvalidArgumentError(
            f"QED table size must be within range [{MIN_TABLE}, {MAX_TABLE}] and power of 2")
    if not image_size_valid(size, cs, ts):
        raise InvalidArgumentError("QED image size must be a non-zero multiple of cluster size and less "
                                   f"than {max_image_size(cs, ts)} bytes")
    if cs * ts > MAX_TABLE_BYTES:
        raise UnsupportedError(f"QED tables of {cs * ts} bytes are too large for imagecore")
    backing = options.get("backing_file")
    name = b""
    features = 0
    if backing is not None:
        name = os.fsencode(backing)
        features |= F_BACKING_FILE
        if options.get("backing_fmt") == "raw":
            features |= F_BACKING_FORMAT_NO_PROBE
        if HEADER_BYTES + len(name) > cs:
            raise InvalidArgumentError("Backing file name too long")
    h = QedHeader(bytes(HEADER_BYTES))
    h.magic, h.cluster_size, h.table_size, h.header_size = MAGIC, cs, ts, 1
    h.features, h.l1_table_offset, h.image_size = features, cs, size
    if backing is not None:
        h.backing_filename_offset, h.backing_filename_size = HEADER_BYTES, len(name)
    hf = HostFile.open(path, read_only=False, create=True)
    try:
        await hf.truncate(0)
        await hf.pwrite(0, h.pack() + name)
        # written as zeroes, not left a hole: the file takes the space qemu's does (info's actual-size)
        chunk = 1 << 20
        for pos in range(0, cs * ts, chunk):
            await hf.pwrite(cs + pos, bytes(min(chunk, cs * ts - pos)))
        await hf.fdatasync()
    finally:
        hf.close()

