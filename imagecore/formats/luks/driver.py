"""The luks driver: the guest's disk is the payload of a LUKS1 volume, encrypted per 512-byte sector with
the sector's number (counted from the payload's start) as the IV, as qemu's block/crypto.c stores it."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator, Mapping
from typing import Any

from ...crypto import luks
from ...crypto.ciphers import SECTOR_SIZE, CipherSpec, SectorCipher
from ...crypto.secrets import key_secret_of, password
from ...driver import BlockDriver, Capabilities, CheckResult, ImageOpener, OpenContext
from ...errors import (
    BlockError,
    CheckUnsupportedError,
    HostIOError,
    InvalidArgumentError,
    UnsupportedError,
)
from ...extent import Extent
from ...hostio import HostFile, run_blocking

# zeroes are written as encrypted zero sectors (qemu's crypto driver has no cheaper way): this much at once
_ZERO_CHUNK = 1 << 20
_OWN_OPTIONS = ("size", "key-secret", "cipher-alg", "cipher-mode", "ivgen-alg", "ivgen-hash-alg", "hash-alg",
                "iter-time", "preallocation", "nocow", "extent_size_hint")


class LuksDriver(BlockDriver):
    """A LUKS1 volume on one HostFile; without a key (``info``) it describes the header and does no I/O."""

    format_name = "luks"

    def __init__(self, hf: HostFile, path: str, header: luks.LuksHeader, spec: CipherSpec, hash_alg: str,
                 cipher: SectorCipher | None) -> None:
        self.hf = hf
        self.filename = path
        self.header = header
        self.spec = spec
        self.hash_alg = hash_alg
        self.cipher = cipher
        self.payload = header.payload_offset * SECTOR_SIZE
        # the block layer counts whole sectors: a payload ending inside one reads as that whole sector
        self.size = (max(hf.size() - self.payload, 0) + SECTOR_SIZE - 1) & ~(SECTOR_SIZE - 1)
        self.backing = None
        writable = not hf.read_only
        self.caps = Capabilities(writable=writable, zero=writable, fast_zero=False, trim=False, flush=True,
                                 fua=writable, extents=True, multi_conn=True, min_block=1)
        # a partial-sector write reads, decrypts, merges and re-encrypts the sectors it touches: writes are
        # serialised so that two of them never interleave inside one sector
        self._write_lock = asyncio.Lock()

    def _need_key(self) -> SectorCipher:
        if self.cipher is None:
            raise UnsupportedError("The image was opened without its key")
        return self.cipher

    def _read_sync(self, start: int, length: int) -> bytes:
        raw = bytearray(length)
        n = self.hf.readinto_sync(self.payload + start, memoryview(raw))
        if n < length:
            raw[n:] = bytes(length - n)
        return self._need_key().decrypt(start // SECTOR_SIZE, raw)

    async def readinto(self, offset: int, buf: memoryview) -> None:
        if not len(buf):
            return
        start = offset & ~(SECTOR_SIZE - 1)
        end = (offset + len(buf) + SECTOR_SIZE - 1) & ~(SECTOR_SIZE - 1)
        plain = await run_blocking(self._read_sync, start, end - start)
        buf[:] = plain[offset - start:offset - start + len(buf)]

    def _write_sync(self, offset: int, data: bytes | memoryview) -> None:
        cipher = self._need_key()
        start = offset & ~(SECTOR_SIZE - 1)
        end = (offset + len(data) + SECTOR_SIZE - 1) & ~(SECTOR_SIZE - 1)
        if start != offset or end != offset + len(data):
            merged = bytearray(self._read_sync(start, end - start))
            merged[offset - start:offset - start + len(data)] = data
            data = memoryview(merged)
        self.hf.pwrite_sync(self.payload + start, cipher.encrypt(start // SECTOR_SIZE, data))

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        async with self._write_lock:
            await run_blocking(self._write_sync, offset, bytes(data))
        if fua:
            await self.hf.fdatasync()

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool,
                           fua: bool = False) -> None:
        if fast:
            raise UnsupportedError("zeroing an encrypted range is not cheap")
        pos, end = offset, offset + length
        while pos < end:
            n = min(_ZERO_CHUNK - pos % _ZERO_CHUNK, end - pos)
            async with self._write_lock:
                await run_blocking(self._write_sync, pos, bytes(n))
            pos += n
        if fua:
            await self.hf.fdatasync()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        # qemu's crypto driver passes no discard down: the ciphertext stays (and reads the same)
        return None

    async def flush(self) -> None:
        await self.hf.fdatasync()

    async def extents(self, offset: int, length: int) -> AsyncIterator[Extent]:
        # qemu reports the whole payload as allocated data with no host offset (it is not plaintext)
        end = min(offset + length, self.size)
        if end > offset:
            yield Extent(offset, end - offset, data=True, zero=False)

    async def close(self) -> None:
        self.hf.close()

    def format_specific(self) -> dict[str, Any] | None:
        return {"type": "luks", "data": luks.info(self.header, self.spec, self.hash_alg, self.payload)}

    def is_encrypted(self) -> bool:
        return True

    def has_zero_init(self) -> bool:
        # a new payload is whatever its zero bytes decrypt to
        return False

    def data_host_file(self) -> HostFile | None:
        return self.hf


def _read_header(hf: HostFile) -> tuple[luks.LuksHeader, CipherSpec, str]:
    head = bytearray(luks.HEADER_SIZE)
    n = hf.readinto_sync(0, memoryview(head))
    return luks.read_header(bytes(head[:n]))


async def open_luks(hf: HostFile, ctx: OpenContext) -> LuksDriver:
    header, spec, hash_alg = _read_header(hf)
    cipher: SectorCipher | None = None
    if not ctx.options.get("no_io"):
        secret = password(key_secret_of(ctx.options, ""), "")

        def read(offset: int, length: int) -> bytes:
            buf = bytearray(length)
            n = hf.readinto_sync(offset, memoryview(buf))
            return bytes(buf[:n])

        key = await run_blocking(luks.unlock, header, spec, hash_alg, secret, read)
        cipher = SectorCipher(spec, key)
    return LuksDriver(hf, ctx.path, header, spec, hash_alg, cipher)


async def check_luks(hf: HostFile, ctx: OpenContext, repair: str | None) -> CheckResult:
    """qemu-img opens the image with its key first (so a missing or wrong secret is that error), then
    finds the format has no check."""
    try:
        await open_luks(hf, ctx)
    except BlockError as exc:
        exc.open_failure = True  # type: ignore[attr-defined]
        raise
    raise CheckUnsupportedError("This image format does not support checks")


def _create_sync(path: str, size: int, opts: dict[str, str], secret: bytes, prealloc: str) -> None:
    vol = luks.create(opts, secret)
    hf = HostFile.open(path, read_only=False, create=True)
    try:
        os.ftruncate(hf.fd, 0)
        hf.pwrite_sync(0, vol.header.pack())
        hf.pwrite_sync(vol.header.slots[0].key_material_offset * SECTOR_SIZE, vol.material)
        total = vol.payload_offset + size
        os.ftruncate(hf.fd, total)
        if prealloc == "falloc" and size:
            os.posix_fallocate(hf.fd, vol.payload_offset, size)
        elif prealloc == "full" and size:
            zero = bytes(min(size, _ZERO_CHUNK))
            pos = vol.payload_offset
            while pos < total:
                n = min(len(zero), total - pos)
                hf.pwrite_sync(pos, zero[:n])
                pos += n
        os.fdatasync(hf.fd)
    except OSError as exc:
        raise HostIOError.from_oserror(exc, f"Could not create '{path}'") from None
    finally:
        hf.close()


async def create_luks(path: str, size: int, options: Mapping[str, str], *,
                      opener: ImageOpener | None = None, unsafe: bool = False) -> None:
    """A new LUKS1 volume of ``size`` bytes of payload, slot 0 opened by the ``key-secret`` secret."""
    if size < 0:
        raise InvalidArgumentError("Image size must be positive")
    for key in options:
        if key not in _OWN_OPTIONS:
            raise InvalidArgumentError(f"Invalid parameter '{key}'")
    prealloc = options.get("preallocation", "off")
    if prealloc not in ("off", "falloc", "full"):
        raise InvalidArgumentError(f"Unsupported preallocation mode: {prealloc}")
    opts = {k: v for k, v in options.items() if k not in ("size", "key-secret", "preallocation")}
    luks.parse_create_options(opts)  # refused before the file is touched, as qemu parses them
    try:
        secret = password(key_secret_of(options, ""), "")
        await run_blocking(_create_sync, path, size, opts, secret, prealloc)
    except BlockError:
        # qemu has created (or truncated) the file before it reads the secret, and deletes it after any
        # failure from there on, a file that existed before included: its old contents are gone anyway
        _delete_regular_file(path)
        raise


def _delete_regular_file(path: str) -> None:
    try:
        if stat.S_ISREG(os.stat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass
