"""Broken qcow2 images for the repair tests: each builder makes an image with qemu-img and qemu-io, then
edits its bytes the way a crash, a bug or a hostile writer could. Shared by the CLI and driver tests."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

from tests.peers import peer, run

OFF = 0x00FFFFFFFFFFFE00  # the offset bits of L1, L2 and refcount table entries
COPIED = 1 << 63
COMPRESSED = 1 << 62


def make(path: Path, size: str = "4M", *opts: str, writes: tuple[str, ...] = ("write -P 1 0 256k",)) -> Path:
    args = ["-o", ",".join(opts)] if opts else []
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", *args, path, size)
    if writes:
        qio(path, *writes)
    return path


def qio(path: Path, *cmds: str) -> None:
    args: list[str] = []
    for c in cmds:
        args += ["-c", c]
    run(peer("qemu-io"), "-f", "qcow2", *args, path)


def header(path: Path) -> dict[str, int]:
    d = path.read_bytes()[:112]
    (_m, version, _bfo, _bfs, cbits, size, _c, l1_size, l1_off, rt_off, rt_clusters, nb_snap,
     snap_off) = struct.unpack_from(">IIQIIQIIQQIIQ", d)
    order = struct.unpack_from(">I", d, 96)[0] if version >= 3 else 4
    return {"cluster_bits": cbits, "cs": 1 << cbits, "size": size, "l1_size": l1_size, "l1": l1_off,
            "rt": rt_off, "rt_clusters": rt_clusters, "order": order, "nb_snap": nb_snap,
            "snap": snap_off, "version": version}


def peek(path: Path, offset: int) -> int:
    with path.open("rb") as f:
        f.seek(offset)
        return int(struct.unpack(">Q", f.read(8))[0])


def poke(path: Path, offset: int, value: int, fmt: str = ">Q") -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def l2_entry(path: Path, index: int, l1: int | None = None) -> tuple[int, int]:
    """(file offset of the L2 entry of guest cluster ``index``, its value), in the active L1 table or in
    the L1 table at ``l1``."""
    h = header(path)
    per = h["cs"] // 8
    l1e = peek(path, (h["l1"] if l1 is None else l1) + 8 * (index // per))
    pos = (l1e & OFF) + 8 * (index % per)
    return pos, peek(path, pos)


def refcount_pos(path: Path, cluster: int) -> int:
    """File offset of the 16-bit refcount of ``cluster``."""
    h = header(path)
    assert h["order"] == 4
    per = h["cs"] // 2
    rb = peek(path, h["rt"] + 8 * (cluster // per)) & OFF
    return rb + 2 * (cluster % per)


def set_refcount(path: Path, cluster: int, value: int) -> None:
    poke(path, refcount_pos(path, cluster), value, ">H")


def data_cluster(path: Path, index: int) -> int:
    return (l2_entry(path, index)[1] & OFF) >> header(path)["cluster_bits"]


# -- the damage ----------------------------------------------------------------------------------------

def leak(p: Path) -> None:
    """A refcount too high and a cluster past the data that nothing references."""
    make(p)
    set_refcount(p, 0, 2)
    with p.open("ab") as f:
        f.write(bytes(65536))
    set_refcount(p, p.stat().st_size // 65536 - 1, 1)


def refcount_zero(p: Path) -> None:
    """A data cluster whose refcount is 0: only a rebuild of the refcount structure repairs it."""
    make(p)
    set_refcount(p, data_cluster(p, 1), 0)


def refcount_high(p: Path) -> None:
    make(p)
    set_refcount(p, data_cluster(p, 1), 3)


def refcount_low_snapshot(p: Path) -> None:
    """A cluster shared by a snapshot and the active image with refcount 1: the active L2 entry keeps
    OFLAG_COPIED, so a write would overwrite the snapshot's data in place."""
    make(p)
    run(peer("qemu-img"), "snapshot", "-c", "s", p)
    set_refcount(p, data_cluster(p, 1), 1)


def shared_host_cluster(p: Path) -> None:
    """Two guest clusters name one host cluster (both with OFLAG_COPIED), refcount 1."""
    make(p)
    _pos, e1 = l2_entry(p, 1)
    pos, _e = l2_entry(p, 2)
    poke(p, pos, e1)


def refcount_overflow(p: Path) -> None:
    """refcount_bits=1: two guest clusters naming one host cluster overflow its refcount."""
    make(p, "4M", "refcount_bits=1", "cluster_size=4k")
    _pos, e1 = l2_entry(p, 1)
    pos, _e = l2_entry(p, 40)
    poke(p, pos, e1)


def copied_cleared_l2(p: Path) -> None:
    make(p)
    pos, e = l2_entry(p, 2)
    poke(p, pos, e & ~COPIED)


def copied_cleared_l1(p: Path) -> None:
    make(p)
    h = header(p)
    poke(p, h["l1"], peek(p, h["l1"]) & ~COPIED)


