"""qcow2 on-disk layout, in the words of docs/interop/qcow2.txt: header, extensions, entry bits, snapshots.

The header and extensions are untrusted input read once per open: they are declared with construct
(``HEADER``) and also decoded by a precompiled ``struct`` (``parse_header``); a test keeps the two equal.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from ...errors import ImageFormatError, UnsupportedError
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
        for e in self.extensions:
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
        return d.decode("utf-8", "replace") if d is not None else None

    @property
    def data_file(self) -> str | None:
        d = self.extension(EXT_DATA_FILE)
        return d.decode("utf-8", "replace") if d is not None else None


def parse_header_fields(buf: bytes) -> Header:
    """Decode the fixed header fields only (no validation, no extensions)."""
    if len(buf) < V2_HEADER_LENGTH:
        raise ImageFormatError("Image is not in qcow2 format (file too short)")
    (magic, version, bfo, bfs, cbits, size, crypt, l1_size, l1_off, rt_off, rt_clusters, nb_snap,
     snap_off) = _V2.unpack_from(buf, 0)
    if magic != MAGIC:
        raise ImageFormatError("Image is not in qcow2 format")
    h = Header(version, bfo, bfs, cbits, size, crypt, l1_size, l1_off, rt_off, rt_clusters, nb_snap,
               snap_off)
    if version >= 3:
        if len(buf) < V3_HEADER_LENGTH:
            raise ImageFormatError("qcow2 header is truncated")
        (h.incompatible_features, h.compatible_features, h.autoclear_features, h.refcount_order,
         h.header_length) = _V3.unpack_from(buf, V2_HEADER_LENGTH)
        if h.header_length > V3_HEADER_LENGTH and len(buf) > V3_HEADER_LENGTH:
            h.compression_type = buf[V3_HEADER_LENGTH]
    return h


def feature_list(bits: int, group: int) -> list[str]:
    names = {b: n for g, b, n in FEATURE_NAMES if g == group}
    return [names.get(i, f"unknown feature {i}") for i in range(64) if bits >> i & 1]


def parse_header(buf: bytes, file_size: int, *, tables_past_end: bool = False) -> Header:
    """Decode and validate a header from the first cluster of the file (or less, for tiny files).

    Every value that sizes an allocation or points into the file is checked here, once.
    ``tables_past_end`` lets the L1 and refcount tables lie past the end of the file, as qemu's open
    does (it reads them as zeroes): check needs it to report such an image as corrupt instead of
    refusing it; an image opened for I/O does not get it.
    """
    h = parse_header_fields(buf)
    if h.version not in (2, 3):
        raise UnsupportedError(f"Unsupported qcow2 version {h.version}")
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise ImageFormatError(f"Unsupported cluster size: 2^{h.cluster_bits}")
    cs_ = h.cluster_size
    if h.version == 2:
        h.header_length = V2_HEADER_LENGTH
        h.refcount_order = 4
    else:
        if h.header_length < V3_HEADER_LENGTH:
            raise ImageFormatError("qcow2 header too short")
        if h.header_length > cs_:
            raise ImageFormatError("qcow2 header exceeds cluster size")
        unknown = h.incompatible_features & ~INCOMPAT_KNOWN
        if unknown:
            names = ", ".join(f"bit {i}" for i in range(64) if unknown >> i & 1)
            raise UnsupportedError(f"Unsupported qcow2 feature(s): {names}")
        if h.refcount_order > 6:
            raise ImageFormatError("Reference count entry width too large; may not exceed 64 bits")
        if h.incompatible_features & INCOMPAT_COMPRESSION:
            if h.header_length <= V3_HEADER_LENGTH:
                raise ImageFormatError("compression type bit set but header has no compression type")
            if h.compression_type not in COMPRESSION_NAMES:
                raise UnsupportedError(f"Unknown compression type {h.compression_type}")
        elif h.header_length > V3_HEADER_LENGTH and h.compression_type != COMPRESSION_ZLIB:
            raise ImageFormatError("compression type is set but the compression type bit is not")
        if h.extended_l2 and h.cluster_bits < 14:
            raise ImageFormatError(
                "Extended L2 entries are only supported with cluster sizes of at least 16 KiB")
    if h.crypt_method != 0:
        raise UnsupportedError("Encrypted qcow2 images are not supported")
    if h.size > MAX_VIRTUAL_SIZE:
        raise ImageFormatError(f"Image size {h.size} is too large")
    # L1 table
    l2_entries = h.l2_entries
    needed_l1 = -(-h.size // (cs_ * l2_entries))
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise ImageFormatError("Active L1 table too large")
    if h.l1_size < needed_l1:
        raise ImageFormatError("L1 table is too small")
    past_end = not tables_past_end and h.l1_table_offset >= file_size
    if h.l1_table_offset % cs_ or (h.l1_size and (h.l1_table_offset == 0 or past_end)):
        raise ImageFormatError("Invalid L1 table offset")
    # refcount table
    if h.refcount_table_offset % cs_ or h.refcount_table_offset == 0:
        raise ImageFormatError("Invalid reference count table offset")
    if h.refcount_table_clusters * cs_ > MAX_REFTABLE_BYTES or h.refcount_table_clusters == 0:
        raise ImageFormatError("Reference count table too large" if h.refcount_table_clusters
                               else "Image does not contain a reference count table")
    if h.refcount_table_offset >= file_size and not tables_past_end:
        raise ImageFormatError("Invalid reference count table offset")
    # snapshots
    if h.nb_snapshots > MAX_SNAPSHOTS:
        raise ImageFormatError("Too many snapshots")
    if h.nb_snapshots and (h.snapshots_offset % 8 or h.snapshots_offset >= file_size):
        raise ImageFormatError("Invalid snapshot table offset")
    # extensions live between the header and the end of the first cluster (or the backing name)
    ext_start = h.header_length if h.version >= 3 else V2_HEADER_LENGTH
    ext_end = cs_
    if h.backing_file_offset:
        if h.backing_file_offset > cs_ or h.backing_file_size > MAX_BACKING_FILE_NAME \
                or h.backing_file_offset + h.backing_file_size > cs_:
            raise ImageFormatError("Invalid backing file offset or name length")
        if h.backing_file_offset > ext_start:
            ext_end = h.backing_file_offset
        raw = bytes(buf[h.backing_file_offset:h.backing_file_offset + h.backing_file_size])
        if len(raw) != h.backing_file_size:
            raise ImageFormatError("qcow2 header is truncated: backing file name past end of file")
        h.backing_file = raw.decode("utf-8", "surrogateescape")
    h.extensions = parse_extensions(buf, ext_start, ext_end)
    if h.incompatible_features & INCOMPAT_DATA_FILE and h.data_file is None:
        raise ImageFormatError("Missing external data file name (data-file extension)")
    return h


def parse_extensions(buf: bytes, start: int, end: int) -> list[Extension]:
    exts: list[Extension] = []
    off = start
    end = min(end, len(buf))
    while off + 8 <= end:
        etype, elen = _EXT.unpack_from(buf, off)
        off += 8
        if etype == EXT_END:
            break
        if elen > end - off:
            raise ImageFormatError("header extension extends past the first cluster")
        exts.append(Extension(etype, bytes(buf[off:off + elen])))
        off += (elen + 7) & ~7
    return exts


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
