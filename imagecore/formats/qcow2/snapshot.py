"""The qcow2 snapshot table: parsing, encoding and qemu-img info's JSON view of each entry."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from ...errors import ImageFormatError
from ...hostio import HostFile
from . import layout as L

MAX_EXTRA_DATA = 1024  # qemu's QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_TABLE_BYTES = 64 * 1024 * 1024  # qemu's QCOW_MAX_SNAPSHOTS_SIZE
NO_ICOUNT = (1 << 64) - 1
_EXTRA = struct.Struct(">QQQ")


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
    """Sequential reads of an untrusted region, bounded by the file size, in 64 KiB windows."""

    def __init__(self, hf: HostFile, offset: int, file_size: int) -> None:
        self.hf, self.pos, self.file_size = hf, offset, file_size
        self.buf, self.buf_off = b"", offset

    async def read(self, n: int) -> bytes:
        if self.pos + n > self.file_size:
            raise ImageFormatError("Snapshot table entry extends past the end of the file")
        rel = self.pos - self.buf_off
        if rel < 0 or rel + n > len(self.buf):
            want = max(n, 65536)
            self.buf = await self.hf.pread(self.pos, min(want, self.file_size - self.pos))
            self.buf_off, rel = self.pos, 0
        self.pos += n
        return self.buf[rel:rel + n]


async def read_snapshot_table(hf: HostFile, header: L.Header, file_size: int | None = None
                              ) -> SnapshotTable:
    """Parse the snapshot table the header points to; hostile tables raise ImageFormatError."""
    if file_size is None:
        file_size = hf.size()
    n = header.nb_snapshots
    if n == 0:
        return SnapshotTable([], header.snapshots_offset, 0)
    if n > L.MAX_SNAPSHOTS:
        raise ImageFormatError("Too many snapshots")
    if header.snapshots_offset % 8 or header.snapshots_offset == 0 \
            or header.snapshots_offset % header.cluster_size:
        raise ImageFormatError("Invalid snapshot table offset")
    # every entry takes at least 40 bytes: refuse a count the file cannot hold before reading any
    if header.snapshots_offset + 40 * n > file_size:
        raise ImageFormatError("Snapshot table exceeds the end of the file")
    r = _Reader(hf, header.snapshots_offset, file_size)
    snaps: list[Snapshot] = []
    for i in range(n):
        start = r.pos
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, vmclock, vmstate32,
         extra_len) = L.SNAPSHOT_FIXED.unpack(await r.read(L.SNAPSHOT_FIXED.size))
        if extra_len > MAX_EXTRA_DATA:
            raise ImageFormatError(f"Too much extra metadata in snapshot table entry {i}")
        extra = await r.read(extra_len)
        ids = (await r.read(id_len)).decode("utf-8", "replace")
        name = (await r.read(name_len)).decode("utf-8", "replace")
        r.pos += -(r.pos - start) % 8  # the padding after the last entry may lie past the end of the file
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
        if r.pos - header.snapshots_offset > MAX_TABLE_BYTES:
            raise ImageFormatError("Snapshot table is too big")
        snaps.append(Snapshot(ids, name, l1_off, l1_size, dsec, dnsec, vmclock, vm_state, disk_size,
                              icount, bytes(extra)))
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
