"""qcow2 on-disk layout, in the words of docs/interop/qcow2.txt: header, extensions, entry bits, snapshots.

The header and extensions are untrusted input read once per open: they are declared with construct
(``HEADER``) and also decoded by a precompiled ``struct`` (``parse_header``); a test keeps the two equal.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from ...errors import CorruptImageError, ImageFormatError, UnsupportedError
from .spec import MAGIC

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104  # without the optional compression type byte and padding
V3_HEADER_LENGTH_COMPRESSION = 112

# Header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# Incompatible feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION
                  | INCOMPAT_EXTL2)

# Compatible feature bits
COMPAT_LAZY_REFCOUNTS = 1 << 0

# Auto-clear feature bits
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# L1 / L2 / refcount table entry bits
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_COPIED = 1 << 63
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_COPIED = 1 << 63
L2E_COMPRESSED = 1 << 62
L2E_ZERO = 1 << 0  # v3 "all zeroes" bit of a standard cluster descriptor
L1E_RESERVED = 0x7F000000000001FF
L2E_STD_RESERVED = 0x3F000000000001FE
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00

# Extended L2: the second 64 bits of an entry
SUBCLUSTERS = 32
SC_ALLOC_MASK = 0x00000000FFFFFFFF
SC_ZERO_SHIFT = 32

# Sanity caps against hostile headers (qemu uses similar limits)
MAX_L1_BYTES = 32 * 1024 * 1024
MAX_REFTABLE_BYTES = 8 * 1024 * 1024
MAX_SNAPSHOTS = 65536
MAX_BACKING_FILE_NAME = 1023
MAX_HEADER_EXT_TOTAL = 1024 * 1024
MAX_VIRTUAL_SIZE = 1 << 61  # qemu: QCOW_MAX_L1 / max cluster size; keeps all math in 64 bits

FEATURE_NAMES: tuple[tuple[int, int, str], ...] = (
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
)

# -- construct declaration: the cold path, and the spec's own words ------------------------------------

def _declare() -> dict[str, Any]:
    import construct as cs

    HEADER = cs.Struct(
        "magic" / cs.Const(MAGIC, cs.Int32ub),
        "version" / cs.Int32ub,
        "backing_file_offset" / cs.Int64ub,
        "backing_file_size" / cs.Int32ub,
        "cluster_bits" / cs.Int32ub,
        "size" / cs.Int64ub,
        "crypt_method" / cs.Int32ub,
        "l1_size" / cs.Int32ub,
        "l1_table_offset" / cs.Int64ub,
        "refcount_table_offset" / cs.Int64ub,
        "refcount_table_clusters" / cs.Int32ub,
        "nb_snapshots" / cs.Int32ub,
        "snapshots_offset" / cs.Int64ub,
        "v3" / cs.If(
            cs.this.version >= 3,
            cs.Struct(
                "incompatible_features" / cs.Int64ub,
                "compatible_features" / cs.Int64ub,
                "autoclear_features" / cs.Int64ub,
                "refcount_order" / cs.Int32ub,
                "header_length" / cs.Int32ub,
            ),
        ),
    )

    HEADER_EXTENSION = cs.Struct(
        "type" / cs.Int32ub,
        "length" / cs.Int32ub,
        "data" / cs.Bytes(cs.this.length),
        cs.Padding(lambda ctx: (-ctx.length) % 8),
    )

    SNAPSHOT_ENTRY = cs.Struct(
        "l1_table_offset" / cs.Int64ub,
        "l1_size" / cs.Int32ub,
        "id_str_size" / cs.Int16ub,
        "name_size" / cs.Int16ub,
        "date_sec" / cs.Int32ub,
        "date_nsec" / cs.Int32ub,
        "vm_clock_nsec" / cs.Int64ub,
        "vm_state_size" / cs.Int32ub,
        "extra_data_size" / cs.Int32ub,
    )
    return {"HEADER": HEADER, "HEADER_EXTENSION": HEADER_EXTENSION, "SNAPSHOT_ENTRY": SNAPSHOT_ENTRY}


_declared: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    """The construct declarations, built on first use (by the tests and the cold paths that want
    them): importing construct costs every command-line verb that opens a qcow2 image about 11 ms."""
    if name in ("HEADER", "HEADER_EXTENSION", "SNAPSHOT_ENTRY"):
        if not _declared:
            _declared.update(_declare())
        return _declared[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- precompiled struct equivalents --------------------------------------------------------------------

_V2 = struct.Struct(">IIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")
_EXT = struct.Struct(">II")
SNAPSHOT_FIXED = struct.Struct(">QIHHIIQII")
assert _V2.size == V2_HEADER_LENGTH and _V3.size == V3_HEADER_LENGTH - V2_HEADER_LENGTH
assert SNAPSHOT_FIXED.size == 40


@dataclass(slots=True)
class Extension:
    type: int
    data: bytes


@dataclass(slots=True)
class Header:
    """The decoded header with its extensions. Fields are named as in the spec."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    extensions: list[Extension] = field(default_factory=list)
    backing_file: str | None = None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    def extension(self, ext_type: int) -> bytes | None:
        # qemu reads the extensions in order and each one of a type replaces the one before: the last wins
        for e in reversed(self.extensions):
            if e.type == ext_type:
                return e.data
        return None

    def set_extension(self, ext_type: int, data: bytes | None) -> None:
        self.extensions = [e for e in self.extensions if e.type != ext_type]
        if data is not None:
            self.extensions.insert(0 if ext_type == EXT_BACKING_FORMAT else len(self.extensions),
                                   Extension(ext_type, data))

    @property
    def backing_format(self) -> str | None:
        d = self.extension(EXT_BACKING_FORMAT)
        return d.split(b"\0", 1)[0].decode("utf-8", "replace") if d is not None else None

    @property
    def data_file(self) -> str | None:
        d = self.extension(EXT_DATA_FILE)
        return d.split(b"\0", 1)[0].decode("utf-8", "replace") if d is not None else None


