"""qemu-img amend for qcow2: the options it takes, their checks, and the in-place changes of a closed image.

The steps and their order are qemu 7.2's ``qcow2_amend_options``: options are read in the order of its
option list (encryption options, compat, the backing file and format, the data file and its raw flag,
lazy refcounts, refcount width), then an upgrade to compat=1.1 happens first, a new refcount width next,
the data-file fields and a header update, the backing-file check (amend never changes it: ``Cannot amend
the backing file``), lazy refcounts, a new virtual size, and a downgrade to compat=0.10 last (so that
what v2 cannot hold has been removed before). A failing step leaves the steps before it done, as in qemu.

Each step leaves the image consistent at every moment, so a crash anywhere costs leaked clusters at
worst:

- the header changes in one write of its whole cluster (``headwrite.write_header``), after everything it
  points to is synced;
- a new refcount width is a new refcount table and new refcount blocks, counted in themselves, written
  and synced in clusters the old structure does not use, before the header switches to them; the old
  ones are then simply no longer counted (qemu frees them the same way);
- a downgrade turns zero clusters into data clusters (v2 has no zero flag): a new cluster is counted
  (refcounts synced) and zeroed (synced) before its L2 entry points to it; zero clusters of an image
  without a backing file just become unallocated, as qemu makes them. Where qemu would zero a host
  cluster in place that something else still references (a snapshot's data under an allocated zero
  cluster), a fresh cluster is used instead, and the old reference is dropped only after the L2 table
  no longer holds it.

Progress is reported through qemu's amend status callback, as qemu's helper combines it over several
operations (the numbers qemu-img's meter prints from).
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ... import progname
from ...crypto.luks import KEYSLOT_OPTIONS
from ...driver import CreateOption
from ...errors import BlockError, ImageFormatError, InvalidArgumentError, UnsupportedError
from ...hostio import HostFile
from ...qemuopts import parse_bool, parse_number, parse_options
from ...units import parse_option_size as parse_size
from . import layout as L
from .alloc import Refcounts
from .headwrite import read_header_image, write_header
from .snapshot import Snapshot, encode_snapshot_table, read_snapshot_table
from .spec import CREATE_OPTIONS
from .tables import (
    ClusterType,
    classify,
    decode_table,
    encode_table,
    pack_refcounts,
    unpack_refcounts,
)

# qemu_opts_print_help lists them sorted, as `qemu-img amend -o help` shows them
AMEND_OPTIONS: tuple[CreateOption, ...] = (
    CreateOption("backing_file", "string", "File name of a base image"),
    CreateOption("backing_fmt", "string", "Image format of the base image"),
    CreateOption("compat", "string", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    CreateOption("data_file", "string", "File name of an external data file"),
    CreateOption("data_file_raw", "bool", "The external data file must stay valid as a raw image"),
    # the LUKS key slot options, prefixed (they sort together there)
    *(CreateOption(f"encrypt.{o.name}", o.type, o.help) for o in KEYSLOT_OPTIONS),
    CreateOption("lazy_refcounts", "bool", "Postpone refcount updates"),
    CreateOption("refcount_bits", "number", "Width of a reference count entry in bits"),
    CreateOption("size", "size", "Virtual disk size"),
)
_AMEND_NAMES = frozenset(o.name for o in AMEND_OPTIONS)
# the order qemu's qcow2_amend_options visits them (its option list's order), which decides which error
# of several is reported
_VISIT_ORDER = ("encrypt.state", "encrypt.keyslot", "encrypt.old-secret", "encrypt.new-secret",
                "encrypt.iter-time", "size", "compat", "backing_file", "backing_fmt", "data_file",
                "data_file_raw", "lazy_refcounts", "refcount_bits")

StatusFn = Callable[[int, int], None]


class AmendError(BlockError):
    """An amendment qemu refuses, in its words; ``hint`` is the line qemu prints after some of them."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


# -- options --------------------------------------------------------------------------------------------

