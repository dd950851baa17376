"""The LUKS1 container as qemu 7.2 reads and writes it (cryptsetup's on-disk format 1.2.1): the header,
its eight key slots, unlocking the master key with a passphrase, and making a new header with one slot."""

from __future__ import annotations

import os
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import (
    ImageFormatError,
    InvalidArgumentError,
    PermissionDeniedError,
    UnsupportedError,
    ValueOverflowError,
)
from ..qemuopts import CreateOption
from . import af
from .ciphers import (
    CIPHER_ALGS,
    CIPHER_KEY_LEN,
    CIPHER_MODES,
    HASH_LEN,
    IVGEN_ALGS,
    SECTOR_SIZE,
    CipherSpec,
    SectorCipher,
    pbkdf2,
)

MAGIC = b"LUKS\xba\xbe"
VERSION = 1
DIGEST_LEN = 20
SALT_LEN = 32
NUM_SLOTS = 8
STRIPES = 4000
MIN_SLOT_ITERS = 1000
MIN_MASTER_ITERS = 1000
# where the first key slot's material starts; every slot's material is rounded up to this too
KEY_SLOT_OFFSET = 4096
SLOT_ENABLED = 0x00AC71F3
SLOT_DISABLED = 0x0000DEAD

# The header in the spec's words (big-endian on disk): partition header then eight key slots.
HEADER_FIELDS = (
    ("magic", "6s"), ("version", "H"), ("cipher_name", "32s"), ("cipher_mode", "32s"),
    ("hash_spec", "32s"), ("payload_offset", "I"), ("key_bytes", "I"), ("mk_digest", "20s"),
    ("mk_digest_salt", "32s"), ("mk_digest_iter", "I"), ("uuid", "40s"),
)
SLOT_FIELDS = (("active", "I"), ("iterations", "I"), ("salt", "32s"), ("key_material_offset", "I"),
               ("stripes", "I"))
_HEAD = struct.Struct(">" + "".join(f for _n, f in HEADER_FIELDS))
_SLOT = struct.Struct(">" + "".join(f for _n, f in SLOT_FIELDS))
HEADER_SIZE = _HEAD.size + NUM_SLOTS * _SLOT.size  # 592

ReadFn = Callable[[int, int], bytes]

# qemu's key slot amend options (crypto/block-luks.c), in the order `amend -o help` lists them: a luks
# image takes them as they are, a qcow2 image prefixed `encrypt.`
KEYSLOT_OPTIONS: tuple[CreateOption, ...] = (
    CreateOption("iter-time", "number", "Time to spend in PBKDF in milliseconds"),
    CreateOption("keyslot", "number", "Select a single keyslot to modify explicitly"),
    CreateOption("new-secret", "string", "New secret to set in the matching keyslots. Empty string to erase"),
    CreateOption("old-secret", "string", "Select all keyslots that match this password"),
    CreateOption("state", "string", "Select new state of affected keyslots (active/inactive)"),
)


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("latin-1")


@dataclass(slots=True)
class KeySlot:
    active: int = SLOT_DISABLED
    iterations: int = 0
    salt: bytes = bytes(SALT_LEN)
    key_material_offset: int = 0  # in sectors
    stripes: int = STRIPES


