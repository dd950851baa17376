"""The qcow2 snapshot table: parsing, encoding, qemu-img info's JSON view, and offline -c/-l/-d/-a."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from ...errors import (
    ImageFormatError,
    InvalidArgumentError,
    NotFoundError,
    UnsupportedError,
)
from ...hostio import HostFile
from . import layout as L
from .alloc import Refcounts
from .headio import read_header
from .tables import ClusterType, classify, classify_extended, referenced_clusters

MAX_EXTRA_DATA = 1024  # qemu's QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_TABLE_BYTES = 64 * 1024 * 1024  # qemu's QCOW_MAX_SNAPSHOTS_SIZE
NO_ICOUNT = (1 << 64) - 1
_EXTRA = struct.Struct(">QQQ")
_NB_SNAPSHOTS_OFFSET = 60  # nb_snapshots (u32), then snapshots_offset (u64)


@dataclass(slots=True)
class Snapshot:
    """One snapshot table entry. ``vm_state_size`` is the 64-bit size when the extra data has it."""

    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None = None
    icount: int | None = None
    extra_data: bytes = b""

    @property
    def vm_clock_sec(self) -> int:
        return self.vm_clock_nsec // 1_000_000_000

    @property
    def vm_clock_subsec_nsec(self) -> int:
        return self.vm_clock_nsec % 1_000_000_000

    def encode(self) -> bytes:
        """The on-disk entry, padded to 8 bytes; the extra data always carries disk size and icount."""
        extra = bytearray(self.extra_data[24:] if len(self.extra_data) > 24 else b"")
        icount = NO_ICOUNT if self.icount is None else self.icount
        extra = bytearray(_EXTRA.pack(self.vm_state_size, self.disk_size or 0, icount)) + extra
        ids, name = self.id.encode(), self.name.encode()
        vm32 = self.vm_state_size if self.vm_state_size < 1 << 32 else 0
        out = L.SNAPSHOT_FIXED.pack(self.l1_table_offset, self.l1_size, len(ids), len(name),
                                    self.date_sec, self.date_nsec, self.vm_clock_nsec, vm32,
                                    len(extra)) + bytes(extra) + ids + name
        return out + bytes(-len(out) % 8)


@dataclass(slots=True)
class SnapshotTable:
    snapshots: list[Snapshot]
    offset: int
    size: int  # bytes the table occupies on disk, as qemu's s->snapshots_size


class _Reader:
    """Sequential reads of an untrusted region in 64 KiB windows: bounded by the file size, or (with
    ``past_end``) reading zeroes past its end, as qemu's reads do."""

    def __init__(self, hf: HostFile, offset: int, file_size: int, past_end: bool = False) -> None:
        self.hf, self.pos, self.file_size, self.past_end = hf, offset, file_size, past_end
        self.buf, self.buf_off = b"", offset

    async def read(self, n: int) -> bytes:
        if self.pos + n > self.file_size and not self.past_end:
            raise ImageFormatError("Snapshot table entry extends past the end of the file")
        rel = self.pos - self.buf_off
        if rel < 0 or rel + n > len(self.buf):
            want = max(n, 65536)
            if not self.past_end:
                want = min(want, self.file_size - self.pos)
            self.buf = await self.hf.pread(self.pos, want)
            self.buf_off, rel = self.pos, 0
        self.pos += n
        return self.buf[rel:rel + n]


