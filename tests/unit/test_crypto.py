"""imagecore.crypto without peers: known-answer vectors through the sector cipher, the AF splitter, the
LUKS header layout, and iter-time scaling the PBKDF2 iterations."""

from __future__ import annotations

import pytest

from imagecore.crypto import af, luks
from imagecore.crypto.ciphers import CipherSpec, SectorCipher
from imagecore.errors import BlockError


def test_xts_plain64_is_ieee_1619_vector_2() -> None:
    # IEEE 1619-2007 XTS-AES-128 vector 2: keys 11.. and 22.., data unit 0x3333333333, 32 bytes of 44
    cipher = SectorCipher(CipherSpec("aes-128", "xts", "plain64"), b"\x11" * 16 + b"\x22" * 16)
    out = cipher.encrypt(0x3333333333, b"\x44" * 32)
    assert out.hex() == "c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0"
    assert cipher.decrypt(0x3333333333, out) == b"\x44" * 32


def test_each_sector_has_its_own_iv() -> None:
    for spec in (CipherSpec("aes-256", "xts", "plain64"), CipherSpec("aes-128", "cbc", "essiv", "sha256"),
                 CipherSpec("aes-192", "cbc", "plain")):
        cipher = SectorCipher(spec, bytes(range(spec.key_length())))
        data = bytes(1024)
        out = cipher.encrypt(7, data)
        assert out[:512] != out[512:]  # the same plaintext in sectors 7 and 8
        assert out[512:] == cipher.encrypt(8, data[:512])
        assert cipher.decrypt(7, out) == data
    # plain keeps only the low 32 bits of the sector number; plain64 all 64
    plain = SectorCipher(CipherSpec("aes-128", "cbc", "plain"), bytes(16))
    assert plain.encrypt(1 << 32, bytes(16)) == plain.encrypt(0, bytes(16))
    plain64 = SectorCipher(CipherSpec("aes-128", "cbc", "plain64"), bytes(16))
    assert plain64.encrypt(1 << 32, bytes(16)) != plain64.encrypt(0, bytes(16))


def test_af_split_merge_round_trip() -> None:
    key = bytes(range(64))
    for alg in ("sha1", "sha256", "sha512"):
        material = af.split(alg, key, 4000)
        assert len(material) == 64 * 4000
        assert af.merge(alg, material, 64, 4000) == key
        spoiled = bytearray(material)
        spoiled[100] ^= 1
        assert af.merge(alg, bytes(spoiled), 64, 4000) != key


def test_header_layout_and_unlock() -> None:
    vol = luks.create({"iter-time": "1"}, b"pass")
    packed = vol.header.pack()
    assert len(packed) == luks.HEADER_SIZE == 592
    h, spec, hash_alg = luks.read_header(packed)
    assert (spec.alg, spec.mode, spec.ivgen, hash_alg) == ("aes-256", "xts", "plain64", "sha256")
    assert vol.payload_offset == 2068480 == luks.payload_offset(spec)
    assert [s.key_material_offset * 512 for s in h.slots][:2] == [4096, 262144]
    image = bytearray(vol.payload_offset)
    image[:len(packed)] = packed
    at = h.slots[0].key_material_offset * 512
    image[at:at + len(vol.material)] = vol.material

    def read(offset: int, n: int) -> bytes:
        return bytes(image[offset:offset + n])

    assert luks.unlock(h, spec, hash_alg, b"pass", read) == vol.master_key
    with pytest.raises(BlockError, match="Invalid password, cannot unlock any keyslot"):
        luks.unlock(h, spec, hash_alg, b"wrong", read)


def test_iter_time_scales_the_iterations() -> None:
    quick = luks.create({"iter-time": "1", "cipher-alg": "aes-128", "cipher-mode": "cbc"}, b"p")
    slow = luks.create({"iter-time": "100", "cipher-alg": "aes-128", "cipher-mode": "cbc"}, b"p")
    assert quick.header.slots[0].iterations >= 1000 and quick.header.mk_digest_iter >= 1000
    # 100 times the time: many times the iterations, whatever the machine's load
    assert slow.header.slots[0].iterations > 5 * quick.header.slots[0].iterations