def parse_header_fields(buf: bytes) -> Header:
    """Decode the fixed header fields only (no validation, no extensions).

    A file shorter than the header reads as zeroes past its end, as qemu reads it (its file layer fills
    short reads with zeroes): only the magic has to be there.
    """
    if len(buf) < 4 or buf[:4] != MAGIC.to_bytes(4, "big"):
        raise ImageFormatError("Image is not in qcow2 format")
    if len(buf) < V3_HEADER_LENGTH_COMPRESSION:
        buf = bytes(buf) + bytes(V3_HEADER_LENGTH_COMPRESSION - len(buf))
    (_magic, version, bfo, bfs, cbits, size, crypt, l1_size, l1_off, rt_off, rt_clusters, nb_snap,
     snap_off) = _V2.unpack_from(buf, 0)
    h = Header(version, bfo, bfs, cbits, size, crypt, l1_size, l1_off, rt_off, rt_clusters, nb_snap,
               snap_off)
    if version >= 3:
        (h.incompatible_features, h.compatible_features, h.autoclear_features, h.refcount_order,
         h.header_length) = _V3.unpack_from(buf, V2_HEADER_LENGTH)
        if h.header_length > V3_HEADER_LENGTH:
            h.compression_type = buf[V3_HEADER_LENGTH]
    return h


def feature_list(bits: int, group: int) -> list[str]:
    names = {b: n for g, b, n in FEATURE_NAMES if g == group}
    return [names.get(i, f"unknown feature {i}") for i in range(64) if bits >> i & 1]


# qemu's limits on what a request may reach (BDRV_MAX_LENGTH: INT64_MAX down to a multiple of 1 GiB) and
# on the entries of an image's tables (qcow2_validate_table's signed 64-bit end)
INT64_MAX = (1 << 63) - 1
INT_MAX = (1 << 31) - 1
MAX_REQUEST_END = INT64_MAX & ~((1 << 30) - 1)
SNAPSHOT_HEADER_SIZE = 40
CRYPT_AES = 1
CRYPT_LUKS = 2
BACKING_FORMAT_MAX = 16  # qemu's bs->backing_format, NUL included
BACKING_FILE_MAX = 1024  # qemu's bs->backing_file, NUL included
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY_SIZE = 64 * 1024 * 1024
_BITMAPS_EXT = struct.Struct(">IIQQ")  # nb_bitmaps, reserved32, directory size, directory offset


def _validate_table(offset: int, entries: int, entry_len: int, max_bytes: int, name: str, cs_: int) -> None:
    """qemu's qcow2_validate_table: the table's size first, then its offset (aligned, and its end within
    a signed 64-bit file offset)."""
    if entries > max_bytes // entry_len:
        raise ImageFormatError(f"{name} too large")
    if INT64_MAX - entries * entry_len < offset or offset % cs_:
        raise ImageFormatError(f"{name} offset invalid")