def copied_set_shared(p: Path) -> None:
    """OFLAG_COPIED set on L1 and L2 entries a snapshot shares (refcount 2)."""
    make(p)
    run(peer("qemu-img"), "snapshot", "-c", "s", p)
    h = header(p)
    poke(p, h["l1"], peek(p, h["l1"]) | COPIED)
    pos, e = l2_entry(p, 0)
    poke(p, pos, e | COPIED)


def refblock_unaligned(p: Path) -> None:
    make(p)
    h = header(p)
    poke(p, h["rt"], peek(p, h["rt"]) + 512)


def refblock_on_l1(p: Path) -> None:
    """A refcount table entry naming the L1 table (overlapping metadata)."""
    make(p)
    h = header(p)
    poke(p, h["rt"] + 8, h["l1"])


def refblock_shared(p: Path) -> None:
    """Two refcount table entries naming one refcount block."""
    make(p)
    h = header(p)
    poke(p, h["rt"] + 8, peek(p, h["rt"]))


def refblock_past_end(p: Path) -> None:
    """A second refcount block past the end of the file (a crash before the block was written)."""
    make(p)
    h = header(p)
    poke(p, h["rt"] + 8, (p.stat().st_size + 4 * h["cs"]) & ~(h["cs"] - 1))


def reftable_reserved(p: Path) -> None:
    make(p)
    h = header(p)
    poke(p, h["rt"], peek(p, h["rt"]) | 1)


def l1_unaligned(p: Path) -> None:
    """4 KiB clusters: one L2 table maps 2 MiB, so the image has several L1 entries."""
    make(p, "8M", "cluster_size=4k", writes=("write -P 1 0 256k", "write -P 2 4M 64k"))
    h = header(p)
    poke(p, h["l1"] + 16, peek(p, h["l1"] + 16) + 1024)


def l1_reserved(p: Path) -> None:
    make(p)
    h = header(p)
    poke(p, h["l1"], peek(p, h["l1"]) | 0x100)


def l1_past_end(p: Path) -> None:
    make(p, "8M", "cluster_size=4k", writes=("write -P 1 0 256k", "write -P 2 4M 64k"))
    h = header(p)
    poke(p, h["l1"] + 16, COPIED | (1 << 32))


def l2_unaligned(p: Path) -> None:
    make(p)
    pos, e = l2_entry(p, 1)
    poke(p, pos, e + 512)


def l2_reserved(p: Path) -> None:
    make(p)
    pos, e = l2_entry(p, 1)
    poke(p, pos, e | 2)


def l2_past_end(p: Path) -> None:
    make(p)
    pos, e = l2_entry(p, 2)
    poke(p, pos, (e & ~OFF) | ((p.stat().st_size + (1 << 20)) & ~0xFFFF))


def l2_on_l1(p: Path) -> None:
    make(p)
    pos, e = l2_entry(p, 0)
    poke(p, pos, (e & ~OFF) | header(p)["l1"])


def l2_on_reftable(p: Path) -> None:
    make(p)
    pos, e = l2_entry(p, 3)
    poke(p, pos, (e & ~OFF) | header(p)["rt"])


def zero_unaligned(p: Path) -> None:
    """A preallocated zero cluster whose offset is not cluster aligned: -r all makes it a plain zero
    cluster (fix_l2_entry_by_zero)."""
    make(p, writes=("write -P 1 0 256k", "write -z 64k 64k"))
    pos, e = l2_entry(p, 1)
    assert e & 1
    poke(p, pos, e + 1024)


def snapshot_l1_unaligned(p: Path) -> None:
    make(p)
    run(peer("qemu-img"), "snapshot", "-c", "s", p)
    h = header(p)
    poke(p, h["snap"], peek(p, h["snap"]) + 512)


def snapshot_l1_too_large(p: Path) -> None:
    make(p)
    run(peer("qemu-img"), "snapshot", "-c", "s", p)
    h = header(p)
    poke(p, h["snap"] + 8, 0x2000001, ">I")


def snapshot_l1_entry_bad(p: Path) -> None:
    """A snapshot's L1 entry naming an unaligned L2 table."""
    make(p)
    run(peer("qemu-img"), "snapshot", "-c", "s", p)
    qio(p, "write -P 3 0 64k")
    h = header(p)
    sl1 = peek(p, h["snap"])
    poke(p, sl1, peek(p, sl1) + 512)


def snapshot_l1_past_end(p: Path) -> None:
    make(p)
    run(peer("qemu-img"), "snapshot", "-c", "s", p)
    h = header(p)
    poke(p, h["snap"], (p.stat().st_size + (8 << 20)) & ~0xFFFF)


def snapshot_entry_incomplete(p: Path) -> None:
    """A v3 snapshot entry with 8 bytes of extra data (v3 requires 16): -r all writes the table anew."""
    make(p)
    run(peer("qemu-img"), "snapshot", "-c", "snap1", p)
    off = header(p)["snap"]
    d = p.read_bytes()
    l1o, l1s, idl, nml, ds, dn, vmc, vms, extra = struct.unpack_from(">QIHHIIQII", d, off)
    names = d[off + 40 + extra:off + 40 + extra + idl + nml]
    entry = struct.pack(">QIHHIIQII", l1o, l1s, idl, nml, ds, dn, vmc, vms, 8) + bytes(8) + names
    with p.open("r+b") as f:
        f.seek(off)
        f.write(entry + bytes(-len(entry) % 8 + 64))