def _c_string(raw: bytes) -> str:
    """A snapshot id or name as qemu keeps it: a C string, ending at the first NUL."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


async def read_snapshot_table(hf: HostFile, header: L.Header, file_size: int | None = None, *,
                              past_end: bool = False) -> SnapshotTable:
    """Parse the snapshot table the header points to, as qemu's qcow2_read_snapshots does (its refusals in
    its words, with its hints); other hostile tables raise ImageFormatError.

    The header's count and offset were checked when it was parsed. ``past_end``: a table past the end of
    the file reads as zeroes, as in qemu (for a read-only open); otherwise it is refused.
    """
    if file_size is None:
        file_size = hf.size()
    n = header.nb_snapshots
    if n == 0:
        return SnapshotTable([], header.snapshots_offset, 0)
    if n > L.MAX_SNAPSHOTS:
        raise ImageFormatError("Snapshot table too large")
    if header.snapshots_offset % header.cluster_size:
        raise ImageFormatError("Snapshot table offset invalid")
    # every entry takes at least 40 bytes: refuse a count the file cannot hold before reading any
    if header.snapshots_offset + 40 * n > file_size and not past_end:
        raise ImageFormatError("Snapshot table exceeds the end of the file")
    r = _Reader(hf, header.snapshots_offset, file_size, past_end)
    snaps: list[Snapshot] = []
    table_length = 0
    for i in range(n):
        table_length += -table_length % 8
        r.pos += -(r.pos - header.snapshots_offset) % 8  # the entries are 8-byte aligned
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, vmclock, vmstate32,
         extra_len) = L.SNAPSHOT_FIXED.unpack(await r.read(L.SNAPSHOT_FIXED.size))
        if extra_len > MAX_EXTRA_DATA:
            exc = ImageFormatError(f"Too much extra metadata in snapshot table entry {i}")
            exc.hint = "You can force-remove this extra metadata with qemu-img check -r all"
            raise exc
        extra = await r.read(extra_len)
        ids = _c_string(await r.read(id_len))
        name = _c_string(await r.read(name_len))
        table_length += L.SNAPSHOT_FIXED.size + extra_len + id_len + name_len
        vm_state = vmstate32
        disk_size: int | None = None
        icount: int | None = None
        if extra_len >= 8:
            vm_state = struct.unpack_from(">Q", extra, 0)[0]
        if extra_len >= 16:
            disk_size = struct.unpack_from(">Q", extra, 8)[0]
        if extra_len >= 24:
            ic = struct.unpack_from(">Q", extra, 16)[0]
            icount = None if ic == NO_ICOUNT else ic
        if table_length > MAX_TABLE_BYTES or r.pos - header.snapshots_offset > L.INT_MAX:
            exc = ImageFormatError("Snapshot table is too big")
            exc.hint = f"You can force-remove all {n - i} overhanging snapshots with qemu-img check -r all"
            raise exc
        snaps.append(Snapshot(ids, name, l1_off, l1_size, dsec, dnsec, vmclock, vm_state, disk_size,
                              icount, bytes(extra)))
    r.pos += -(r.pos - header.snapshots_offset) % 8  # the padding after the last entry
    return SnapshotTable(snaps, header.snapshots_offset, r.pos - header.snapshots_offset)


def encode_snapshot_table(snaps: list[Snapshot]) -> bytes:
    return b"".join(s.encode() for s in snaps)


def snapshot_info_json(s: Snapshot) -> dict[str, Any]:
    """One element of qemu-img info's ``snapshots`` list."""
    out: dict[str, Any] = {}
    if s.icount is not None:
        out["icount"] = s.icount
    out.update({
        "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
        "name": s.name,
        "date-sec": s.date_sec,
        "date-nsec": s.date_nsec,
        "vm-clock-sec": s.vm_clock_nsec // 1_000_000_000,
        "id": s.id,
        "vm-state-size": s.vm_state_size,
    })
    return out


# -- offline snapshot operations (imagecore snapshot -c/-d/-a) ------------------------------------------

# what qemu-img says of each action on an image with an external data file (qcow2's snapshot functions
# return -ENOTSUP, each action's caller words it its own way; delete looks for the snapshot first)
_DATA_FILE_REFUSALS = {
    "create": "-95 (Operation not supported)",
    "apply": "Failed to load snapshot: Operation not supported",
    "delete": "Snapshots are not supported with an external data file",
}


def _refuse_data_file(h: L.Header, action: str) -> None:
    if h.incompatible_features & L.INCOMPAT_DATA_FILE:
        raise UnsupportedError(_DATA_FILE_REFUSALS[action])


async def _open_for_snapshots(hf: HostFile, action: str | None) -> tuple[L.Header, SnapshotTable, Refcounts]:
    """Header, snapshot table and refcounts of an image about to change; with ``action``, an image with an
    external data file is refused here, else the caller refuses it where qemu does."""
    size = hf.size()
    h = await read_header(hf)
    if action is not None:
        _refuse_data_file(h, action)
    if h.incompatible_features & (L.INCOMPAT_DIRTY | L.INCOMPAT_CORRUPT):
        raise ImageFormatError("The image is dirty or corrupt; run 'check -r all' on it first")
    table = await read_snapshot_table(hf, h, size)
    return h, table, await Refcounts.offline(hf, h)


async def _read_l1(hf: HostFile, offset: int, size: int) -> list[int]:
    if size * 8 > L.MAX_L1_BYTES:
        raise ImageFormatError("L1 table is too large")
    return list(struct.unpack(f">{size}Q", await hf.pread(offset, size * 8))) if size else []