def _c_string(raw: bytes) -> str:
    """A name as qemu keeps it: a C string, ending at the first NUL."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def parse_header(buf: bytes, file_size: int, *, writable: bool = False, check: bool = False,
                 io: bool = True) -> Header:
    """Decode and validate a header from the first cluster of the file (or less, for tiny files).

    The checks are qemu's qcow2_do_open's, in its order and with its words, so that of several problems
    the one qemu reports is reported; the image's tables are only located here, not read (a table past
    the end of the file reads as zeroes, as in qemu; the driver decides whether it accepts that).
    ``writable``: the open is read-write, which an image marked corrupt refuses. ``check``: qemu's
    BDRV_O_CHECK, the open of ``check``, which neither needs a refcount table nor looks at the snapshot
    table (the check reads it itself). ``io`` False: qemu's BDRV_O_NO_IO, the open of ``info``, which
    does not need the image's data file.
    """
    h = parse_header_fields(buf)
    # the first cluster as qemu reads it: zeroes past the end of the file
    data = bytes(buf)
    if h.version not in (2, 3):
        raise UnsupportedError(f"Unsupported qcow2 version {h.version}")
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise ImageFormatError(f"Unsupported cluster size: 2^{h.cluster_bits}")
    cs_ = h.cluster_size
    if len(data) < cs_:
        data += bytes(cs_ - len(data))
    if h.version == 2:
        h.incompatible_features = h.compatible_features = h.autoclear_features = 0
        h.refcount_order = 4
        h.header_length = V2_HEADER_LENGTH
        h.compression_type = COMPRESSION_ZLIB
    elif h.header_length < V3_HEADER_LENGTH:
        raise ImageFormatError("qcow2 header too short")
    if h.header_length > cs_:
        raise ImageFormatError("qcow2 header exceeds cluster size")
    if h.backing_file_offset > cs_:
        raise ImageFormatError("Invalid backing file offset")
    ext_end = h.backing_file_offset or cs_
    if h.header_length <= V3_HEADER_LENGTH:
        h.compression_type = COMPRESSION_ZLIB
    if h.compression_type not in COMPRESSION_NAMES:
        raise UnsupportedError(f"qcow2: unknown compression type: {h.compression_type}")
    if h.compression_type == COMPRESSION_ZLIB and h.incompatible_features & INCOMPAT_COMPRESSION:
        raise ImageFormatError("qcow2: Compression type incompatible feature bit must not be set")
    if h.compression_type != COMPRESSION_ZLIB and not h.incompatible_features & INCOMPAT_COMPRESSION:
        raise ImageFormatError("qcow2: Compression type incompatible feature bit must be set")
    unknown = h.incompatible_features & ~INCOMPAT_KNOWN
    if unknown:
        raise UnsupportedError(f"Unsupported qcow2 feature(s): {_unsupported_features(data, h, ext_end)}")
    if h.incompatible_features & INCOMPAT_CORRUPT and writable and not check:
        raise CorruptImageError("qcow2: Image is corrupt; cannot be opened read/write")
    subcluster = cs_ // (SUBCLUSTERS if h.extended_l2 else 1)
    if subcluster < 1 << MIN_CLUSTER_BITS:
        raise ImageFormatError(f"Unsupported subcluster size: {subcluster}")
    if h.refcount_order > 6:
        raise ImageFormatError("Reference count entry width too large; may not exceed 64 bits")
    if h.refcount_table_clusters == 0 and not check:
        raise ImageFormatError("Image does not contain a reference count table")
    _validate_table(h.refcount_table_offset, h.refcount_table_clusters, cs_, MAX_REFTABLE_BYTES,
                    "Reference count table", cs_)
    if not check:
        _validate_table(h.snapshots_offset, h.nb_snapshots, SNAPSHOT_HEADER_SIZE,
                        SNAPSHOT_HEADER_SIZE * MAX_SNAPSHOTS, "Snapshot table", cs_)
    _validate_table(h.l1_table_offset, h.l1_size, 8, MAX_L1_BYTES, "Active L1 table", cs_)
    shift = h.cluster_bits + (h.cluster_bits - (4 if h.extended_l2 else 3))
    # size_to_l1 in qemu's unsigned 64-bit arithmetic, which wraps for sizes near 2^64
    l1_needed = ((h.size + (1 << shift) - 1) & ((1 << 64) - 1)) >> shift
    if l1_needed > INT_MAX:
        raise ImageFormatError("Image is too big")
    if h.l1_size < l1_needed:
        raise ImageFormatError("L1 table is too small")
    if h.l1_size and h.l1_table_offset + h.l1_size * 8 > MAX_REQUEST_END:
        raise ImageFormatError("Could not read L1 table: Input/output error")
    if h.crypt_method not in (0, CRYPT_AES, CRYPT_LUKS):
        raise UnsupportedError(f"Unsupported encryption method {h.crypt_method}")
    if h.refcount_table_offset + h.refcount_table_clusters * cs_ > MAX_REQUEST_END:
        raise ImageFormatError("Could not initialize refcount handling: Input/output error")
    h.extensions = parse_extensions(data, h.header_length, ext_end, h)
    # an encrypted image is unlocked by the driver (crypto.py), which needs the secret objects
    if h.crypt_method == CRYPT_LUKS and h.extension(EXT_CRYPTO) is None:
        raise UnsupportedError(f"Missing CRYPTO header for crypt method {h.crypt_method}")
    if io and h.incompatible_features & INCOMPAT_DATA_FILE and h.data_file is None:
        raise ImageFormatError("'data-file' is required for this image")
    if io and not h.incompatible_features & INCOMPAT_DATA_FILE \
            and h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW:
        raise ImageFormatError("data-file-raw requires a data file")
    if h.backing_file_offset:
        if h.backing_file_size > min(MAX_BACKING_FILE_NAME, cs_ - h.backing_file_offset) \
                or h.backing_file_size >= BACKING_FILE_MAX:
            raise ImageFormatError("Backing file name too long")
        name = _c_string(data[h.backing_file_offset:h.backing_file_offset + h.backing_file_size])
        h.backing_file = name or None
    if h.size // 512 > INT64_MAX // 512:
        raise ImageFormatError("Could not refresh total sector count: File too large")
    if writable and not check:
        _check_tables_for_writing(h, file_size)
    return h


def _check_tables_for_writing(h: Header, file_size: int) -> None:
    """Tables qemu opens but a writer here refuses (after every check of qemu's, whose refusals win): one
    past the end of the file reads as zeroes, so an allocation could land on it, and one over the header
    would be written through. qemu goes on with such an image, and corrupts it."""
    cs_ = h.cluster_size
    if h.l1_size:
        if h.l1_table_offset + h.l1_size * 8 > file_size:
            raise ImageFormatError("Active L1 table extends past the end of the file")
        if h.l1_table_offset < cs_:
            raise ImageFormatError("Active L1 table overlaps the image header")
    if h.refcount_table_offset + h.refcount_table_clusters * cs_ > file_size + cs_:
        raise ImageFormatError("Reference count table extends past the end of the file")
    if h.refcount_table_offset < cs_:
        raise ImageFormatError("Reference count table overlaps the image header")
    if h.nb_snapshots and h.snapshots_offset + SNAPSHOT_HEADER_SIZE * h.nb_snapshots > file_size:
        raise ImageFormatError("Snapshot table exceeds the end of the file")


def _unsupported_features(data: bytes, h: Header, ext_end: int) -> str:
    """qemu's report_unsupported_feature: the names the image's own feature table gives the unknown
    incompatible bits, then the bits it does not name, in hex."""
    mask = h.incompatible_features & ~INCOMPAT_KNOWN
    names: list[str] = []
    try:
        # the last feature table wins, as the last extension of every type does in qemu
        table = next((e.data for e in reversed(parse_extensions(data, h.header_length, ext_end, None))
                      if e.type == EXT_FEATURE_NAMES), b"")
    except ImageFormatError:
        table = b""  # qemu reads what it can and ignores the rest
    # qemu copies the extension into a zeroed buffer two entries longer: a short last entry (even a table
    # shorter than one entry) reads with zeroes after it, and a zero name ends the table
    table += bytes(96)
    for off in range(0, len(table) - 47, 48):
        kind, bit, raw = table[off], table[off + 1], table[off + 2:off + 48]
        if raw[:1] == b"\0":
            break
        if kind == 0 and bit < 64 and mask >> bit & 1:
            names.append(raw.split(b"\0", 1)[0].decode("utf-8", "replace"))
            mask &= ~(1 << bit)
    if mask:
        names.append(f"Unknown incompatible feature: {mask:x}")
    return ", ".join(names)


def parse_extensions(buf: bytes, start: int, end: int, h: Header | None = None) -> list[Extension]:
    """The header extensions between ``start`` and ``end``, walked as qemu's qcow2_read_extensions walks
    them, refused in its words. With ``h``, the extensions qemu checks at open are checked too."""
    exts: list[Extension] = []
    off = start
    while off < end:
        raw = bytes(buf[off:off + 8])
        etype, elen = _EXT.unpack(raw + bytes(8 - len(raw)))
        off += 8
        if off > end or elen > end - off:
            raise ImageFormatError("Header extension too large")
        if etype == EXT_END:
            break
        payload = bytes(buf[off:off + elen])
        payload += bytes(elen - len(payload))
        if h is not None:
            _check_extension(etype, payload, h)
        exts.append(Extension(etype, payload))
        off += (elen + 7) & ~7
    return exts


def _check_extension(etype: int, data: bytes, h: Header) -> None:
    if etype == EXT_BACKING_FORMAT and len(data) >= BACKING_FORMAT_MAX:
        raise ImageFormatError(
            f"ERROR: ext_backing_format: len={len(data)} too large (>={BACKING_FORMAT_MAX})")
    if etype == EXT_CRYPTO and h.crypt_method != CRYPT_LUKS:
        raise ImageFormatError("CRYPTO header extension only expected with LUKS encryption method")
    if etype == EXT_BITMAPS:
        if len(data) != _BITMAPS_EXT.size:
            raise ImageFormatError("bitmaps_ext: Invalid extension length")
        if not h.autoclear_features & AUTOCLEAR_BITMAPS:
            return  # stale bitmaps: dropped with qemu's warning, not refused (bitmaps.py)
        nb, reserved, dir_size, dir_offset = _BITMAPS_EXT.unpack(data)
        if reserved:
            raise ImageFormatError("bitmaps_ext: Reserved field is not zero")
        if nb > MAX_BITMAPS:
            raise ImageFormatError(f"bitmaps_ext: Image has {nb} bitmaps, exceeding the QEMU supported "
                                   f"maximum of {MAX_BITMAPS}")
        if nb == 0:
            raise ImageFormatError("found bitmaps extension with zero bitmaps")
        if dir_offset % h.cluster_size:
            raise ImageFormatError("bitmaps_ext: invalid bitmap directory offset")
        if dir_size > MAX_BITMAP_DIRECTORY_SIZE:
            raise ImageFormatError(f"bitmaps_ext: bitmap directory size ({dir_size}) exceeds the maximum "
                                   f"supported size ({MAX_BITMAP_DIRECTORY_SIZE})")


def encode_header(h: Header) -> bytes:
    """Serialise the fixed header, extensions and backing file name; the result fits in one cluster.

    ``backing_file_offset`` and ``header_length`` are recomputed.
    """
    v3 = h.version >= 3
    header_length = (V3_HEADER_LENGTH_COMPRESSION if h.incompatible_features & INCOMPAT_COMPRESSION
                     or h.header_length >= V3_HEADER_LENGTH_COMPRESSION else V3_HEADER_LENGTH) if v3 \
        else V2_HEADER_LENGTH
    ext = bytearray()
    for e in h.extensions:
        if not v3 and e.type not in (EXT_BACKING_FORMAT,):
            continue
        ext += _EXT.pack(e.type, len(e.data)) + e.data + bytes((-len(e.data)) % 8)
    ext += _EXT.pack(EXT_END, 0)
    name = (h.backing_file or "").encode("utf-8", "surrogateescape")
    bfo = header_length + len(ext) if name else 0
    total = header_length + len(ext) + len(name)
    if total > h.cluster_size:
        raise ImageFormatError("qcow2 header, extensions and backing file name do not fit in one cluster")
    out = bytearray(_V2.pack(MAGIC, h.version, bfo, len(name), h.cluster_bits, h.size, h.crypt_method,
                             h.l1_size, h.l1_table_offset, h.refcount_table_offset,
                             h.refcount_table_clusters, h.nb_snapshots, h.snapshots_offset))
    if v3:
        out += _V3.pack(h.incompatible_features, h.compatible_features, h.autoclear_features,
                        h.refcount_order, header_length)
        if header_length > V3_HEADER_LENGTH:
            out += bytes([h.compression_type]) + bytes(header_length - V3_HEADER_LENGTH - 1)
    out += ext + name
    h.header_length = header_length
    h.backing_file_offset = bfo
    h.backing_file_size = len(name)
    return bytes(out)


def compressed_split(cluster_bits: int) -> tuple[int, int]:
    """(offset mask, sector-count shift) of a compressed cluster descriptor: x = 62 - (cluster_bits - 8)."""
    x = 62 - (cluster_bits - 8)
    return (1 << x) - 1, x
