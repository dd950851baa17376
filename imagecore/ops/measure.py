"""`measure`: the size a new image of a format needs, for a given virtual size or to hold a given image.

The computation is qemu 7.2's (``qcow2_measure``, ``qcow2_calc_prealloc_size``, ``raw_measure``), so the
numbers are the ones qemu-img prints: ``required`` counts the metadata of a fully allocated image of the
(cluster-rounded) virtual size, minus the data clusters the source does not allocate; ``fully-allocated``
counts every data cluster. The messages and their order are qemu-img's.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from ..driver import BlockDriver, ImageOpener, format_names, image_open_error
from ..errors import (
    BlockError,
    ImageLockedError,
    InvalidArgumentError,
    OperationCancelledError,
    SnapshotNotFoundError,
    UnsupportedError,
)
from ..formats.qcow2 import layout as L
from ..formats.qcow2.driver import Qcow2Driver
from ..locking import ALL_PERMS, lock_image
from ..qemuopts import parse_bool, parse_number, parse_options
from ..units import parse_option_size as parse_opt_size
from .common import (
    ProgressFn,
    check_cancelled,
    check_image_path,
    report,
    require_snapshot_loaded,
    snapshot_param,
)
from .create import QEMU_NO_CREATE, all_options

# qemu 7.2 formats that can create images but have no .bdrv_measure, and formats that cannot create.
_NO_MEASURE = frozenset({"vmdk", "vdi", "vhdx", "vpc", "qed", "qcow", "parallels", "file", "nbd",
                         "host_device", "host_cdrom"})
_NO_CREATE = QEMU_NO_CREATE
_PREALLOC = ("off", "metadata", "falloc", "full")
_MAX_L1_BYTES = 32 << 20  # QCOW_MAX_L1_SIZE


@dataclass(slots=True)
class MeasureResult:
    """qemu's BlockMeasureInfo; ``bitmaps`` is None when qemu leaves it out (raw, v2, non-qcow2 source)."""

    required: int
    fully_allocated: int
    bitmaps: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"required": self.required, "fully-allocated": self.fully_allocated}
        if self.bitmaps is not None:
            out["bitmaps"] = self.bitmaps
        return out


class MeasureOptionsError(InvalidArgumentError):
    """A -o list the format's option parser refuses: qemu-img adds a second line naming the format."""


