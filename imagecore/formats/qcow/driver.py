"""The qcow (version 1) block driver: header and open-time checks as qemu 7.2's ``block/qcow.c`` words
them, compressed clusters (read, and written by ``convert -c``), and create.

The tables, allocation and backing fall-through are the shared two-level engine's (``formats.twolevel``).
Where qemu places things, this driver does too: L2 tables and data clusters at the end of the file rounded
up to a cluster, compressed clusters packed byte-wise after the last byte. Legacy AES-encrypted images
are read with their secret (qemu's words for an open without one) and refused for writing.
"""

from __future__ import annotations

import os
import struct
import zlib

from ...crypto.ciphers import SectorCipher
from ...crypto.qcowaes import legacy_cipher
from ...crypto.secrets import key_secret_of, password
from ...driver import OpenContext, driver_known
from ...errors import ImageFormatError, InvalidArgumentError, UnsupportedError
from ...hostio import HostFile, run_blocking
from ..qcow2.compress import compress_clusters
from ..twolevel import COMPRESSED, DATA, UNALLOC, TwoLevelDriver, decode_table
from .spec import MAGIC

__all__ = ["QcowDriver", "create_qcow", "open_qcow"]

_HEADER = struct.Struct(">4sIQIIQBBHIQ")
HEADER_BYTES = _HEADER.size  # 48
OFLAG_COMPRESSED = 1 << 63
CRYPT_NONE, CRYPT_AES = 0, 1
SECTOR = 512
# the L1 table is held in memory: bound it (8 TiB of guest at the default geometry)
MAX_L1_ENTRIES = 4 * 1024 * 1024
# qemu's decompression cache holds one cluster; a few more here, since requests run concurrently
_DECOMPRESSED_CACHE = 8
KEY_REQUIRED = "Parameter 'encrypt.key-secret' is required for cipher"