async def _update_refcounts(hf: HostFile, h: L.Header, rc: Refcounts, l1: list[int],
                            delta: int) -> None:
    """Add ``delta`` to the refcount of every L2 table and data cluster ``l1`` references."""
    step = 2 if h.extended_l2 else 1
    cs = h.cluster_size
    for e1 in l1:
        l2_off = e1 & L.L1E_OFFSET_MASK
        if not l2_off:
            continue
        words = struct.unpack(f">{h.l2_entries * step}Q", await hf.pread(l2_off, h.l2_entries * 8 * step))
        for j in range(h.l2_entries):
            first, count = referenced_clusters(words[j * step], h.cluster_bits)
            for k in range(count):
                await rc.change(first + k * cs, delta)
        await rc.change(l2_off, delta)


async def _fix_copied(hf: HostFile, h: L.Header, rc: Refcounts, l1: list[int]) -> list[int]:
    """Set OFLAG_COPIED on the active tables exactly where the refcount is 1; returns the new L1."""
    step = 2 if h.extended_l2 else 1
    out = []
    for e1 in l1:
        l2_off = e1 & L.L1E_OFFSET_MASK
        if not l2_off:
            out.append(e1)
            continue
        count = await rc.get(l2_off)
        out.append(e1 | L.L1E_COPIED if count == 1 else e1 & ~L.L1E_COPIED)
        words = list(struct.unpack(f">{h.l2_entries * step}Q",
                                   await hf.pread(l2_off, h.l2_entries * 8 * step)))
        changed = False
        for j in range(h.l2_entries):
            e = words[j * step]
            kind, host = classify_extended(e, words[j * step + 1]) if step == 2 \
                else classify(e, h.version >= 3)
            if kind not in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
                continue  # COPIED is about the one host cluster an entry owns: compressed ones share theirs
            want = e | L.L2E_COPIED if await rc.get(host) == 1 else e & ~L.L2E_COPIED
            if want != e:
                words[j * step] = want
                changed = True
        if changed:
            await hf.pwrite(l2_off, struct.pack(f">{len(words)}Q", *words))
    return out


