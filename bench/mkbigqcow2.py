#!/usr/bin/env python3
"""Write the check/map benchmark image: a qcow2 v3 image whose every guest cluster is allocated.

The default is qemu-img's layout for a 64 GiB image with 64 KiB clusters (header, refcount table, first
refcount block, L1 table), then, as a guest writing the disk front to back would leave it, each L2 table
followed by the 8192 data clusters it maps, and a refcount block wherever the next one is needed: 1048576
distinct data clusters. Each data cluster holds a small pattern (its guest cluster number) in its first
bytes and is otherwise a hole, so the file takes about 4 GiB of disk, not 64. Writing the tables directly
takes seconds where a million qemu-io writes would take hours.

    bench/mkbigqcow2.py PATH [--size-gib 64] [--cluster-bits 16]

`qemu-img check PATH` calls the result clean; `qemu-io -c 'read -P 0 ...'` reads its zeros.
"""

from __future__ import annotations

import argparse
import os
import struct


def build(path: str, size: int, cluster_bits: int) -> None:
    cs = 1 << cluster_bits
    l2_entries = cs // 8
    rb_entries = cs * 8 // 16  # refcount_bits=16
    data_clusters = size // cs
    nb_l2 = -(-data_clusters // l2_entries)
    l1_bytes = nb_l2 * 8
    l1_clusters = max(1, -(-l1_bytes // cs))

    refs: dict[int, int] = {}  # cluster -> refcount (all 1)
    reftable: list[int] = []
    next_free = 0

    def take() -> int:
        nonlocal next_free
        c = next_free
        next_free += 1
        # the refcount block covering c must exist before c is used, as qemu allocates it
        ri = c // rb_entries
        if ri >= len(reftable) or not reftable[ri]:
            reftable.extend([0] * (ri + 1 - len(reftable)))
            blk = next_free
            next_free += 1
            reftable[ri] = blk * cs
            refs[blk] = 1
            if blk // rb_entries != ri:
                raise SystemExit("refcount block outside its own range: use another layout")
        refs[c] = 1
        return c

    # qemu-img create's start: 0 header, 1 refcount table, 2 first refcount block, 3.. L1 table
    rt_c = 1
    refs.update({0: 1, 1: 1, 2: 1})
    reftable.append(2 * cs)
    next_free = 3
    l1_c = next_free
    for k in range(l1_clusters):
        refs[l1_c + k] = 1
    next_free += l1_clusters

    l1 = [0] * nb_l2
    l2_of: list[tuple[int, list[int]]] = []
    for t in range(nb_l2):
        l2c = take()
        entries = []
        for _ in range(min(l2_entries, data_clusters - t * l2_entries)):
            entries.append(take())
        l1[t] = (1 << 63) | (l2c * cs)
        l2_of.append((l2c, entries))

    rt_bytes = len(reftable) * 8
    if rt_bytes > cs:
        raise SystemExit("the refcount table needs more than one cluster: use a smaller image")
    total_clusters = next_free

    with open(path, "wb") as f:
        f.truncate(total_clusters * cs)
        hdr = struct.pack(">IIQIIQIIQQIIQQQQII", 0x514649FB, 3, 0, 0, cluster_bits, size, 0, nb_l2,
                          l1_c * cs, rt_c * cs, 1, 0, 0, 0, 0, 0, 4, 104)
        f.seek(0)
        f.write(hdr + struct.pack(">Q", 0))  # end of header extensions
        f.seek(rt_c * cs)
        f.write(b"".join(struct.pack(">Q", e) for e in reftable))
        for ri, boff in enumerate(reftable):
            base = ri * rb_entries
            vals = [refs.get(base + i, 0) for i in range(rb_entries)]
            f.seek(boff)
            f.write(struct.pack(f">{rb_entries}H", *vals))
        f.seek(l1_c * cs)
        f.write(struct.pack(f">{nb_l2}Q", *l1))
        guest = 0
        for l2c, entries in l2_of:
            f.seek(l2c * cs)
            f.write(struct.pack(f">{len(entries)}Q", *((1 << 63) | (c * cs) for c in entries)))
            for c in entries:
                os.pwrite(f.fileno(), struct.pack(">Q", guest + 1), c * cs)
                guest += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--size-gib", type=int, default=64)
    ap.add_argument("--cluster-bits", type=int, default=16)
    a = ap.parse_args()
    build(a.path, a.size_gib << 30, a.cluster_bits)


if __name__ == "__main__":
    main()