class QcowDriver(TwoLevelDriver):
    format_name = "qcow"
    big_endian = True

    def __init__(self, hf: HostFile, ctx: OpenContext) -> None:
        super().__init__(hf, ctx)
        self.cbits = 0
        self.encrypted = False
        self.cipher: SectorCipher | None = None  # legacy AES, opened with its secret for reading
        self.backing_name: str | None = None
        self._end = hf.size()  # qemu allocates from the file's length
        self._decompressed: dict[int, bytes] = {}

    # -- the engine's hooks ------------------------------------------------------------------------
    def kind(self, entry: int) -> int:
        if entry == 0:
            return UNALLOC
        return COMPRESSED if entry & OFLAG_COMPRESSED else DATA

    def _align_end(self) -> int:
        return -(-self._end // self.cs) * self.cs

    def alloc_data(self, n: int) -> int:
        off = self._align_end()
        self._end = off + n * self.cs
        return off

    def alloc_table(self) -> int:
        off = self._align_end()
        self._end = off + self.l2_bytes
        return off

    async def read_data(self, host: int, guest: int, view: memoryview) -> None:
        if self.cipher is None:
            await super().read_data(host, guest, view)
            return
        # legacy AES: whole sectors encrypted with their guest sector's number as the IV (compressed
        # clusters are stored in the clear); the sectors around the run are read and decrypted
        head = guest % SECTOR
        span = -(-(head + len(view)) // SECTOR) * SECTOR
        raw = await self.hf.pread(host - head, span)
        raw += bytes(span - len(raw))
        plain = await run_blocking(self.cipher.decrypt, (guest - head) // SECTOR, raw)
        view[:] = plain[head:head + len(view)]

    async def read_compressed(self, entry: int) -> bytes:
        got = self._decompressed.get(entry)
        if got is not None:
            return got
        cb = self.cbits
        offset = entry & ((1 << (63 - cb)) - 1)
        csize = (entry >> (63 - cb)) & (self.cs - 1)
        raw = await self.hf.pread(offset, csize)
        try:
            data = await run_blocking(_inflate, raw, self.cs)
        except zlib.error:
            data = b""
        if len(data) != self.cs:
            raise ImageFormatError("Input/output error")
        if len(self._decompressed) >= _DECOMPRESSED_CACHE:
            self._decompressed.pop(next(iter(self._decompressed)))
        self._decompressed[entry] = data
        return data

    # -- opening -----------------------------------------------------------------------------------
    async def _open(self) -> None:
        ctx = self.ctx
        raw = (await self.hf.pread(0, HEADER_BYTES)).ljust(HEADER_BYTES, b"\0")
        (magic, version, backing_offset, backing_size, _mtime, size, cbits, l2bits, _pad, crypt,
         l1_offset) = _HEADER.unpack(raw)
        if magic != MAGIC:
            raise ImageFormatError("Image not in qcow format")
        if version != 1:
            err = UnsupportedError(f"qcow (v1) does not support qcow version {version}")
            err.hint = "Try the 'qcow2' driver instead."
            raise err
        if size <= 1:
            raise InvalidArgumentError("Image size is too small (must be at least 2 bytes)")
        if cbits < 9 or cbits > 16:
            raise InvalidArgumentError("Cluster size must be between 512 and 64k")
        if l2bits < 9 - 3 or l2bits > 16 - 3:
            raise InvalidArgumentError("L2 table size must be between 512 and 64k")
        if crypt > CRYPT_AES:
            raise InvalidArgumentError("invalid encryption method in qcow header")
        self.encrypted = crypt == CRYPT_AES
        if self.encrypted and not ctx.options.get("no_io"):
            secret = password(key_secret_of(ctx.options, "encrypt."), "encrypt.")
            if not self.read_only:
                # qemu 7.2 still writes these; here they are read-only, as legacy qcow2 AES is (the
                # cipher leaks patterns and is kept only to copy data out)
                raise UnsupportedError("Legacy qcow AES encryption is supported read-only here: convert "
                                       "the image to LUKS")
            self.cipher = legacy_cipher(secret)
        # ciphertext: no host offset to read plain data at (qemu reports none either)
        self.host_offsets = not self.encrypted
        self.cbits = cbits
        self.cs = 1 << cbits
        self.l2_entries = 1 << l2bits
        self.l2_bytes = 8 << l2bits
        self.size = size // SECTOR * SECTOR
        shift = cbits + l2bits
        if size > (1 << 64) - 1 - (1 << shift):
            raise InvalidArgumentError("Image too large")
        l1_size = (size + (1 << shift) - 1) >> shift
        if l1_size > (2**31 - 1) // 8:
            raise InvalidArgumentError("Image too large")
        if l1_size > MAX_L1_ENTRIES:
            raise UnsupportedError(f"qcow L1 table of {l1_size} entries is too large for imagecore")
        self.l1_offset = l1_offset
        raw_l1 = await self.hf.pread(l1_offset, l1_size * 8)
        self.l1 = decode_table(raw_l1.ljust(l1_size * 8, b"\0"), True)
        if backing_offset:
            if backing_size > 1023:
                raise InvalidArgumentError("Backing file name too long")
            name = (await self.hf.pread(backing_offset, backing_size)).split(b"\0", 1)[0]
            self.backing_name = name.decode("utf-8", errors="surrogateescape") or None
        self._setup_cache()
        if self.backing_name and not ctx.options.get("no_backing"):
            self.backing = await ctx.opener.open_backing(self.backing_name, None, ctx)

    # -- compressed writes (convert -c) ------------------------------------------------------------
    async def write_compressed(self, offset: int, data: memoryview) -> None:
        """Whole guest clusters, compressed as qemu's qcow_co_pwritev_compressed compresses them."""
        mv = memoryview(data).cast("B")
        packed = await run_blocking(compress_clusters, bytes(mv), self.cs, "zlib")
        await self.write_compressed_clusters(offset, mv, packed)

    async def write_compressed_clusters(self, offset: int, data: memoryview,
                                        packed: list[bytes | None]) -> None:
        """``packed[i]``: cluster i deflated (raw deflate, 4 KiB window, as qemu's), or None where it
        does not shrink and goes in plainly. Each compressed cluster is appended after the last byte of
        the file, written, and only then linked."""
        self._check_writable()
        cs = self.cs
        mv = memoryview(data).cast("B")
        if offset % cs or (len(mv) % cs and offset + len(mv) != self.size) \
                or len(packed) != -(-len(mv) // cs):
            raise InvalidArgumentError("compressed writes must cover whole clusters")
        for i, blob in enumerate(packed):
            g = offset + i * cs
            chunk = mv[i * cs:(i + 1) * cs]
            if blob is None:
                await self._write(g, chunk)
                continue
            async with self._meta:
                runs = await self._map(g, len(chunk))
                if runs[0][0] == DATA or self._busy(g, len(chunk)) is not None:
                    plain = True
                else:
                    plain = False
                    host = self._end
                    self._end += len(blob)
            if plain:
                await self._write(g, chunk)
                continue
            await self.hf.pwrite(host, blob)
            entry = host | OFLAG_COMPRESSED | (len(blob) << (63 - self.cbits))
            async with self._meta:
                await self._set_entries(g // cs, [entry])

    # -- description -------------------------------------------------------------------------------
    def backing_filename(self) -> str | None:
        return self.backing_name

    def backing_format(self) -> str | None:
        return None  # qcow stores none; the backing file is probed


def _inflate(raw: bytes, cs: int) -> bytes:
    d = zlib.decompressobj(-12)
    return d.decompress(raw, cs)


async def open_qcow(hf: HostFile, ctx: OpenContext) -> QcowDriver:
    drv = QcowDriver(hf, ctx)
    try:
        await drv._open()
    except BaseException:
        if drv.backing is not None:
            await drv.backing.close()
        raise
    return drv


# L1 tables up to this size are written as zeroes at create (as qemu writes them); larger ones are left
# a hole, which reads the same without writing gigabytes
_ZERO_WRITE_LIMIT = 16 * 1024 * 1024


async def create_qcow(path: str, size: int, options: dict[str, str], *, opener: object = None,
                      unsafe: bool = False) -> None:
    """qemu's qcow_co_create: header, backing file name, the L1 table in zeroed sectors."""
    if options.get("encrypt.format") or options.get("encryption", "off") in ("on", "true", "yes"):
        if not options.get("encrypt.key-secret"):
            raise InvalidArgumentError(KEY_REQUIRED)
        raise UnsupportedError("imagecore cannot create AES-encrypted qcow images")
    # qcow has nowhere to keep a backing format, but qemu still refuses one it does not know
    backing_fmt = options.get("backing_fmt")
    if backing_fmt is not None and not driver_known(backing_fmt):
        raise InvalidArgumentError(f"unrecognized backing format '{backing_fmt}'")
    if size == 0:
        raise InvalidArgumentError("Image size is too small, cannot be zero length")
    size = -(-size // SECTOR) * SECTOR
    backing = options.get("backing_file")
    header_size = HEADER_BYTES
    backing_offset = backing_len = 0
    name = b""
    if backing is not None:
        name = os.fsencode(backing)
        backing_offset, backing_len = header_size, len(name)
        header_size += len(name)
        # 512-byte clusters, so that a write never copies from the backing file; 32 KiB L2 tables
        cbits, l2bits = 9, 12
    else:
        cbits, l2bits = 12, 9
    header_size = (header_size + 7) & ~7
    shift = cbits + l2bits
    l1_size = (size + (1 << shift) - 1) >> shift
    head = _HEADER.pack(MAGIC, 1, backing_offset, backing_len, 0, size, cbits, l2bits, 0, CRYPT_NONE,
                        header_size)
    l1_bytes = -(-(l1_size * 8) // SECTOR) * SECTOR
    hf = HostFile.open(path, read_only=False, create=True)
    try:
        await hf.truncate(0)
        await hf.pwrite(0, head + name)
        if l1_bytes <= _ZERO_WRITE_LIMIT:
            await hf.pwrite(header_size, bytes(l1_bytes))
        else:
            await hf.truncate(header_size + l1_bytes)
        await hf.fdatasync()
    finally:
        hf.close()