def _parse_number(name: str, text: str) -> int:
    """A QemuOpts number, then the int the amend code keeps (qemu assigns the uint64 to an int)."""
    v = parse_number(name, text)
    return (v + (1 << 31)) % (1 << 32) - (1 << 31)


def _parse_with(pairs: list[tuple[str, str | None]], table: Sequence[CreateOption]) -> dict[str, str]:
    parse_options(pairs, table)  # qemu's refusal of the first bad pair
    return {key: "on" if value is None else value for key, value in pairs}


def parse_amend_options(pairs: list[tuple[str, str | None]]) -> dict[str, str]:
    """The ``-o`` pairs as qemu_opts_do_parse reads them against the amend options (the last of a name
    wins); an error names the first bad pair, with qemu-img's hint when it is a creation-only option."""
    try:
        return _parse_with(pairs, AMEND_OPTIONS)
    except InvalidArgumentError as exc:
        try:
            _parse_with(pairs, (*AMEND_OPTIONS, *(o for o in CREATE_OPTIONS if o.name not in _AMEND_NAMES)))
        except InvalidArgumentError:
            raise exc from None
        raise AmendError(str(exc), "This option is only supported for image creation") from None


@dataclass(slots=True)
class AmendPlan:
    """What the options ask for, read in qemu's order with its early refusals."""

    new_version: int
    size: int = 0
    backing_file: str | None = None
    backing_fmt: str | None = None
    backing_given: bool = False
    data_file: str | None = None
    data_file_raw: bool = False
    lazy_refcounts: bool = False
    refcount_bits: int = 16


def plan_amend(h: L.Header, opts: dict[str, str]) -> AmendPlan:
    has_data_file = bool(h.incompatible_features & L.INCOMPAT_DATA_FILE)
    raw = bool(h.autoclear_features & L.AUTOCLEAR_DATA_FILE_RAW)
    plan = AmendPlan(new_version=h.version, data_file_raw=raw,
                     lazy_refcounts=bool(h.compatible_features & L.COMPAT_LAZY_REFCOUNTS),
                     refcount_bits=h.refcount_bits)
    for name in _VISIT_ORDER:
        if name not in opts:
            continue
        value = opts[name]
        if name.startswith("encrypt."):
            if not h.crypt_method:
                raise AmendError("Can't amend encryption options - encryption not present")
            if h.crypt_method != L.CRYPT_LUKS:
                raise UnsupportedError("Only LUKS encryption options can be amended")
            continue  # the LUKS key slots: amend_qcow2 hands them to formats/luks/amend.py
        if name == "compat":
            if value in ("0.10", "v2"):
                plan.new_version = 2
            elif value in ("1.1", "v3"):
                plan.new_version = 3
            else:
                raise AmendError(f"Unknown compatibility level {value}")
        elif name == "size":
            plan.size = parse_size("size", value)
        elif name == "backing_file":
            plan.backing_file, plan.backing_given = value, True
        elif name == "backing_fmt":
            plan.backing_fmt, plan.backing_given = value, True
        elif name == "lazy_refcounts":
            plan.lazy_refcounts = parse_bool(name, value)
        elif name == "refcount_bits":
            bits = _parse_number(name, value)
            if bits <= 0 or bits > 64 or bits & (bits - 1):
                raise AmendError("Refcount width must be a power of two and may not exceed 64 bits")
            plan.refcount_bits = bits
        elif name == "data_file":
            if not has_data_file:
                raise AmendError("data-file can only be set for images that use an external data file")
            plan.data_file = value
        elif name == "data_file_raw":
            plan.data_file_raw = parse_bool(name, value)
            if plan.data_file_raw and not raw:
                raise AmendError("data-file-raw cannot be set on existing images")
    return plan


# -- progress -------------------------------------------------------------------------------------------