@dataclass(slots=True)
class LuksHeader:
    magic: bytes = MAGIC
    version: int = VERSION
    cipher_name: str = "aes"
    cipher_mode: str = "xts-plain64"
    hash_spec: str = "sha256"
    payload_offset: int = 0  # in sectors
    key_bytes: int = 64
    mk_digest: bytes = bytes(DIGEST_LEN)
    mk_digest_salt: bytes = bytes(SALT_LEN)
    mk_digest_iter: int = 0
    uuid: str = ""
    slots: list[KeySlot] = field(default_factory=lambda: [KeySlot() for _ in range(NUM_SLOTS)])

    @classmethod
    def unpack(cls, buf: bytes) -> LuksHeader:
        if len(buf) < HEADER_SIZE:
            raise ImageFormatError("Volume is not in LUKS format")
        v = dict(zip((n for n, _f in HEADER_FIELDS), _HEAD.unpack_from(buf, 0), strict=True))
        slots = [KeySlot(*_SLOT.unpack_from(buf, _HEAD.size + i * _SLOT.size)) for i in range(NUM_SLOTS)]
        return cls(magic=v["magic"], version=v["version"], cipher_name=_cstr(v["cipher_name"]),
                   cipher_mode=_cstr(v["cipher_mode"]), hash_spec=_cstr(v["hash_spec"]),
                   payload_offset=v["payload_offset"], key_bytes=v["key_bytes"], mk_digest=v["mk_digest"],
                   mk_digest_salt=v["mk_digest_salt"], mk_digest_iter=v["mk_digest_iter"],
                   uuid=_cstr(v["uuid"]), slots=slots)

    def pack(self) -> bytes:
        out = _HEAD.pack(self.magic, self.version, self.cipher_name.encode(), self.cipher_mode.encode(),
                         self.hash_spec.encode(), self.payload_offset, self.key_bytes, self.mk_digest,
                         self.mk_digest_salt, self.mk_digest_iter, self.uuid.encode())
        for s in self.slots:
            out += _SLOT.pack(s.active, s.iterations, s.salt, s.key_material_offset, s.stripes)
        return out


def _lookup(name: str, known: tuple[str, ...], what: str) -> str:
    if name not in known:
        raise UnsupportedError(f"{what} '{name}' not supported")
    return name


def parse_spec(h: LuksHeader) -> tuple[CipherSpec, str]:
    """The cipher and the PBKDF hash a header names, refused as qemu refuses them."""
    mode_text = h.cipher_mode
    if "-" not in mode_text:
        raise InvalidArgumentError(f"Unexpected cipher mode string format '{mode_text}'")
    mode, ivgen = mode_text.split("-", 1)
    ivhash: str | None = None
    if ":" in ivgen:
        ivgen, ivhash = ivgen.split(":", 1)
        _lookup(ivhash, tuple(HASH_LEN), "Hash algorithm")
    _lookup(mode, CIPHER_MODES, "Cipher mode")
    nkey = h.key_bytes // 2 if mode == "xts" else h.key_bytes
    alg = f"aes-{nkey * 8}" if h.cipher_name == "aes" and nkey in CIPHER_KEY_LEN.values() else None
    if alg is None:
        if h.cipher_name in ("cast5", "serpent", "twofish"):
            raise UnsupportedError(f"Cipher algorithm '{h.cipher_name}' is not supported by imagecore")
        raise UnsupportedError(f"Algorithm '{h.cipher_name}' with key size {nkey} bytes not supported")
    hash_alg = _lookup(h.hash_spec, tuple(HASH_LEN), "Hash algorithm")
    _lookup(ivgen, IVGEN_ALGS, "IV generator")
    if ivgen == "essiv":
        if ivhash is None:
            raise InvalidArgumentError("Missing IV generator hash specification")
        spec = CipherSpec(alg, mode, ivgen, ivhash)
        spec.essiv_alg()
    else:
        spec = CipherSpec(alg, mode, ivgen, ivhash)
    return spec, hash_alg


