"""The ciphers, modes, IV generators and hashes qemu offers for disk encryption, and the per-sector
encryption built on them (qemu's qcrypto_block_cipher_{en,de}crypt_helper: the IV is reset at every
512-byte sector boundary from the sector number)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from ..errors import InvalidArgumentError, UnsupportedError

SECTOR_SIZE = 512

# qapi QCryptoCipherAlgorithm names with their key lengths; only AES is in the cryptography package among
# the ones qemu's LUKS driver knows (cast5, serpent and twofish are refused by name)
CIPHER_KEY_LEN = {"aes-128": 16, "aes-192": 24, "aes-256": 32}
CIPHER_ALGS = ("aes-128", "aes-192", "aes-256", "des", "3des", "cast5-128", "serpent-128", "serpent-192",
               "serpent-256", "twofish-128", "twofish-192", "twofish-256", "sm4")
CIPHER_MODES = ("ecb", "cbc", "xts", "ctr")
IVGEN_ALGS = ("plain", "plain64", "essiv")
# qapi QCryptoHashAlgorithm, with the digest lengths
HASH_LEN = {"md5": 16, "sha1": 20, "sha224": 28, "sha256": 32, "sha384": 48, "sha512": 64, "ripemd160": 20}

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "md5": hashes.MD5, "sha1": hashes.SHA1, "sha224": hashes.SHA224, "sha256": hashes.SHA256,
    "sha384": hashes.SHA384, "sha512": hashes.SHA512,
}


def hash_digest(alg: str, data: bytes) -> bytes:
    """One digest of ``data`` with qemu's hash algorithm ``alg``."""
    return hashlib.new(alg, data).digest()


def pbkdf2(alg: str, secret: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    """PBKDF2-HMAC with ``alg`` (qemu's qcrypto_pbkdf2)."""
    try:
        algo = _HASHES[alg]()
    except KeyError:
        raise UnsupportedError(f"PBKDF does not support hash algorithm {alg}") from None
    return PBKDF2HMAC(algorithm=algo, length=length, salt=salt, iterations=iterations).derive(secret)


def key_length(alg: str, mode: str) -> int:
    """The key bytes a cipher takes in a mode (XTS takes two keys)."""
    try:
        n = CIPHER_KEY_LEN[alg]
    except KeyError:
        raise UnsupportedError(f"Cipher algorithm '{alg}' not supported") from None
    return 2 * n if mode == "xts" else n


@dataclass(frozen=True, slots=True)
class CipherSpec:
    """A cipher in qemu's terms: algorithm, mode, IV generator (with its hash for essiv)."""

    alg: str = "aes-256"
    mode: str = "xts"
    ivgen: str = "plain64"
    ivgen_hash: str | None = None

    def key_length(self) -> int:
        return key_length(self.alg, self.mode)

    def check_supported(self) -> None:
        """Refuse what the cryptography package cannot do (OpenSSL has no XTS with 192-bit AES keys)."""
        if self.mode == "xts" and self.alg == "aes-192":
            raise UnsupportedError("Cipher aes-192 in mode xts is not supported by imagecore "
                                   "(OpenSSL has no 192-bit XTS)")

    def essiv_alg(self) -> str:
        """The cipher ESSIV encrypts sector numbers with: the block cipher with a key as long as the hash
        digest (dm-crypt's quirk, kept by qemu)."""
        digest = HASH_LEN[self.ivgen_hash or "sha256"]
        if CIPHER_KEY_LEN.get(self.alg) == digest:
            return self.alg
        for alg, n in CIPHER_KEY_LEN.items():
            if n == digest:
                return alg
        raise UnsupportedError(f"No AES cipher with key size {digest} available")


def _algorithm(key: bytes) -> algorithms.AES:
    return algorithms.AES(key)


class SectorCipher:
    """Encrypts and decrypts whole 512-byte sectors (the last piece of a buffer may be shorter, a
    multiple of the block size) with the IV of each sector's number."""

    def __init__(self, spec: CipherSpec, key: bytes) -> None:
        spec.check_supported()
        if len(key) != spec.key_length():
            raise InvalidArgumentError(f"Invalid key length {len(key)}")
        self.spec = spec
        self._key = key
        self._niv = 0 if spec.mode == "ecb" else 16
        self._essiv: Cipher[modes.ECB] | None = None
        if spec.ivgen == "essiv" and self._niv:
            salt = hash_digest(spec.ivgen_hash or "sha256", key)
            self._essiv = Cipher(_algorithm(salt[:CIPHER_KEY_LEN[spec.essiv_alg()]]), modes.ECB())
        if spec.mode == "ecb":
            self._ecb = Cipher(_algorithm(key), modes.ECB())

    def _ivs(self, sector: int, count: int) -> list[bytes]:
        pad = bytes(self._niv - 8)
        if self.spec.ivgen == "plain":
            return [(s & 0xFFFFFFFF).to_bytes(4, "little") + bytes(self._niv - 4)
                    for s in range(sector, sector + count)]
        plain = [(s & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little") + pad for s in range(sector, sector + count)]
        if self._essiv is None:
            return plain
        out = self._essiv.encryptor().update(b"".join(plain))
        return [out[i:i + self._niv] for i in range(0, len(out), self._niv)]

    def _context(self, iv: bytes, encrypt: bool) -> CipherContext:
        mode = self.spec.mode
        m: modes.Mode
        if mode == "xts":
            m = modes.XTS(iv)
        elif mode == "cbc":
            m = modes.CBC(iv)
        elif mode == "ctr":
            m = modes.CTR(iv)
        else:
            raise UnsupportedError(f"Cipher mode {mode} not supported")
        c = Cipher(_algorithm(self._key), m)
        return c.encryptor() if encrypt else c.decryptor()

    def _run(self, sector: int, data: bytes | bytearray | memoryview, encrypt: bool) -> bytes:
        if len(data) % 16:
            raise InvalidArgumentError("Length must be a multiple of the cipher block size")
        if self._niv == 0:
            ctx = self._ecb.encryptor() if encrypt else self._ecb.decryptor()
            return ctx.update(bytes(data))
        view = bytes(data)
        count = (len(view) + SECTOR_SIZE - 1) // SECTOR_SIZE
        out = bytearray(len(view))
        for i, iv in enumerate(self._ivs(sector, count)):
            at = i * SECTOR_SIZE
            out[at:at + SECTOR_SIZE] = self._context(iv, encrypt).update(view[at:at + SECTOR_SIZE])
        return bytes(out)

    def encrypt(self, sector: int, data: bytes | bytearray | memoryview) -> bytes:
        """``data`` encrypted, its first sector numbered ``sector``."""
        return self._run(sector, data, True)

    def decrypt(self, sector: int, data: bytes | bytearray | memoryview) -> bytes:
        """``data`` decrypted, its first sector numbered ``sector``."""
        return self._run(sector, data, False)
