"""qcow2 image creation: option validation and the initial metadata layout qemu-img writes."""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat

from ...driver import ImageOpener, block_layer_error, create_file
from ...errors import BlockError, ImageFormatError, InvalidArgumentError, UnsupportedError
from ...hostio import HostFile, run_blocking
from ...qemuopts import parse_bool, parse_number, qapi_int
from ...qemuopts import parse_options as check_options
from ...units import parse_option_size as parse_size
from . import layout as L
from .spec import CREATE_OPTIONS
from .tables import ones_refcount_block

_PREALLOC_MODES = ("off", "metadata", "falloc", "full")
_V3_HINT = "(use version=v3 or greater)"
_MAX_L1_ENTRIES = L.MAX_L1_BYTES // 8


@dataclass(slots=True)
class Qcow2CreateSpec:
    """Validated creation parameters."""

    size: int
    version: int = 3
    cluster_size: int = 65536
    backing_file: str | None = None
    backing_fmt: str | None = None
    preallocation: str = "off"
    lazy_refcounts: bool = False
    refcount_bits: int = 16
    compression_type: int = L.COMPRESSION_ZLIB
    extended_l2: bool = False
    data_file: str | None = None
    data_file_raw: bool = False


def parse_options(size: int, options: dict[str, str]) -> Qcow2CreateSpec:
    """Validate the ``-o`` options with qemu-img's checks and messages; ``size`` -1 means not given."""
    check_options(options, CREATE_OPTIONS)  # names and types, refused as QemuOpts refuses them
    o = options
    if "size" in o:
        size = parse_size("size", o["size"])
    spec = Qcow2CreateSpec(size=size)
    if "encryption" in o:
        parse_bool("encryption", o["encryption"])
    if "compat" in o:
        compat = o["compat"]
        if compat in ("0.10", "v2"):
            spec.version = 2
        elif compat in ("1.1", "v3"):
            spec.version = 3
        else:
            raise InvalidArgumentError(f"Parameter 'version' does not accept value '{compat}'")
    if "cluster_size" in o:
        spec.cluster_size = parse_size("cluster_size", o["cluster_size"])
    if "preallocation" in o:
        if o["preallocation"] not in _PREALLOC_MODES:
            raise InvalidArgumentError(
                f"Parameter 'preallocation' does not accept value '{o['preallocation']}'")
        spec.preallocation = o["preallocation"]
    if "compression_type" in o:
        ct = {v: k for k, v in L.COMPRESSION_NAMES.items()}.get(o["compression_type"])
        if ct is None:
            raise InvalidArgumentError(
                f"Parameter 'compression-type' does not accept value '{o['compression_type']}'")
        spec.compression_type = ct
    spec.lazy_refcounts = parse_bool("lazy_refcounts", o["lazy_refcounts"]) if "lazy_refcounts" in o \
        else False
    spec.extended_l2 = parse_bool("extended_l2", o["extended_l2"]) if "extended_l2" in o else False
    spec.data_file_raw = parse_bool("data_file_raw", o["data_file_raw"]) if "data_file_raw" in o \
        else False
    if "refcount_bits" in o:
        parse_number("refcount_bits", o["refcount_bits"])
        # qcow2_co_create_opts reads the text again through QAPI, as a signed 64-bit int
        bits = qapi_int(o["refcount_bits"])
        if bits is None:
            raise InvalidArgumentError("Parameter 'refcount-bits' expects integer")
        spec.refcount_bits = bits
    spec.backing_file = o.get("backing_file") or None
    spec.backing_fmt = o.get("backing_fmt") or None
    spec.data_file = o.get("data_file") or None

    # The order of these checks is qcow2_co_create's.
    if spec.size >= 0:
        spec.size = -(-spec.size // 512) * 512
    if spec.extended_l2 and spec.version < 3:
        raise InvalidArgumentError(
            f"Extended L2 entries are only supported with compatibility level 1.1 and above {_V3_HINT}")
    cs = spec.cluster_size
    if cs & (cs - 1) or not 1 << L.MIN_CLUSTER_BITS <= cs <= 1 << L.MAX_CLUSTER_BITS:
        raise InvalidArgumentError(
            f"Cluster size must be a power of two between {1 << L.MIN_CLUSTER_BITS} and "
            f"{(1 << L.MAX_CLUSTER_BITS) // 1024}k")
    if spec.extended_l2 and cs < 16384:
        raise InvalidArgumentError(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")
    if spec.backing_file and spec.preallocation != "off" and not spec.extended_l2:
        raise InvalidArgumentError(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on")
    if spec.backing_fmt and not spec.backing_file:
        raise InvalidArgumentError("Backing format cannot be used without backing file")
    if spec.lazy_refcounts and spec.version < 3:
        raise InvalidArgumentError(
            f"Lazy refcounts only supported with compatibility level 1.1 and above {_V3_HINT}")
    rb = spec.refcount_bits
    if rb == 0 or rb > 64 or rb & (rb - 1):
        raise InvalidArgumentError("Refcount width must be a power of two and may not exceed 64 bits")
    if spec.version < 3 and rb != 16:
        raise InvalidArgumentError(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above "
            f"{_V3_HINT}")
    if spec.data_file_raw and not spec.data_file:
        raise InvalidArgumentError("data-file-raw requires data-file")
    if spec.data_file_raw and spec.backing_file:
        raise InvalidArgumentError("Backing file and data-file-raw cannot be used at the same time")
    if spec.data_file_raw and spec.preallocation == "off":
        # The data file must read as the guest disk on its own, so every cluster is mapped 1:1.
        spec.preallocation = "metadata"
    if spec.data_file and spec.version < 3:
        raise InvalidArgumentError(
            f"External data files are only supported with compatibility level 1.1 and above {_V3_HINT}")
    if spec.compression_type != L.COMPRESSION_ZLIB and spec.version < 3:
        raise InvalidArgumentError(
            "Non-zlib compression type is only supported with compatibility level 1.1 and above "
            f"{_V3_HINT}")
    return spec


# -- layout ------------------------------------------------------------------------------------------

@dataclass(slots=True)
class Qcow2Layout:
    """Where everything goes, in clusters. Every cluster below ``end_cluster`` has refcount 1."""

    cluster_size: int
    l1_size: int
    reftable_cluster: int
    reftable_clusters: int
    first_refblock: int
    refblocks: int
    l1_cluster: int
    l1_clusters: int
    # Sequences, not lists: ranges in the common layout, so a plan holds no memory per L2 table.
    l2_clusters: Sequence[int]  # host cluster of each L2 table, in L1 order
    data_start: Sequence[int]  # host cluster of the first data cluster each L2 table maps (empty: none)
    end_cluster: int


def plan_layout(size: int, cluster_bits: int, refcount_order: int, l2_entry_size: int,
                preallocation: str, external_data: bool) -> Qcow2Layout:
    """Place the metadata as qemu-img does.

    Header at 0, refcount table at 1, refcount blocks, L1; with metadata preallocation each L2 table is
    followed by its data. With falloc/full preallocation qemu moves the refcount table behind L1, puts the
    first L2 table into the freed cluster 1, the data in one run and the other L2 tables after it. Where
    qemu would need more than one refcount block its placement follows its allocator's history; we then
    use the first scheme, which is just as valid.
    """
    cs = 1 << cluster_bits
    l2_entries = cs // l2_entry_size
    l1_size = -(-size // (cs * l2_entries))
    if l1_size > _MAX_L1_ENTRIES:
        raise InvalidArgumentError(
            "The image size is too large for file format 'qcow2' (try using a larger cluster size)")
    l1c = -(-l1_size * 8 // cs)
    prealloc = preallocation != "off"
    n_l2 = l1_size if prealloc else 0
    guest_clusters = -(-size // cs)
    data = guest_clusters if prealloc and not external_data else 0
    rb_entries = cs * 8 >> refcount_order
    if preallocation in ("falloc", "full") and not external_data and n_l2:
        total = 3 + l1c + n_l2 + data
        if total <= rb_entries:
            l1_cluster = 3
            rt = l1_cluster + l1c
            d0 = rt + 1
            l2s = [1] + [d0 + data + i for i in range(n_l2 - 1)]
            starts = [d0 + i * l2_entries for i in range(n_l2)]
            return Qcow2Layout(cs, l1_size, rt, 1, 2, 1, l1_cluster, l1c, l2s, starts, total)
    rt, rbs = 1, 1
    while True:
        total = 1 + rt + rbs + l1c + n_l2 + data
        need_rbs = -(-total // rb_entries)
        need_rt = -(-need_rbs * 8 // cs)
        if need_rbs <= rbs and need_rt <= rt:
            break
        rbs, rt = max(rbs, need_rbs), max(rt, need_rt)
    if rt * cs > L.MAX_REFTABLE_BYTES:
        raise InvalidArgumentError(
            "The image size is too large for file format 'qcow2' (try using a larger cluster size)")
    l1_cluster = 1 + rt + rbs
    host = l1_cluster + l1c
    # Each L2 table is followed by the data it maps (all but the last map l2_entries clusters).
    stride = 1 + l2_entries if data else 1
    l2_tables = range(host, host + n_l2 * stride, stride)
    first_data = range(host + 1, host + 1 + n_l2 * stride, stride) if data else range(0)
    end = host + n_l2 + data
    return Qcow2Layout(cs, l1_size, 1, rt, 1 + rt, rbs, l1_cluster, l1c, l2_tables, first_data, end)


# -- writing -----------------------------------------------------------------------------------------

def build_header(spec: Qcow2CreateSpec, lay: Qcow2Layout, cluster_bits: int) -> bytes:
    h = L.Header(
        version=spec.version, backing_file_offset=0, backing_file_size=0, cluster_bits=cluster_bits,
        size=spec.size, crypt_method=0, l1_size=lay.l1_size,
        l1_table_offset=lay.l1_cluster * lay.cluster_size if lay.l1_size else 0,
        refcount_table_offset=lay.reftable_cluster * lay.cluster_size,
        refcount_table_clusters=lay.reftable_clusters, nb_snapshots=0, snapshots_offset=0,
    )
    if spec.version >= 3:
        h.refcount_order = spec.refcount_bits.bit_length() - 1
        h.header_length = L.V3_HEADER_LENGTH_COMPRESSION
        h.compression_type = spec.compression_type
        if spec.extended_l2:
            h.incompatible_features |= L.INCOMPAT_EXTL2
        if spec.compression_type != L.COMPRESSION_ZLIB:
            h.incompatible_features |= L.INCOMPAT_COMPRESSION
        if spec.data_file:
            h.incompatible_features |= L.INCOMPAT_DATA_FILE
        if spec.lazy_refcounts:
            h.compatible_features |= L.COMPAT_LAZY_REFCOUNTS
        if spec.data_file_raw:
            h.autoclear_features |= L.AUTOCLEAR_DATA_FILE_RAW
    if spec.backing_fmt:
        h.set_extension(L.EXT_BACKING_FORMAT, spec.backing_fmt.encode())
    if spec.version >= 3:
        if spec.data_file:
            h.set_extension(L.EXT_DATA_FILE, spec.data_file.encode("utf-8", "surrogateescape"))
        # qemu leaves the feature name table out of images with clusters smaller than 8 KiB
        if lay.cluster_size >= 8192:
            h.set_extension(L.EXT_FEATURE_NAMES, feature_name_table())
    h.backing_file = spec.backing_file
    return L.encode_header(h)


def feature_name_table() -> bytes:
    """The feature name table extension as qemu writes it: type, bit, 46-byte NUL-padded name."""
    return b"".join(struct.pack(">BB46s", group, bit, name.encode()) for group, bit, name in L.FEATURE_NAMES)


async def _write_metadata(hf: HostFile, spec: Qcow2CreateSpec, lay: Qcow2Layout, cluster_bits: int) -> None:
    cs = lay.cluster_size
    # the whole first cluster, as qemu writes it: its allocation (which qemu's metadata-preallocation
    # detection compares with the refcounts, and which info's disk size shows) is then the same
    header = build_header(spec, lay, cluster_bits)
    await hf.pwrite(0, header + bytes(cs - len(header)))
    table = bytearray(lay.reftable_clusters * cs)
    for i in range(lay.refblocks):
        struct.pack_into(">Q", table, i * 8, (lay.first_refblock + i) * cs)
    await hf.pwrite(lay.reftable_cluster * cs, table)
    # every cluster below end_cluster is in use exactly once
    order = spec.refcount_bits.bit_length() - 1
    rb_entries = cs * 8 >> order
    full = ones_refcount_block(rb_entries, order, cs)
    for i in range(lay.refblocks):
        used = min(rb_entries, lay.end_cluster - i * rb_entries)
        block = full if used == rb_entries else ones_refcount_block(used, order, cs)
        await hf.pwrite((lay.first_refblock + i) * cs, block)
    if not lay.l1_size:
        return
    l2_entries = cs * 8 // (128 if spec.extended_l2 else 64)
    step = 2 if spec.extended_l2 else 1
    guest_clusters = -(-spec.size // cs)
    l1 = bytearray(lay.l1_size * 8)
    data_runs: list[tuple[int, int]] = []
    data_start: Iterable[int] = lay.data_start if lay.data_start else repeat(-1, len(lay.l2_clusters))
    for i, (l2_cluster, d0) in enumerate(zip(lay.l2_clusters, data_start, strict=True)):
        struct.pack_into(">Q", l1, i * 8, l2_cluster * cs | L.L1E_COPIED)
        n = min(l2_entries, guest_clusters - i * l2_entries)
        first = i * l2_entries if spec.data_file else d0
        l2 = array("Q", bytes(8 * l2_entries * step))
        for j in range(n):
            l2[j * step] = (first + j) * cs | L.L2E_COPIED
        if d0 >= 0:
            if data_runs and data_runs[-1][0] + data_runs[-1][1] == d0 * cs:
                data_runs[-1] = (data_runs[-1][0], data_runs[-1][1] + n * cs)
            else:
                data_runs.append((d0 * cs, n * cs))
        l2.byteswap()
        await hf.pwrite(l2_cluster * cs, l2.tobytes())
    await hf.pwrite(lay.l1_cluster * cs, l1)
    sc = cs // (L.SUBCLUSTERS if spec.extended_l2 else 1)
    tail = spec.size % sc
    if spec.preallocation == "metadata" and lay.data_start and tail:
        # qemu allocates the last (sub)cluster for a part of it and writes the rest as zeroes (the
        # copy-on-write of that allocation): the same blocks are then allocated in the file
        i, j = divmod(guest_clusters - 1, l2_entries)
        await hf.pwrite((lay.data_start[i] + j) * cs + spec.size % cs, bytes(sc - tail))
    if spec.preallocation in ("falloc", "full"):
        for off, length in _merge_runs(data_runs):
            await _preallocate(hf, off, length, spec.preallocation)


async def _size_data_file(dhf: HostFile, size: int, prealloc: str, sc: int) -> None:
    """Give a new external data file the size and the blocks qemu's create gives it.

    qemu creates the file empty, then truncates the image to its size. Without preallocation that
    truncates the data file to the size, and its file driver writes the first block of a file it grows
    from empty (4 KiB, or 512 bytes below that, for probing the alignment later). With preallocation
    (metadata, which data_file_raw implies, falloc, full) the image's clusters are allocated first: when
    the size ends inside a (sub)cluster ``sc``, the rest of it is written as zeroes (the copy-on-write of
    the last allocation), which grows the file to that boundary and leaves nothing more to do; when it
    ends on a boundary, the file is truncated to the size in the preallocation's mode (falloc:
    allocated, full: written) and its first block written.
    """
    await dhf.truncate(0)
    if size == 0:
        return
    tail = -size % sc
    if prealloc != "off" and tail:
        await dhf.pwrite(size, bytes(tail))
        return
    await dhf.truncate(size)
    if prealloc in ("falloc", "full"):
        await _preallocate(dhf, 0, size, prealloc)
    await dhf.pwrite(0, bytes(4096 if size >= 4096 else 512))


def _merge_runs(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, length in runs:
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((off, length))
    return out


async def _preallocate(hf: HostFile, offset: int, length: int, mode: str) -> None:
    if mode == "full":
        await hf.write_zeroes_slow(offset, length)
        return
    try:
        await hf.allocate(offset, length)
    except UnsupportedError:
        await hf.write_zeroes_slow(offset, length)


async def _backing_size(spec: Qcow2CreateSpec, path: str, opener: ImageOpener) -> int:
    """Open the backing file as qemu-img create does, to check it and to learn its size."""
    assert spec.backing_file is not None
    bpath = opener.resolve(spec.backing_file, path)
    try:
        drv = await opener.sharing().open(bpath, spec.backing_fmt, read_only=True)  # as qemu-img
    except BlockError as exc:
        block_layer_error(exc, "")
        # after any hint of the open's own (an NBD server's message), as qemu appends its hints
        exc.hint = (exc.hint + "\n" if exc.hint else "") + "Could not open backing image."
        raise
    try:
        return drv.size
    finally:
        await drv.close()


async def create_qcow2(path: str, size: int, options: dict[str, str], *, opener: ImageOpener,
                       unsafe: bool = False) -> None:
    """Create a new qcow2 image at ``path`` (an existing file is truncated), as qemu-img create does.

    ``size`` -1 means "take the size from the backing file". The backing file is opened to check it
    unless ``unsafe`` (qemu-img create -u) and a size is given.
    """
    from .crypto import check_create, luks_options, new_volume

    spec = parse_options(size, options)
    _own, enc = luks_options(options)
    secret = check_create(enc)
    if spec.size < 0 and not spec.backing_file:
        raise InvalidArgumentError("Image creation needs a size parameter")
    if spec.backing_file and (spec.size < 0 or not unsafe):
        backing_size = await _backing_size(spec, path, opener)
        if spec.size < 0:
            spec.size = -(-backing_size // 512) * 512
    if spec.size > L.MAX_VIRTUAL_SIZE:
        raise InvalidArgumentError(
            "The image size is too large for file format 'qcow2' (try using a larger cluster size)")
    cluster_bits = spec.cluster_size.bit_length() - 1
    lay = plan_layout(spec.size, cluster_bits, spec.refcount_bits.bit_length() - 1,
                      16 if spec.extended_l2 else 8, spec.preallocation, spec.data_file is not None)
    try:
        build_header(spec, lay, cluster_bits)
    except ImageFormatError:
        raise InvalidArgumentError("Backing file name too long") from None

    if spec.data_file:
        dpath = opener.resolve(spec.data_file, path)
        dhf = HostFile.open(dpath, read_only=False, create=True)
        try:
            sc = (1 << cluster_bits) // (L.SUBCLUSTERS if spec.extended_l2 else 1)
            await _size_data_file(dhf, spec.size, spec.preallocation, sc)
            await dhf.fdatasync()
        finally:
            dhf.close()

    vol = None if secret is None else await run_blocking(new_volume, enc, secret)
    cs = lay.cluster_size
    if lay.l2_clusters:
        end = lay.end_cluster * cs
        sc = cs // (L.SUBCLUSTERS if spec.extended_l2 else 1)
        if spec.preallocation == "metadata" and lay.data_start and spec.size % cs and sc < cs:
            # qemu's file ends where the last allocated subcluster of the last data cluster does
            end -= cs - -(-(spec.size % cs) // sc) * sc
    elif lay.l1_size:
        end = lay.l1_cluster * cs + lay.l1_size * 8
    else:
        end = lay.end_cluster * cs
    hf = await create_file(path)
    try:
        if not hf.local and spec.preallocation != "off" and end > hf.size():
            # an NBD export cannot grow: qemu's preallocating truncate fails before anything is written
            under = "" if spec.preallocation == "metadata" else "Failed to resize underlying file: "
            raise InvalidArgumentError(f"Could not resize image: {under}Cannot grow NBD nodes")
        await hf.truncate(0)
        await _write_metadata(hf, spec, lay, cluster_bits)
        await hf.truncate(end)
        await hf.fdatasync()
    except BlockError:
        raise
    except OSError as exc:
        raise InvalidArgumentError(f"Could not write qcow2 image: {exc.strerror or exc}") from None
    finally:
        hf.close()
    if vol is not None:
        from .crypto import add_luks

        await add_luks(path, vol)