def read_header(buf: bytes) -> tuple[LuksHeader, CipherSpec, str]:
    """The header at the start of ``buf`` with its cipher, checked as Debian's qemu 7.2 checks it on open
    (qcrypto_block_luks_check_header with its hardening against hostile headers: every slot has the
    spec's 4000 stripes, so key material is never larger than the spec's), then the names."""
    # past the end of the file the block layer reads zeroes
    buf = bytes(buf[:HEADER_SIZE]) + bytes(max(HEADER_SIZE - len(buf), 0))
    if buf[:6] != MAGIC:
        raise InvalidArgumentError("Volume is not in LUKS format")
    h = LuksHeader.unpack(buf)
    if h.version != VERSION:
        raise UnsupportedError(f"LUKS version {h.version} is not supported")
    for _field, at, what in (("cipher_name", 8, "cipher name"), ("cipher_mode", 40, "cipher mode"),
                            ("hash_spec", 72, "hash spec")):
        if 0 not in buf[at:at + 32]:
            raise ImageFormatError(f"LUKS header {what} is not NUL terminated")
    first = KEY_SLOT_OFFSET // SECTOR_SIZE
    if h.payload_offset < first:
        raise ImageFormatError("LUKS payload is overlapping with the header")
    if h.mk_digest_iter == 0:
        raise ImageFormatError("LUKS key iteration count is zero")
    spans = [(s.key_material_offset, _split_sectors(h.key_bytes, s.stripes)) for s in h.slots]
    for i, s in enumerate(h.slots):
        start, length = spans[i]
        if s.stripes != STRIPES:
            raise ImageFormatError(f"Keyslot {i} is corrupted (stripes {s.stripes} != {STRIPES})")
        if s.active not in (SLOT_ENABLED, SLOT_DISABLED):
            raise ImageFormatError(f"Keyslot {i} state (active/disable) is corrupted")
        if s.active == SLOT_ENABLED and s.iterations == 0:
            raise ImageFormatError(f"Keyslot {i} iteration count is zero")
        if start < first:
            raise ImageFormatError(f"Keyslot {i} is overlapping with the LUKS header")
        if start + length > h.payload_offset:
            raise ImageFormatError(f"Keyslot {i} is overlapping with the encrypted payload")
        for j in range(i + 1, NUM_SLOTS):
            s2, n2 = spans[j]
            if start + length > s2 and s2 + n2 > start:
                raise ImageFormatError(f"Keyslots {i} and {j} are overlapping in the header")
    spec, hash_alg = parse_spec(h)
    return h, spec, hash_alg