class _Progress:
    """qemu's Qcow2AmendHelperCBInfo: one status callback over several operations, each reporting its
    own (offset, work size), turned into overall numbers with a projection for the operations to come."""

    def __init__(self, cb: StatusFn | None, total_operations: int) -> None:
        self.cb = cb
        self.total = total_operations
        self.last: str | None = None
        self.offset_completed = 0
        self.operations_completed = 0
        self.last_work = 0

    def status(self, operation: str) -> StatusFn:
        def report(offset: int, work: int) -> None:
            if self.cb is None:
                return
            if operation != self.last:
                if self.last is not None:
                    self.offset_completed += self.last_work
                    self.operations_completed += 1
                self.last = operation
            self.last_work = work
            current = self.offset_completed + work
            projected = current * (self.total - self.operations_completed - 1) \
                // (self.operations_completed + 1)
            self.cb(self.offset_completed + offset, current + projected)
        return report


# -- the amendment --------------------------------------------------------------------------------------

async def amend_qcow2(hf: HostFile, opts: dict[str, str], *, has_backing: bool,
                      status: StatusFn | None = None, key_secret: str | None = None,
                      force: bool = False) -> None:
    """Amend the closed qcow2 image in ``hf`` (opened read-write, locked, clean) as qemu-img amend does.
    ``key_secret`` unlocks a LUKS-encrypted image whose key slots the ``encrypt.*`` options change;
    ``force`` is qemu-img's ``--force`` for them."""
    img = await read_header_image(hf)
    h = img.header
    plan = plan_amend(h, opts)
    old_version = h.version
    changes_width = plan.refcount_bits != h.refcount_bits
    progress = _Progress(status, (plan.new_version != old_version) + changes_width)

    if plan.new_version > old_version:
        await _upgrade(hf, progress.status("upgrade"))
    slots = [(k.removeprefix("encrypt."), v) for k, v in opts.items() if k.startswith("encrypt.")]
    if slots:
        # after an upgrade and before a refcount change, where qemu amends them
        from ..luks.amend import amend_luks, parse_amend_options
        from .crypto import crypto_extension

        await amend_luks(hf, key_secret, parse_amend_options(slots), force=force, area=crypto_extension(h))
    if changes_width:
        if plan.new_version < 3 and plan.refcount_bits != 16:
            raise AmendError("Refcount widths other than 16 bits require compatibility level 1.1 or above "
                             "(use compat=1.1 or greater)")
        await change_refcount_order(hf, plan.refcount_bits.bit_length() - 1,
                                    progress.status("refcount order"))
    img = await read_header_image(hf)
    h = img.header
    if h.version >= 3:
        if plan.data_file_raw:
            h.autoclear_features |= L.AUTOCLEAR_DATA_FILE_RAW
        else:
            h.autoclear_features &= ~L.AUTOCLEAR_DATA_FILE_RAW
    if plan.data_file is not None:
        # an empty name drops the extension and keeps the feature bit, as qemu does: the image then
        # needs its data file named when it is opened
        h.set_extension(L.EXT_DATA_FILE, plan.data_file.encode("utf-8", "surrogateescape")
                        if plan.data_file else None)
    await write_header(hf, img)
    if plan.backing_given and (plan.backing_file != h.backing_file or plan.backing_fmt != h.backing_format):
        raise AmendError("Cannot amend the backing file", f"You can use '{progname.name()} rebase' instead.")
    lazy = bool(h.compatible_features & L.COMPAT_LAZY_REFCOUNTS)
    if lazy != plan.lazy_refcounts:
        if plan.lazy_refcounts and plan.new_version < 3:
            raise AmendError("Lazy refcounts only supported with compatibility level 1.1 and above "
                             "(use compat=1.1 or greater)")
        img = await read_header_image(hf)
        if img.header.version >= 3:
            if plan.lazy_refcounts:
                img.header.compatible_features |= L.COMPAT_LAZY_REFCOUNTS
            else:
                _require_clean(img.header)
                img.header.compatible_features &= ~L.COMPAT_LAZY_REFCOUNTS
            await write_header(hf, img)
    if plan.size:
        from .resize import resize

        await resize(hf, plan.size)
    if plan.new_version < old_version:
        await _downgrade(hf, has_backing, progress.status("downgrade"))