def snapshot_table_unaligned(p: Path) -> None:
    make(p)
    run(peer("qemu-img"), "snapshot", "-c", "s", p)
    poke(p, 64, header(p)["snap"] + 8)


def snapshot_table_too_many(p: Path) -> None:
    """70000 snapshots claimed (qemu's limit is 65536): -r all drops the overhanging ones."""
    make(p)
    run(peer("qemu-img"), "snapshot", "-c", "s", p)
    poke(p, 60, 70000, ">I")


def snapshot_table_past_end(p: Path) -> None:
    """The snapshot table past the end of the file: its entry reads as zeroes."""
    make(p)
    run(peer("qemu-img"), "snapshot", "-c", "s", p)
    poke(p, 64, 1 << 40)


def reftable_on_l1(p: Path) -> None:
    """The header's refcount table offset names the L1 table: no refcount block can be read."""
    make(p)
    h = header(p)
    poke(p, 48, h["l1"])


def reftable_two_clusters(p: Path) -> None:
    """The refcount table claims two clusters: the second is a refcount block read as table entries."""
    make(p)
    poke(p, 56, 2, ">I")


def l1_on_reftable(p: Path) -> None:
    make(p)
    poke(p, 40, header(p)["rt"])


def _compressed(p: Path) -> None:
    src = p.with_suffix(".src")
    make(src, "1M", writes=("write -P 7 0 300k",))
    run(peer("qemu-img"), "convert", "-c", "-O", "qcow2", src, p)
    src.unlink()


def compressed_copied(p: Path) -> None:
    _compressed(p)
    pos, e = l2_entry(p, 1)
    assert e & COMPRESSED
    poke(p, pos, e | COPIED)


def compressed_past_end(p: Path) -> None:
    _compressed(p)
    pos, e = l2_entry(p, 1)
    poke(p, pos, (e & ~((1 << 54) - 1)) | (p.stat().st_size + (1 << 20)))


def compressed_on_l1(p: Path) -> None:
    """A compressed cluster whose data would lie in the L1 table."""
    _compressed(p)
    pos, e = l2_entry(p, 2)
    poke(p, pos, (e & ~((1 << 54) - 1)) | (header(p)["l1"] + 100))


def corrupt_bit(p: Path) -> None:
    make(p)
    poke(p, 72, 2)
    set_refcount(p, 0, 2)


def dirty_lazy(p: Path) -> None:
    """A lazy_refcounts image left dirty: refcounts were never written."""
    make(p, "4M", "lazy_refcounts=on", writes=())
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 1 0 512k", "-c", "abort", p, check=False)
    assert p.read_bytes()[79] & 1


def v2_with_zero_flag(p: Path) -> None:
    """A v3 image relabelled v2 that keeps its zero clusters and a dirty bit (v2 has neither)."""
    make(p, writes=("write -P 1 0 256k", "write -z 64k 64k", "write -z 1M 64k"))
    poke(p, 4, 2, ">I")
    poke(p, 72, 1)
    set_refcount(p, 0, 2)


def v2_with_refcount_order(p: Path) -> None:
    """A refcount_bits=8 image relabelled v2: its refcounts read as 16-bit ones."""
    make(p, "4M", "refcount_bits=8")
    poke(p, 4, 2, ">I")


def ext_l2_unaligned(p: Path) -> None:
    """extended_l2: a preallocated zero cluster with a misaligned offset (made a zero cluster by -r all)
    and an allocated one whose bitmap says a subcluster is both allocated and zero."""
    make(p, "4M", "extended_l2=on", writes=("write -P 1 0 256k", "write -z 64k 64k"))
    h = header(p)
    base = peek(p, h["l1"]) & OFF
    poke(p, base + 16 * 1, peek(p, base + 16 * 1) + 512)
    poke(p, base + 16 * 2 + 8, peek(p, base + 16 * 2 + 8) | (1 << 32))


DAMAGE: dict[str, Callable[[Path], None]] = {f.__name__: f for f in (
    leak, refcount_overflow, refcount_zero, refcount_high, refcount_low_snapshot, shared_host_cluster,
    copied_cleared_l2,
    copied_cleared_l1, copied_set_shared, refblock_unaligned, refblock_on_l1, refblock_shared,
    refblock_past_end, reftable_reserved, l1_unaligned, l1_reserved, l1_past_end, l2_unaligned,
    l2_reserved, l2_past_end, l2_on_l1, l2_on_reftable, zero_unaligned, snapshot_l1_unaligned,
    snapshot_l1_too_large, snapshot_l1_entry_bad, snapshot_l1_past_end, snapshot_entry_incomplete,
    compressed_copied,
    compressed_past_end, compressed_on_l1, corrupt_bit, dirty_lazy, v2_with_zero_flag,
    v2_with_refcount_order, ext_l2_unaligned, snapshot_table_unaligned, snapshot_table_too_many,
    snapshot_table_past_end, reftable_on_l1, reftable_two_clusters, l1_on_reftable)}
