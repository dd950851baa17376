"""Legacy qcow/qcow2 AES encryption (crypt method 1), which qemu 7.2 still reads: AES-128-CBC keyed by the
passphrase's first 16 bytes (zero-padded), each 512-byte sector with a plain64 IV of its guest sector
number. Weak by design (no key derivation, patterns show); kept to copy data out of old images."""

from __future__ import annotations

from .ciphers import CipherSpec, SectorCipher

SPEC = CipherSpec("aes-128", "cbc", "plain64")


def legacy_cipher(passphrase: bytes) -> SectorCipher:
    """The sector cipher of a legacy AES image whose passphrase is ``passphrase``."""
    return SectorCipher(SPEC, (passphrase[:16] + bytes(16))[:16])
