"""Rewriting a closed qcow2 image's header cluster: the backing file (rebase) and the fields amend changes.

The header, its extensions and the backing file name all live in cluster 0. qemu's ``qcow2_update_header``
rebuilds that cluster from its in-memory state and writes it whole, in one write; so does
:func:`write_header` here, after an fdatasync that makes everything the new header points to durable, and
followed by another. The extensions go in qemu's order (backing format, external data file, the feature
name table of v3 images with clusters of 8 KiB or more, bitmaps, then the extensions it does not know,
kept as they were) and the backing file name right after the end marker, so that an image rewritten here
has the header qemu would have written.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ...errors import InvalidArgumentError, NoSpaceError
from ...hostio import HostFile
from . import layout as L
from .create import feature_name_table
from .headio import read_first_cluster
from .spec import MAGIC

_V2 = struct.Struct(">IIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")
_EXT = struct.Struct(">II")
# extension types rebuilt from the header's own fields; any other type is carried over unchanged
_REBUILT = frozenset({L.EXT_BACKING_FORMAT, L.EXT_DATA_FILE, L.EXT_CRYPTO, L.EXT_FEATURE_NAMES,
                      L.EXT_BITMAPS})
# qemu writes the feature name table only where a cluster has this much room
_FEATURE_TABLE_MIN_CLUSTER = 8192


class HeaderSpaceError(NoSpaceError):
    """The header, its extensions and the backing file name do not fit in the first cluster."""

    def __init__(self) -> None:
        super().__init__("No space left in the file header")


@dataclass(slots=True)
class HeaderImage:
    """A header as read from disk, with what a rewrite must carry over that ``Header`` does not hold."""

    header: L.Header
    unknown_fields: bytes  # v3 header fields past the 112 bytes qemu knows (kept, as qemu keeps them)


async def read_header_image(hf: HostFile) -> HeaderImage:
    first = await read_first_cluster(hf)
    h = L.parse_header(first, hf.size(), writable=True)
    if h.version < 3:
        # qemu does not read a bitmaps extension in a v2 image (one a downgrade left there): it warns that
        # the bitmaps are stale and never writes the extension back
        h.set_extension(L.EXT_BITMAPS, None)
    unknown = b""
    if h.version >= 3 and h.header_length > L.V3_HEADER_LENGTH_COMPRESSION:
        unknown = bytes(first[L.V3_HEADER_LENGTH_COMPRESSION:h.header_length])
    return HeaderImage(h, unknown)


def encode_cluster(img: HeaderImage) -> bytes:
    """The whole first cluster for ``img.header``: fixed fields, extensions, backing file name, zeroes.

    Raises HeaderSpaceError when it does not fit. ``header_length`` and the backing file offset and size
    fields of the header are set to what is written.
    """
    h = img.header
    v3 = h.version >= 3
    exts: list[tuple[int, bytes]] = []
    fmt = h.extension(L.EXT_BACKING_FORMAT)
    if fmt is not None and h.backing_file is not None:
        exts.append((L.EXT_BACKING_FORMAT, fmt))
    data_file = h.extension(L.EXT_DATA_FILE)
    if data_file is not None and h.incompatible_features & L.INCOMPAT_DATA_FILE:
        exts.append((L.EXT_DATA_FILE, data_file))
    crypto = h.extension(L.EXT_CRYPTO)
    if crypto is not None and h.crypt_method == L.CRYPT_LUKS:
        exts.append((L.EXT_CRYPTO, crypto))
    if v3 and h.cluster_size >= _FEATURE_TABLE_MIN_CLUSTER:
        exts.append((L.EXT_FEATURE_NAMES, feature_name_table()))
    bitmaps = h.extension(L.EXT_BITMAPS)
    if bitmaps is not None:
        # kept whatever the version, as qemu keeps it (a v2 image then shows it as inconsistent)
        exts.append((L.EXT_BITMAPS, bitmaps))
    exts += [(e.type, e.data) for e in h.extensions if e.type not in _REBUILT]
    if v3:
        header_length = L.V3_HEADER_LENGTH_COMPRESSION + len(img.unknown_fields)
    else:
        header_length = L.V2_HEADER_LENGTH
    area = bytearray()
    for etype, data in exts:
        area += _EXT.pack(etype, len(data)) + data + bytes(-len(data) % 8)
    area += _EXT.pack(L.EXT_END, 0)
    name = b"" if h.backing_file is None else h.backing_file.encode("utf-8", "surrogateescape")
    total = header_length + len(area) + len(name)
    if total > h.cluster_size:
        raise HeaderSpaceError()
    bfo = header_length + len(area) if h.backing_file is not None else 0
    out = bytearray(_V2.pack(MAGIC, h.version, bfo, len(name),
                             h.cluster_bits, h.size, h.crypt_method, h.l1_size, h.l1_table_offset,
                             h.refcount_table_offset, h.refcount_table_clusters, h.nb_snapshots,
                             h.snapshots_offset))
    if v3:
        out += _V3.pack(h.incompatible_features, h.compatible_features, h.autoclear_features,
                        h.refcount_order, header_length)
        out += bytes([h.compression_type]) + bytes(L.V3_HEADER_LENGTH_COMPRESSION - L.V3_HEADER_LENGTH - 1)
        out += img.unknown_fields
    out += area + name
    h.header_length = header_length
    h.backing_file_offset = bfo
    h.backing_file_size = len(name)
    h.extensions = [L.Extension(t, d) for t, d in exts]
    return bytes(out) + bytes(h.cluster_size - len(out))


async def write_header(hf: HostFile, img: HeaderImage) -> None:
    """Replace the header cluster with ``img`` in one write, between two syncs.

    The first sync makes durable everything the new header may point to (a new refcount table, a new
    snapshot table, copied data); the header itself is a single write of the whole cluster, as qemu
    writes it, so its fields, extensions and backing file name change together.
    """
    data = encode_cluster(img)
    await hf.fdatasync()
    await hf.pwrite(0, data)
    await hf.fdatasync()


async def change_backing_file(hf: HostFile, backing: str | None, backing_fmt: str | None) -> None:
    """Point the qcow2 image in ``hf`` at ``backing`` (format ``backing_fmt``), or at nothing when None.

    The name is stored as given (a relative name is resolved against the image's folder when the image
    is opened). qemu's refusals: an image whose external data file must stay valid as a raw image cannot
    get a backing file, and a name longer than 1023 bytes is refused (both EINVAL), as is a header that
    would no longer fit in its cluster (ENOSPC).
    """
    img = await read_header_image(hf)
    h = img.header
    if backing is not None:
        if h.autoclear_features & L.AUTOCLEAR_DATA_FILE_RAW:
            raise InvalidArgumentError("Invalid argument")
        if len(backing.encode("utf-8", "surrogateescape")) > L.MAX_BACKING_FILE_NAME:
            raise InvalidArgumentError("Invalid argument")
    h.backing_file = backing
    h.set_extension(L.EXT_BACKING_FORMAT,
                    backing_fmt.encode() if backing is not None and backing_fmt is not None else None)
    await write_header(hf, img)