def _split_sectors(key_bytes: int, stripes: int = STRIPES) -> int:
    """Sectors of one slot's key material, rounded up to the 4 KiB the header takes (cryptsetup's
    layout, which qemu follows)."""
    per = KEY_SLOT_OFFSET // SECTOR_SIZE
    n = -(-key_bytes * stripes // SECTOR_SIZE)
    return -(-n // per) * per


def unlock(h: LuksHeader, spec: CipherSpec, hash_alg: str, password: bytes, read: ReadFn) -> bytes:
    """The master key, from the first active slot the passphrase opens."""
    for index in range(NUM_SLOTS):
        key = slot_key_of(h, spec, hash_alg, password, read, index)
        if key is not None:
            return key
    raise PermissionDeniedError("Invalid password, cannot unlock any keyslot")


def slot_key_of(h: LuksHeader, spec: CipherSpec, hash_alg: str, password: bytes, read: ReadFn,
                index: int) -> bytes | None:
    """The master key if slot ``index`` is active and the passphrase opens it, else None."""
    s = h.slots[index]
    if s.active != SLOT_ENABLED:
        return None
    nkey = h.key_bytes
    slot_key = pbkdf2(hash_alg, password, s.salt, s.iterations, nkey)
    material = read(s.key_material_offset * SECTOR_SIZE, nkey * s.stripes)
    # past the end of the file the block layer reads zeroes (which then unlock nothing)
    material += bytes(nkey * s.stripes - len(material))
    split = SectorCipher(spec, slot_key).decrypt(0, material)
    key = af.merge(hash_alg, split, nkey, s.stripes)
    if pbkdf2(hash_alg, key, h.mk_digest_salt, h.mk_digest_iter, DIGEST_LEN) == h.mk_digest:
        return key
    return None


def new_slot(h: LuksHeader, spec: CipherSpec, hash_alg: str, index: int, password: bytes, master: bytes,
             iter_time: int) -> bytes:
    """Fill slot ``index`` of ``h`` for ``password`` (salt, iterations for ``iter_time`` ms, enabled) and
    return its encrypted key material, which must reach the file before the header does."""
    s = h.slots[index]
    nkey = h.key_bytes
    salt = os.urandom(SALT_LEN)
    iters = count_iters(hash_alg, password, salt, nkey) * iter_time // 1000
    if iters > 0xFFFFFFFF:
        raise ValueOverflowError(f"PBKDF iterations {iters} larger than {0xFFFFFFFF}")
    s.salt, s.iterations = salt, max(iters, MIN_SLOT_ITERS)
    slot_key = pbkdf2(hash_alg, password, s.salt, s.iterations, nkey)
    material = SectorCipher(spec, slot_key).encrypt(0, af.split(hash_alg, master, s.stripes))
    s.active = SLOT_ENABLED
    return material


def erase_slot(h: LuksHeader, index: int) -> tuple[int, int]:
    """Disable slot ``index`` of ``h`` (salt and iterations zeroed, as qemu leaves it); returns where its
    key material lies (byte offset, length), which the caller overwrites once the header is written."""
    s = h.slots[index]
    s.salt, s.iterations, s.active = bytes(SALT_LEN), 0, SLOT_DISABLED
    return s.key_material_offset * SECTOR_SIZE, h.key_bytes * s.stripes


def count_iters(hash_alg: str, secret: bytes, salt: bytes, nout: int) -> int:
    """PBKDF2 iterations per second of thread CPU time (qemu's qcrypto_pbkdf2_count_iters, measured
    over at least a tenth of a second where qemu takes half a second)."""
    iterations = 1 << 12
    while True:
        start = time.thread_time()
        pbkdf2(hash_alg, secret, salt, iterations, nout)
        delta = time.thread_time() - start
        if delta > 0.1:
            return int(iterations / delta)
        iterations = iterations * 10 if delta < 0.02 else int(iterations * 0.15 / delta)


@dataclass(slots=True)
class NewVolume:
    """A freshly made LUKS header: what to write where, and the master key for the payload."""

    header: LuksHeader
    spec: CipherSpec
    master_key: bytes
    material: bytes  # slot 0's encrypted key material, at slot 0's offset
    payload_offset: int  # bytes


# qemu's defaults for a new volume
DEFAULTS = {"cipher-alg": "aes-256", "cipher-mode": "xts", "ivgen-alg": "plain64", "hash-alg": "sha256",
            "iter-time": "2000"}


def _enum(value: str, known: tuple[str, ...], param: str) -> str:
    if value not in known:
        raise InvalidArgumentError(f"Parameter '{param}' does not accept value '{value}'")
    return value


def parse_create(opts: dict[str, str], prefix: str = "") -> tuple[CipherSpec, str, int]:
    """The cipher, PBKDF hash and iteration time create options ask for (``cipher-alg``,
    ``cipher-mode``, ``ivgen-alg``, ``ivgen-hash-alg``, ``hash-alg``, ``iter-time``, with qemu's
    defaults), refused as qemu refuses them; ``prefix`` is how the caller's option names start."""
    alg, mode, ivgen, ivhash, hash_alg, iter_time = parse_create_options(opts, prefix)
    if alg not in CIPHER_KEY_LEN:
        raise UnsupportedError(f"Cipher algorithm '{alg}' is not supported by imagecore")
    spec = CipherSpec(alg, mode, ivgen, ivhash)
    if ivgen == "essiv":
        spec.essiv_alg()
    spec.check_supported()
    nkey = spec.key_length()
    if nkey * STRIPES % SECTOR_SIZE:
        # qemu 7.2 asserts whole sectors of key material (it aborts making or opening such a volume)
        raise UnsupportedError(f"Cipher {alg} in mode {mode} makes key material of {nkey * STRIPES} bytes, "
                               "not whole sectors, which qemu cannot open")
    return spec, hash_alg, iter_time


def parse_create_options(opts: dict[str, str], prefix: str = ""
                         ) -> tuple[str, str, str, str | None, str, int]:
    """The create options as qemu's option parsing reads them, before anything is made: each name one
    of its enumeration, iter-time a number. Whether the combination can be made is parse_create's."""
    # (qemu names the enumerations without the prefix, the number with it)
    alg = _enum(opts.get("cipher-alg", DEFAULTS["cipher-alg"]), CIPHER_ALGS, "cipher-alg")
    mode = _enum(opts.get("cipher-mode", DEFAULTS["cipher-mode"]), CIPHER_MODES, "cipher-mode")
    ivgen = _enum(opts.get("ivgen-alg", DEFAULTS["ivgen-alg"]), IVGEN_ALGS, "ivgen-alg")
    hash_alg = _enum(opts.get("hash-alg", DEFAULTS["hash-alg"]), tuple(HASH_LEN), "hash-alg")
    ivhash = opts.get("ivgen-hash-alg")
    if ivhash is not None:
        _enum(ivhash, tuple(HASH_LEN), "ivgen-hash-alg")
    elif ivgen == "essiv":
        ivhash = "sha256"
    iter_text = opts.get("iter-time", DEFAULTS["iter-time"])
    try:
        iter_time = int(iter_text, 0)
    except ValueError:
        raise InvalidArgumentError(
            f"Parameter '{prefix}iter-time' expects a number") from None
    return alg, mode, ivgen, ivhash, hash_alg, iter_time


def payload_offset(spec: CipherSpec) -> int:
    """Bytes of header and key material before the payload of a new volume with this cipher."""
    return (KEY_SLOT_OFFSET // SECTOR_SIZE + _split_sectors(spec.key_length()) * NUM_SLOTS) * SECTOR_SIZE


def create(opts: dict[str, str], password: bytes, prefix: str = "") -> NewVolume:
    """A new LUKS1 header with slot 0 opened by ``password``, from create options (see
    :func:`parse_create`)."""
    spec, hash_alg, iter_time = parse_create(opts, prefix)
    mode, ivgen, ivhash = spec.mode, spec.ivgen, spec.ivgen_hash
    nkey = spec.key_length()
    h = LuksHeader(cipher_name="aes",
                   cipher_mode=f"{mode}-{ivgen}" + (f":{ivhash}" if ivhash else ""),
                   hash_spec=hash_alg, key_bytes=nkey, uuid=str(uuid.uuid4()))
    h.mk_digest_salt = os.urandom(SALT_LEN)
    master = os.urandom(nkey)
    if iter_time <= 0:
        raise ValueOverflowError(f"PBKDF iterations {0} too large to scale")
    iters = count_iters(hash_alg, master, h.mk_digest_salt, DIGEST_LEN) * iter_time // 1000 // 8
    if iters > 0xFFFFFFFF:
        raise ValueOverflowError(f"PBKDF iterations {iters} larger than {0xFFFFFFFF}")
    h.mk_digest_iter = max(iters, MIN_MASTER_ITERS)
    h.mk_digest = pbkdf2(hash_alg, master, h.mk_digest_salt, h.mk_digest_iter, DIGEST_LEN)
    per = _split_sectors(nkey)
    first = KEY_SLOT_OFFSET // SECTOR_SIZE
    for i, s in enumerate(h.slots):
        s.key_material_offset = first + per * i
    slot = h.slots[0]
    slot.active = SLOT_ENABLED
    slot.salt = os.urandom(SALT_LEN)
    iters = count_iters(hash_alg, password, slot.salt, nkey) * iter_time // 1000
    if iters > 0xFFFFFFFF:
        raise ValueOverflowError(f"PBKDF iterations {iters} larger than {0xFFFFFFFF}")
    slot.iterations = max(iters, MIN_SLOT_ITERS)
    slot_key = pbkdf2(hash_alg, password, slot.salt, slot.iterations, nkey)
    material = SectorCipher(spec, slot_key).encrypt(0, af.split(hash_alg, master, STRIPES))
    h.payload_offset = first + per * NUM_SLOTS
    return NewVolume(h, spec, master, material, h.payload_offset * SECTOR_SIZE)


def info(h: LuksHeader, spec: CipherSpec, hash_alg: str, payload_offset: int) -> dict[str, Any]:
    """QAPI's QCryptoBlockInfoLUKS for the header."""
    out: dict[str, Any] = {"cipher-alg": spec.alg, "cipher-mode": spec.mode, "ivgen-alg": spec.ivgen}
    if spec.ivgen == "essiv":
        out["ivgen-hash-alg"] = spec.ivgen_hash
    out["hash-alg"] = hash_alg
    out["payload-offset"] = payload_offset
    out["master-key-iters"] = h.mk_digest_iter
    out["uuid"] = h.uuid
    slots = []
    for s in h.slots:
        one: dict[str, Any] = {"active": s.active == SLOT_ENABLED}
        if s.active == SLOT_ENABLED:
            one["iters"] = s.iterations
            one["stripes"] = s.stripes
        one["key-offset"] = s.key_material_offset * SECTOR_SIZE
        slots.append(one)
    out["slots"] = slots
    return out

