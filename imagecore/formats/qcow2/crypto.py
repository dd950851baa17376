"""Encrypted qcow2 images: the LUKS header that the full disk encryption header extension points to, and
legacy AES (read-only); the one cipher the data path applies where guest data goes to or from the file.

qemu encrypts each 512-byte sector of a data cluster on its own: a LUKS image takes the sector's number
from the host offset (qcow2's ``crypt_physical_offset``), a legacy AES image from the guest offset.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from ...crypto import luks
from ...crypto.ciphers import SECTOR_SIZE, SectorCipher
from ...crypto.qcowaes import legacy_cipher
from ...crypto.secrets import key_secret_of, password
from ...errors import ImageFormatError, InvalidArgumentError, UnsupportedError
from ...hostio import HostFile, run_blocking
from . import layout as L

_CRYPTO_EXT = struct.Struct(">QQ")  # offset, length of the LUKS header area


@dataclass(slots=True)
class QcowCrypto:
    """The cipher of an open image (None: opened without I/O, for info) and what info shows of it."""

    cipher: SectorCipher | None
    physical: bool  # LUKS: IVs from host offsets; AES: from guest offsets
    info: dict[str, Any]

    def decrypt(self, host: int, guest: int, buf: memoryview) -> None:
        """Decrypt ``buf`` in place, read from ``host`` for guest offset ``guest`` (both sector-aligned)."""
        assert self.cipher is not None
        at = host if self.physical else guest
        buf[:] = self.cipher.decrypt(at // SECTOR_SIZE, buf)

    def encrypt(self, host: int, guest: int, data: bytes) -> bytes:
        assert self.cipher is not None
        at = host if self.physical else guest
        return self.cipher.encrypt(at // SECTOR_SIZE, data)


def crypto_extension(h: L.Header) -> tuple[int, int]:
    """Where the LUKS header area is, as the extension says, checked as qemu checks it."""
    raw = h.extension(L.EXT_CRYPTO)
    if raw is None:
        raise UnsupportedError(f"Missing CRYPTO header for crypt method {h.crypt_method}")
    if len(raw) != _CRYPTO_EXT.size:
        raise ImageFormatError(f"CRYPTO header extension size {len(raw)}, but expected size "
                               f"{_CRYPTO_EXT.size}")
    offset, length = _CRYPTO_EXT.unpack(raw)
    if offset % h.cluster_size:
        raise ImageFormatError(f"Encryption header offset '{offset}' is not a multiple of cluster size "
                               f"'{h.cluster_size}'")
    return offset, length


def _read(hf: HostFile, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    n = hf.readinto_sync(offset, memoryview(buf))
    return bytes(buf[:n])


async def open_crypto(hf: HostFile, h: L.Header, options: dict[str, Any], *, io: bool,
                      read_only: bool) -> QcowCrypto | None:
    """The cipher of an encrypted image, unlocked with the ``encrypt.key-secret`` the options name; None
    for an image without encryption."""
    if not h.crypt_method:
        return None
    if h.crypt_method == L.CRYPT_AES:
        cipher = None
        if io:
            if not read_only:
                # qemu 7.2 still opens these read-write; they are read-only here (legacy AES leaks
                # patterns and is kept only to copy data out)
                raise UnsupportedError("Legacy qcow2 AES encryption is supported read-only here: convert "
                                       "the image to LUKS")
            secret = password(key_secret_of(options, "encrypt."), "encrypt.")
            cipher = legacy_cipher(secret)
        return QcowCrypto(cipher, False, {"format": "aes"})
    offset, length = crypto_extension(h)
    head = _read(hf, offset, min(length, luks.HEADER_SIZE))
    header, spec, hash_alg = luks.read_header(head)
    info = {"format": "luks", **luks.info(header, spec, hash_alg, header.payload_offset * SECTOR_SIZE)}
    if not io:
        return QcowCrypto(None, True, info)
    secret = password(key_secret_of(options, "encrypt."), "encrypt.")

    def read(at: int, n: int) -> bytes:
        if at + n > length:
            raise ImageFormatError("Request for data outside of extension header")
        return _read(hf, offset + at, n)

    key = await run_blocking(luks.unlock, header, spec, hash_alg, secret, read)
    return QcowCrypto(SectorCipher(spec, key), True, info)


def luks_options(options: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Split qcow2 create options into the image's own and the ``encrypt.*`` ones (without the prefix);
    ``encryption=on`` is the deprecated spelling of ``encrypt.format=aes``."""
    own = {k: v for k, v in options.items() if not k.startswith("encrypt.") and k != "encryption"}
    enc = {k.removeprefix("encrypt."): v for k, v in options.items() if k.startswith("encrypt.")}
    if "encryption" in options:
        if "format" in enc:
            raise InvalidArgumentError("'encrypt.format' and its alias 'encryption' can't be used at the "
                                       "same time")
        if options["encryption"] in ("on", "yes", "true"):
            enc["format"] = "aes"
    return own, enc


def check_create(enc: dict[str, str]) -> bytes | None:
    """The passphrase for a new encrypted image (None: not encrypted), refused as qemu 7.2 refuses."""
    if not enc:
        return None
    fmt = enc.get("format")
    if fmt is None:
        if any(k in enc for k in ("key-secret", "cipher-alg", "cipher-mode", "ivgen-alg", "ivgen-hash-alg",
                                  "hash-alg", "iter-time")):
            raise InvalidArgumentError("Parameter 'encrypt.format' is missing")
        return None
    if fmt not in ("aes", "luks"):
        raise InvalidArgumentError(f"Parameter 'format' does not accept value '{fmt}'")
    secret = password(enc.get("key-secret"), "encrypt.")
    if fmt == "aes":
        # qemu 7.2's qemu-img still makes these; legacy AES is only read here
        raise UnsupportedError("Creating qcow2 images with legacy AES encryption is not supported by "
                               "imagecore: use encrypt.format=luks")
    return secret


def new_volume(enc: dict[str, str], secret: bytes) -> luks.NewVolume:
    """The LUKS header of a new image (the slow part: PBKDF2 timed by ``encrypt.iter-time``)."""
    return luks.create({k: v for k, v in enc.items() if k not in ("format", "key-secret")}, secret,
                       "encrypt.")


async def add_luks(path: str, vol: luks.NewVolume) -> None:
    """Put ``vol`` into the new image ``path``, as qemu's qcow2_set_up_encryption does: its header and key
    material in newly allocated clusters (refcounts first), then the image header pointing at them with
    the full disk encryption header extension and crypt method LUKS."""
    from ...driver import ImageOpener
    from .driver import Qcow2Driver
    from .headwrite import read_header_image, write_header

    length = vol.payload_offset
    drv = await ImageOpener(lock=False).open(path, "qcow2", read_only=False)
    try:
        assert isinstance(drv, Qcow2Driver) and drv.refs is not None
        offset = await drv.refs.allocate(-(-length // drv.cs))
        # qemu zeroes the whole area before writing into it
        await drv.hf.pwrite(offset, bytes(-(-length // drv.cs) * drv.cs))
        await drv.hf.pwrite(offset, vol.header.pack())
        await drv.hf.pwrite(offset + vol.header.slots[0].key_material_offset * SECTOR_SIZE, vol.material)
        await drv.flush()
        hf = drv.hf
        img = await read_header_image(hf)
        img.header.crypt_method = L.CRYPT_LUKS
        img.header.set_extension(L.EXT_CRYPTO, _CRYPTO_EXT.pack(offset, length))
        await write_header(hf, img)
    finally:
        await drv.close()
