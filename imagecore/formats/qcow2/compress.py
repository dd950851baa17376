"""Compressing guest clusters for qcow2 in batches, as plain functions that a worker process can run.

``convert -c`` compresses a whole run of clusters per task (in a process or thread pool) and hands the
results to ``Qcow2Driver.write_compressed_clusters``. The codec settings are qemu's (qcow2-threads.c):
raw deflate with a 4 KiB window and memLevel 9 at the default level, or a zstd frame at zstd's default
level. A cluster whose compressed form is not smaller than a cluster is None: qemu writes it plainly.
This module imports nothing of imagecore, so a worker process starts quickly.
"""

from __future__ import annotations

import threading
import zlib

ZLIB, ZSTD = "zlib", "zstd"
# a ZstdCompressor must not be shared between threads: one per thread (and so one per process)
_local = threading.local()


def deflate(raw: bytes | memoryview, ctype: str) -> bytes:
    """One cluster (zero-padded by the caller when short) compressed with ``ctype``."""
    if ctype == ZSTD:
        comp = getattr(_local, "zstd", None)
        if comp is None:
            import zstandard

            comp = _local.zstd = zstandard.ZstdCompressor()
        out: bytes = comp.compress(raw)
        return out
    c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
    return c.compress(raw) + c.flush()


def compress_clusters(data: bytes | bytearray | memoryview, cluster_size: int, ctype: str
                      ) -> list[bytes | None]:
    """Compress ``data`` cluster by cluster; a short last cluster is padded with zeroes, as qemu pads the
    image's last cluster. None marks a cluster that does not compress below ``cluster_size`` bytes."""
    mv = memoryview(data).cast("B")
    out: list[bytes | None] = []
    for pos in range(0, len(mv), cluster_size):
        raw = mv[pos:pos + cluster_size]
        if len(raw) < cluster_size:
            raw = memoryview(bytes(raw) + bytes(cluster_size - len(raw)))
        packed = deflate(raw, ctype)
        out.append(packed if len(packed) < cluster_size else None)
    return out
