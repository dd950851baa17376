"""The anti-forensic splitter of LUKS1 (the spec's AF-split and AF-merge): a key is spread over many
stripes so that wiping any one of them makes the key unrecoverable."""

from __future__ import annotations

import os

from .ciphers import HASH_LEN, hash_digest


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def _diffuse(alg: str, block: bytes) -> bytes:
    """The spec's diffusion: each digest-sized piece replaced by the hash of its index (32-bit
    big-endian) and itself, truncated to the piece's length."""
    n = HASH_LEN[alg]
    out = bytearray()
    for i, at in enumerate(range(0, len(block), n)):
        piece = block[at:at + n]
        out += hash_digest(alg, i.to_bytes(4, "big") + piece)[:len(piece)]
    return bytes(out)


def split(alg: str, key: bytes, stripes: int) -> bytes:
    """``key`` spread over ``stripes`` blocks: all but the last random, the last chosen so that
    :func:`merge` gives back ``key``."""
    size = len(key)
    rand = os.urandom(size * (stripes - 1))
    d = bytes(size)
    for i in range(stripes - 1):
        d = _diffuse(alg, _xor(d, rand[i * size:(i + 1) * size]))
    return rand + _xor(d, key)


def merge(alg: str, material: bytes, size: int, stripes: int) -> bytes:
    """The key of ``size`` bytes that :func:`split` spread over ``material``."""
    d = bytes(size)
    for i in range(stripes - 1):
        d = _diffuse(alg, _xor(d, material[i * size:(i + 1) * size]))
    return _xor(d, material[(stripes - 1) * size:stripes * size])