def _require_clean(h: L.Header) -> None:
    # the image was opened read-write before amending, which repairs a dirty one (as qemu marks it clean)
    if h.incompatible_features & L.INCOMPAT_DIRTY:
        raise AmendError("Failed to make the image clean: Input/output error")


# -- compat=1.1 -----------------------------------------------------------------------------------------

async def _upgrade(hf: HostFile, status: StatusFn) -> None:
    status(0, 2)
    img = await read_header_image(hf)
    h = img.header
    table = await read_snapshot_table(hf, h)
    # v3 snapshots carry the 64-bit VM state size and the disk size: a v2 table without them is rewritten
    if any(len(s.extra_data) < 16 for s in table.snapshots):
        for s in table.snapshots:
            if s.disk_size is None:
                s.disk_size = h.size
        await rewrite_snapshot_table(hf, h, table.snapshots, table.offset, table.size)
    status(1, 2)
    img = await read_header_image(hf)
    h = img.header
    h.version = 3
    h.refcount_order = 4
    h.compression_type = L.COMPRESSION_ZLIB
    h.incompatible_features = h.compatible_features = h.autoclear_features = 0
    img.unknown_fields = b""
    await write_header(hf, img)
    status(2, 2)


async def rewrite_snapshot_table(hf: HostFile, h: L.Header, snaps: list[Snapshot], old_offset: int,
                                 old_size: int) -> None:
    """Write ``snaps`` as a new table in new clusters, point the header at it, then free the old one."""
    rc = await Refcounts.offline(hf, h)
    data = encode_snapshot_table(snaps)
    new = await rc.allocate(-(-len(data) // h.cluster_size)) if snaps else 0
    await rc.commit()
    if snaps:
        await hf.pwrite(new, data)
    await hf.fdatasync()
    # nb_snapshots and snapshots_offset, together in the header's first sector
    await hf.pwrite(60, struct.pack(">IQ", len(snaps), new))
    await hf.fdatasync()
    if old_size:
        await rc.change_bytes(old_offset, old_size, -1)
        await rc.commit()


# -- compat=0.10 ----------------------------------------------------------------------------------------

async def _downgrade(hf: HostFile, has_backing: bool, status: StatusFn) -> None:
    img = await read_header_image(hf)
    h = img.header
    if h.refcount_order != 4:
        raise AmendError("compat=0.10 requires refcount_bits=16")
    if h.incompatible_features & L.INCOMPAT_DATA_FILE:
        raise AmendError("Cannot downgrade an image with a data file")
    table = await read_snapshot_table(hf, h)
    for s in table.snapshots:
        disk = h.size if s.disk_size is None else s.disk_size
        if s.vm_state_size > 0xFFFFFFFF or disk != h.size:
            raise AmendError("Internal snapshots prevent downgrade of image")
    _require_clean(h)
    other = h.incompatible_features & ~L.INCOMPAT_COMPRESSION
    if other:
        raise AmendError(f"Cannot downgrade an image with incompatible features {other:#x} set")
    await _expand_zero_clusters(hf, h, table.snapshots, has_backing, status)
    if h.incompatible_features & L.INCOMPAT_COMPRESSION:
        if await _has_compressed(hf, h, table.snapshots):
            raise AmendError("Cannot downgrade an image with zstd compression type and existing compressed "
                             "clusters")
    img = await read_header_image(hf)
    h = img.header
    h.version = 2
    h.incompatible_features = h.compatible_features = h.autoclear_features = 0
    h.compression_type = L.COMPRESSION_ZLIB
    h.refcount_order = 4
    img.unknown_fields = b""
    await write_header(hf, img)


async def _read_l1(hf: HostFile, offset: int, size: int) -> list[int]:
    if size * 8 > L.MAX_L1_BYTES:
        raise ImageFormatError("L1 table is too large")
    if not size:
        return []
    return list(decode_table(await hf.pread(offset, size * 8)))


async def _expand_zero_clusters(hf: HostFile, h: L.Header, snaps: list[Snapshot], has_backing: bool,
                                status: StatusFn) -> None:
    """Make every zero cluster of the active image and of the snapshots a v2 cluster (qemu's
    qcow2_expand_zero_clusters): unallocated without a backing file, else a data cluster of zeroes."""
    cs = h.cluster_size
    tables = [await _read_l1(hf, h.l1_table_offset, h.l1_size)]
    for s in snaps:
        tables.append(await _read_l1(hf, s.l1_table_offset, s.l1_size))
    total = sum(len(t) for t in tables)
    visited = 0
    rc = await Refcounts.offline(hf, h)
    for l1 in tables:
        for entry in l1:
            l2_off = entry & L.L1E_OFFSET_MASK
            if l2_off:
                if l2_off % cs:
                    raise ImageFormatError(f"L2 table offset {l2_off:#x} unaligned")
                await _expand_table(hf, rc, cs, l2_off, has_backing)
            visited += 1
            status(visited, total)


async def _expand_table(hf: HostFile, rc: Refcounts, cs: int, l2_off: int, has_backing: bool) -> None:
    l2 = decode_table(await hf.pread(l2_off, cs))
    l2_refs = await rc.get(l2_off)
    fresh: list[tuple[int, int]] = []  # (L2 index, host cluster to zero)
    drop: list[tuple[int, int]] = []  # (old host cluster, references to drop once the table is written)
    changed = False
    for j, e in enumerate(l2):
        kind, host = classify(e, True)
        if kind not in (ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC):
            continue
        if not host and not has_backing:
            l2[j] = 0
            changed = True
            continue
        if host and host % cs:
            raise ImageFormatError(f"Cluster allocation offset {host:#x} unaligned (L2 offset: {l2_off:#x}, "
                                   f"L2 index: {j:#x})")
        if host and await rc.get(host) == l2_refs:
            fresh.append((j, host))  # only this table holds it: zeroed in place, as qemu does
            continue
        new = await rc.allocate(1)
        if l2_refs > 1:
            await rc.change(new, l2_refs - 1)
        fresh.append((j, new))
        if host:
            drop.append((host, l2_refs))
    if not fresh and not changed:
        return
    if fresh:
        await rc.write_dirty()
        await hf.fdatasync()  # the new clusters are counted before anything points to them
        for _j, host in fresh:
            await _zero_cluster(hf, host, cs)
        await hf.fdatasync()
    for j, host in fresh:
        l2[j] = host | L.L2E_COPIED if l2_refs == 1 else host
    await hf.pwrite(l2_off, encode_table(l2))
    await hf.fdatasync()
    if drop:
        for host, n in drop:
            await rc.change(host, -n)
        await rc.commit()


async def _zero_cluster(hf: HostFile, host: int, cs: int) -> None:
    try:
        await hf.zero_range(host, cs)
    except UnsupportedError:
        await hf.write_zeroes_slow(host, cs)


async def _has_compressed(hf: HostFile, h: L.Header, snaps: list[Snapshot]) -> bool:
    """Whether any L2 table reachable from the active image or a snapshot holds a compressed cluster
    (qemu looks at the active image only; a snapshot's zstd clusters would be unreadable as v2 too)."""
    tables = [await _read_l1(hf, h.l1_table_offset, h.l1_size)]
    for s in snaps:
        tables.append(await _read_l1(hf, s.l1_table_offset, s.l1_size))
    seen: set[int] = set()
    for l1 in tables:
        for entry in l1:
            l2_off = entry & L.L1E_OFFSET_MASK
            if not l2_off or l2_off in seen:
                continue
            seen.add(l2_off)
            l2 = decode_table(await hf.pread(l2_off, h.cluster_size))
            if any(classify(e, True)[0] == ClusterType.COMPRESSED for e in l2 if e):
                return True
    return False


# -- refcount width -------------------------------------------------------------------------------------

async def change_refcount_order(hf: HostFile, new_order: int, status: StatusFn) -> None:
    """Rebuild the refcount structure with entries ``1 << new_order`` bits wide (qemu's
    qcow2_change_refcount_order), crash-safe: see the module's docstring."""
    img = await read_header_image(hf)
    h = img.header
    cs = h.cluster_size
    old_order = h.refcount_order
    rc = await Refcounts.offline(hf, h)
    old_per = cs * 8 >> old_order
    new_per = cs * 8 >> new_order
    reftable_entries = h.refcount_table_clusters * cs // 8
    # every refcount, by cluster index
    counts = array("Q")
    old_structures: list[int] = list(range(h.refcount_table_offset // cs,
                                           h.refcount_table_offset // cs + h.refcount_table_clusters))
    for index, entry in enumerate(rc.reftable):
        boff = entry & L.REFT_OFFSET_MASK
        if not boff:
            continue
        blk, _ = await rc.block_for(index * old_per * cs)
        assert blk is not None
        values = unpack_refcounts(bytes(blk), old_order)
        if len(counts) < index * old_per:
            counts.extend([0] * (index * old_per - len(counts)))
        counts[index * old_per:index * old_per + len(values)] = values
        old_structures.append(boff // cs)
    limit = (1 << (1 << new_order)) - 1
    for c in range(len(counts)) if max(counts, default=0) > limit else ():
        v = counts[c]
        if v > limit:
            raise AmendError(f"Cannot decrease refcount entry width to {1 << new_order} bits: Cluster at "
                             f"offset {c * cs:#x} has a refcount of {v}")

    # allocation as qemu's walks do it: first-fit in clusters the old structure leaves free
    free_index = 0

    def count(c: int) -> int:
        return counts[c] if c < len(counts) else 0

    def alloc(n: int) -> int:
        nonlocal free_index
        while True:
            start = free_index
            ok = True
            for _ in range(n):
                c = free_index
                free_index += 1
                if count(c):
                    ok = False
                    break
            if ok:
                break
        if len(counts) < start + n:
            counts.extend([0] * (start + n - len(counts)))
        for c in range(start, start + n):
            counts[c] = 1
        return start

    per_table_cluster = cs // 8
    new_table: list[int] = []
    table_at: int | None = None
    table_clusters = 0
    walks = 0
    while True:
        allocated = False
        b = 0
        while b * new_per < len(counts):
            lo, hi = b * new_per, min((b + 1) * new_per, len(counts))
            if any(counts[lo:hi]) and (b >= len(new_table) or not new_table[b]):
                if b >= len(new_table):
                    new_table.extend([0] * (-(-(b + 1) // per_table_cluster) * per_table_cluster
                                            - len(new_table)))
                new_table[b] = alloc(1)
                allocated = True
            b += 1
        walks += 1
        _walk_status(status, walks - 1, max(walks + 1, 3), reftable_entries)
        if not allocated:
            break
        if table_at is not None:
            for c in range(table_at, table_at + table_clusters):
                counts[c] = 0
            free_index = min(free_index, table_at)
        table_clusters = len(new_table) * 8 // cs
        table_at = alloc(table_clusters)
    assert table_at is not None
    # the write walk
    _walk_status(status, walks, walks + 1, reftable_entries)
    # the old structure is no longer counted once the header points to the new one
    for c in old_structures:
        counts[c] = 0
    for b, cluster in enumerate(new_table):
        if not cluster:
            continue
        values = counts[b * new_per:(b + 1) * new_per]
        await hf.pwrite(cluster * cs, pack_refcounts(values, new_order, cs))
    table = array("Q", [c * cs for c in new_table])
    await hf.pwrite(table_at * cs, encode_table(table))
    img = await read_header_image(hf)
    h = img.header
    h.refcount_order = new_order
    h.refcount_table_offset = table_at * cs
    h.refcount_table_clusters = table_clusters
    await write_header(hf, img)


def _walk_status(status: StatusFn, walk: int, walks: int, entries: int) -> None:
    """The status qemu reports while one walk over the old refcount table visits its entries, and once
    more when the walk is over."""
    for i in range(entries + 1):
        status(walk * entries + i, walks * entries)