def _round_up(n: int, a: int) -> int:
    return -(-n // a) * a


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """Bytes of refcount table and blocks for ``clusters`` clusters, themselves included (a fixed point)."""
    per_table_cluster = cluster_size // 8
    per_block = cluster_size * 8 >> refcount_order
    table = blocks = n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
        if n == last:
            return (blocks + table) * cluster_size


def prealloc_size(total: int, cluster_size: int, refcount_order: int, extended_l2: bool) -> int:
    """The file size of a fully allocated qcow2 image of ``total`` bytes: header, L2, L1, refcounts, data."""
    aligned = _round_up(total, cluster_size)
    l2e = 16 if extended_l2 else 8
    meta = cluster_size
    nl2e = _round_up(aligned // cluster_size, cluster_size // l2e)
    meta += nl2e * l2e
    nl1e = _round_up(nl2e * l2e // cluster_size, cluster_size // 8)
    meta += nl1e * 8
    meta += refcount_metadata_size((meta + aligned) // cluster_size, cluster_size, refcount_order)
    return meta + aligned


def check_output_format(fmt: str) -> None:
    if fmt in _NO_CREATE:
        raise UnsupportedError(f"Format driver '{fmt}' does not support image creation")
    if fmt in _NO_MEASURE:
        raise UnsupportedError(f"Block driver '{fmt}' does not support size measurement")
    if fmt not in ("raw", "qcow2", "luks"):
        if fmt in format_names():
            raise UnsupportedError(f"Block driver '{fmt}' does not support size measurement")
        raise UnsupportedError(f"Unknown file format '{fmt}'")


def parse_measure_options(fmt: str, options: dict[str, str]) -> dict[str, str]:
    """qemu_opts_do_parse against the format's and the file protocol's create options."""
    try:
        parse_options(options, all_options(fmt))
    except InvalidArgumentError as exc:
        raise MeasureOptionsError(f"{exc.message}\nInvalid options for file format '{fmt}'") from None
    return options


@dataclass(slots=True)
class _Qcow2Params:
    cluster_size: int
    version: int
    refcount_order: int
    prealloc: str
    backing: bool
    extended_l2: bool
    luks: int = 0  # bytes of the LUKS header area of an encrypted image


def _qcow2_params(o: dict[str, str]) -> _Qcow2Params:
    """qcow2_measure's option checks, in its order and with its messages."""
    extended_l2 = parse_bool("extended_l2", o["extended_l2"]) if "extended_l2" in o else False
    cs = parse_opt_size("cluster_size", o["cluster_size"]) if "cluster_size" in o else 65536
    if cs & (cs - 1) or not 1 << L.MIN_CLUSTER_BITS <= cs <= 1 << L.MAX_CLUSTER_BITS:
        raise InvalidArgumentError(
            f"Cluster size must be a power of two between {1 << L.MIN_CLUSTER_BITS} and "
            f"{(1 << L.MAX_CLUSTER_BITS) // 1024}k")
    if extended_l2 and cs < 16384:
        raise InvalidArgumentError(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")
    compat = o.get("compat")
    if compat is None or compat == "1.1":
        version = 3
    elif compat == "0.10":
        version = 2
    else:
        raise InvalidArgumentError(f"Invalid compatibility level: '{compat}'")
    rb = parse_number("refcount_bits", o["refcount_bits"]) if "refcount_bits" in o else 16
    if rb == 0 or rb > 64 or rb & (rb - 1):
        raise InvalidArgumentError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and rb != 16:
        raise InvalidArgumentError("Different refcount widths than 16 bits require compatibility level 1.1 "
                                   "or above (use compat=1.1 or greater)")
    prealloc = o.get("preallocation", "off")
    if prealloc not in _PREALLOC:
        raise InvalidArgumentError(f"invalid parameter value: {prealloc}")
    luks = 0
    if o.get("encrypt.format") == "luks":
        # qemu sizes the LUKS header a create with these options would make, in whole clusters
        luks = _round_up(_luks_header_size(o, "encrypt."), cs)
    return _Qcow2Params(cs, version, rb.bit_length() - 1, prealloc, bool(o.get("backing_file")),
                        extended_l2, luks)


def _luks_header_size(options: dict[str, str], prefix: str) -> int:
    """The payload offset of a LUKS volume made with these create options (``prefix``: how their names
    start); the secret must exist, as qemu's header calculation looks it up."""
    from ..crypto import luks
    from ..crypto.secrets import key_secret_of, password

    password(key_secret_of(options, prefix), prefix)
    own = {k.removeprefix(prefix): v for k, v in options.items() if k.startswith(prefix)}
    spec, _hash, _iter = luks.parse_create(own, prefix)
    return luks.payload_offset(spec)


async def _allocated(drv: BlockDriver, cluster_size: int, cancel: asyncio.Event | None,
                     progress: ProgressFn | None) -> int:
    """The bytes of whole clusters holding data anywhere in the chain (qcow2_measure's block-status walk).

    A run of data is counted from the start of the cluster it begins in to the end of the cluster it ends
    in; the walk then resumes at that cluster end, as qemu's loop does with its extended ``pnum``.
    """
    size = drv.size
    required = 0
    pos = 0  # everything below pos has been accounted for
    async for e in drv.extents(0, size):
        check_cancelled(cancel)
        end = e.start + e.length
        if end <= pos:
            continue
        start = max(e.start, pos)
        # qemu counts what block status calls data, allocated and not zero: the holes a qcow2 source's
        # driver reports as zero inside its data clusters (those of an image it takes for
        # metadata-preallocated) are not counted
        if e.data and e.present and not e.zero:
            stop = _round_up(end, cluster_size)
            required += start % cluster_size + (stop - start)
            pos = stop
        else:
            pos = end
        report(progress, min(pos, size), size)
    return required


async def measure(out_fmt: str, options: dict[str, str], *, size: int | None = None,
                  path: str | None = None, fmt: str | None = None, snapshot: str | None = None,
                  opener: ImageOpener | None = None, force_share: bool = False,
                  progress: ProgressFn | None = None, cancel: asyncio.Event | None = None) -> MeasureResult:
    """Measure a new ``out_fmt`` image of ``size`` bytes, or one holding the image at ``path``. Never prints.

    Progress is the source's bytes walked (nothing for a plain size).
    """
    if path is None and (fmt is not None or snapshot is not None):
        raise InvalidArgumentError("--image-opts, -f, and -l require a filename argument.")
    if path is not None and size is not None:
        raise InvalidArgumentError("--size N cannot be used together with a filename.")
    if path is None and size is None:
        raise InvalidArgumentError("Either --size N or one filename must be specified.")
    check_cancelled(cancel)
    drv: BlockDriver | None = None
    exact = opener is None  # the CLI: qemu-img's lock bytes, see _open_raw_shared
    if path is not None:
        if opener is None:
            opener = ImageOpener(lock=True, force_share=force_share)
        elif force_share and not opener.force_share:
            opener = opener.sharing()
        check_image_path(path, read_only=True)
        wanted = snapshot_param(snapshot) if snapshot is not None else None
        try:
            try:
                drv = await opener.open(path, fmt, read_only=True,
                                        options={"snapshot": wanted} if wanted is not None else None)
            except ImageLockedError:
                drv = await _open_raw_shared(opener, path, fmt) if exact and wanted is None else None
                if drv is None:
                    raise
        except SnapshotNotFoundError as exc:
            raise SnapshotNotFoundError(f"Failed to load snapshot: {exc}") from None
        except OperationCancelledError:
            raise
        except BlockError as exc:
            image_open_error(exc, path)
            raise
    try:
        if drv is not None and snapshot is not None:
            require_snapshot_loaded(drv)
        check_output_format(out_fmt)
        options = parse_measure_options(out_fmt, options)
        if out_fmt == "raw":
            if drv is not None:
                required = drv.size
            else:
                given = size if size is not None else 0
                required = _round_up(given, 512)
            report(progress, 1, 1)
            return MeasureResult(required, required)
        if out_fmt == "luks":
            header = _luks_header_size(options, "")
            required = drv.size if drv is not None else size or 0
            report(progress, 1, 1)
            return MeasureResult(header + required, header + required)
        p = _qcow2_params(options)
        cs = p.cluster_size
        virtual = _round_up(size or 0, cs)
        l2e = 16 if p.extended_l2 else 8
        l2_tables = -(-(virtual // cs) // (cs // l2e))
        if l2_tables * 8 > _MAX_L1_BYTES:
            raise InvalidArgumentError("The image size is too large (try using a larger cluster size)")
        required = 0
        bitmaps: int | None = None
        if drv is not None:
            virtual = _round_up(drv.size, cs)
            # With a backing file nothing is known to be shared with the source: count every cluster.
            required = virtual if p.backing else await _allocated(drv, cs, cancel, progress)
            if p.version >= 3 and _qcow2_version(drv) >= 3:
                bitmaps = bitmaps_size(drv, cs)
        if p.prealloc in ("falloc", "full"):
            required = virtual
        full = prealloc_size(virtual, cs, p.refcount_order, p.extended_l2)
        report(progress, 1, 1)
        return MeasureResult(full - virtual + required + p.luks, full + p.luks, bitmaps)
    finally:
        if drv is not None:
            await drv.close()


async def _open_raw_shared(opener: ImageOpener, path: str, fmt: str | None) -> BlockDriver | None:
    """A raw image opened with qemu-img's locks for it: its raw node shares every permission, so qemu-img
    measures a raw disk that a VM writes. None when the image is not raw (its lock error stands)."""
    unlocked = opener.unlocked()
    hf = unlocked.open_file(path, read_only=True)
    try:
        name = unlocked.image_format(hf, fmt, path, read_only=True).name
    finally:
        hf.close()
    if name != "raw":
        return None
    drv = await unlocked.open(path, "raw", read_only=True)
    try:
        held = drv.data_host_file()
        assert held is not None
        lock_image(held.fd, write=False, shared=ALL_PERMS)
    except ImageLockedError as exc:
        await drv.close()
        image_open_error(exc, path)
        exc.hint = f"Is another process using the image [{path}]?"
        raise
    except BaseException:
        await drv.close()
        raise
    return drv


def bitmaps_size(drv: BlockDriver, cluster_size: int) -> int:
    """qcow2_get_persistent_dirty_bitmap_size: room for the source's persistent bitmaps in the new image."""
    if not isinstance(drv, Qcow2Driver):
        return 0
    total = directory = 0
    for bm in drv.bitmaps:
        bits = -(-drv.size // (1 << bm.granularity_bits))
        nbytes = -(-bits // 8)
        clusters = -(-nbytes // cluster_size)
        # the whole bitmap allocated, its table, and its directory entry (no extra data)
        total += clusters * cluster_size + _round_up(clusters * 8, cluster_size)
        directory += _round_up(24 + len(bm.name.encode()), 8)
    return total + _round_up(directory, cluster_size)


def _qcow2_version(drv: BlockDriver) -> int:
    return drv.header.version if isinstance(drv, Qcow2Driver) else 0


def human(res: MeasureResult) -> str:
    text = f"required size: {res.required}\nfully allocated size: {res.fully_allocated}\n"
    if res.bitmaps is not None:
        text += f"bitmaps size: {res.bitmaps}\n"
    return text