async def _write_table_and_header(hf: HostFile, h: L.Header, table: SnapshotTable,
                                  snaps: list[Snapshot], rc: Refcounts) -> None:
    """The new table is counted and written (and synced) before the header points to it, and the old one
    is freed only once the header no longer does: a crash leaks a table at worst."""
    data = encode_snapshot_table(snaps)
    new_off = await rc.allocate(-(-len(data) // h.cluster_size)) if snaps else 0
    await rc.commit()
    if snaps:
        await hf.pwrite(new_off, data)
    await hf.fdatasync()
    h.nb_snapshots, h.snapshots_offset = len(snaps), new_off
    await _write_header_fields(hf, h)
    if table.size:
        await rc.change_bytes(table.offset, table.size, -1)
        await rc.commit()


async def _write_header_fields(hf: HostFile, h: L.Header) -> None:
    # nb_snapshots and snapshots_offset only: the refcount engine writes the refcount table's fields
    await hf.pwrite(_NB_SNAPSHOTS_OFFSET, struct.pack(">IQ", h.nb_snapshots, h.snapshots_offset))
    await hf.fdatasync()


async def snapshot_list(hf: HostFile) -> list[Snapshot]:
    """The snapshots of the qcow2 image open as ``hf``, in table order."""
    size = hf.size()
    h = await read_header(hf)
    return (await read_snapshot_table(hf, h, size, past_end=hf.read_only)).snapshots


async def snapshot_create(hf: HostFile, name: str, *, date_sec: int | None = None,
                          date_nsec: int | None = None) -> Snapshot:
    """Take an internal snapshot of the active image (qemu-img snapshot -c)."""
    import time

    h, table, rc = await _open_for_snapshots(hf, "create")
    if len(table.snapshots) >= L.MAX_SNAPSHOTS:
        raise UnsupportedError("Too many snapshots")
    if len(name.encode()) > 0xFFFF:
        raise InvalidArgumentError("Snapshot name is too long")
    now = time.time_ns()
    ids = [int(s.id) for s in table.snapshots if s.id.isdigit()]
    l1 = await _read_l1(hf, h.l1_table_offset, h.l1_size)
    l1_copy = await rc.allocate(-(-len(l1) * 8 // h.cluster_size)) if l1 else 0
    await _update_refcounts(hf, h, rc, l1, +1)
    sn = Snapshot(id=str(max(ids, default=0) + 1), name=name, l1_table_offset=l1_copy, l1_size=len(l1),
                  date_sec=now // 1_000_000_000 if date_sec is None else date_sec,
                  date_nsec=now % 1_000_000_000 if date_nsec is None else date_nsec,
                  vm_clock_nsec=0, vm_state_size=0, disk_size=h.size, icount=0)
    await rc.commit()
    if l1:
        await hf.pwrite(l1_copy, struct.pack(f">{len(l1)}Q", *l1))
    new_l1 = await _fix_copied(hf, h, rc, l1)
    if l1:
        await hf.pwrite(h.l1_table_offset, struct.pack(f">{len(new_l1)}Q", *new_l1))
    await _write_table_and_header(hf, h, table, [*table.snapshots, sn], rc)
    return sn


def _find(snaps: list[Snapshot], key: str, by_id: bool) -> int:
    if by_id:
        for i, s in enumerate(snaps):
            if s.id == key:
                return i
    for i, s in enumerate(snaps):
        if s.name == key:
            return i
    return -1


async def snapshot_delete(hf: HostFile, name: str) -> None:
    """Delete the first snapshot called ``name`` (qemu-img snapshot -d matches names only)."""
    h, table, rc = await _open_for_snapshots(hf, None)
    i = _find(table.snapshots, name, False)
    if i < 0:
        raise NotFoundError("snapshot not found")
    _refuse_data_file(h, "delete")
    sn = table.snapshots[i]
    snaps = table.snapshots[:i] + table.snapshots[i + 1:]
    # drop the entry first: a crash afterwards leaks clusters but never leaves a dangling snapshot
    await _write_table_and_header(hf, h, table, snaps, rc)
    table = SnapshotTable(snaps, h.snapshots_offset, len(encode_snapshot_table(snaps)))
    l1 = await _read_l1(hf, sn.l1_table_offset, sn.l1_size)
    await _update_refcounts(hf, h, rc, l1, -1)
    if sn.l1_size:
        await rc.change_bytes(sn.l1_table_offset, sn.l1_size * 8, -1)
    # the refcounts drop (on disk) before any COPIED flag claims refcount 1, as qemu orders its caches
    await rc.commit()
    active = await _read_l1(hf, h.l1_table_offset, h.l1_size)
    new_l1 = await _fix_copied(hf, h, rc, active)
    if new_l1 != active:
        await hf.pwrite(h.l1_table_offset, struct.pack(f">{len(new_l1)}Q", *new_l1))
    await _write_header_fields(hf, h)


async def snapshot_apply(hf: HostFile, name: str) -> None:
    """Revert the active image to a snapshot, found by id first, then by name (qemu-img snapshot -a)."""
    h, table, rc = await _open_for_snapshots(hf, None)
    from .bitmaps import read_directory

    if await read_directory(hf, h):
        # qemu refuses, before it looks for the snapshot: reverting changes the guest's data behind every
        # bitmap's back
        raise UnsupportedError("Device has active dirty bitmaps")
    _refuse_data_file(h, "apply")
    i = _find(table.snapshots, name, True)
    if i < 0:
        raise NotFoundError("Failed to load snapshot: No such file or directory")
    sn = table.snapshots[i]
    if sn.disk_size is not None and sn.disk_size != h.size:
        raise UnsupportedError("Reverting to a snapshot of a different disk size is not supported")
    if sn.l1_size > h.l1_size:
        raise UnsupportedError("Reverting to a snapshot with a larger L1 table is not supported")
    snap_l1 = await _read_l1(hf, sn.l1_table_offset, sn.l1_size)
    old = await _read_l1(hf, h.l1_table_offset, h.l1_size)
    await _update_refcounts(hf, h, rc, snap_l1, +1)
    await rc.commit()
    new = snap_l1 + [0] * (h.l1_size - len(snap_l1))
    new = [e & ~L.L1E_COPIED for e in new]
    await hf.pwrite(h.l1_table_offset, struct.pack(f">{len(new)}Q", *new))
    await hf.fdatasync()
    await _update_refcounts(hf, h, rc, old, -1)
    await rc.commit()  # before any COPIED flag claims refcount 1
    new = await _fix_copied(hf, h, rc, new)
    await hf.pwrite(h.l1_table_offset, struct.pack(f">{len(new)}Q", *new))
    await _write_header_fields(hf, h)
