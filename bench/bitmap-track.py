"""The cost of the dirty-bitmap hook on the write path: DirtyBitmaps.track() per random 4 KiB write over a
64 GiB qcow2 with N bitmaps (64k, 4k, 512 granularity), in-process, without I/O.

    PYTHONPATH=. .venv/bin/python bench/bitmap-track.py [N]      # N = 0, 1, 2 or 3
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import tempfile
import timeit

from imagecore.formats import open_image


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        img = os.path.join(tmp, "track.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "64G"], check=True)
        for i, g in enumerate(["64k", "4k", "512"][:n]):
            subprocess.run(["qemu-img", "bitmap", "--add", "-g", g, img, f"b{i}"], check=True)
        d = await open_image(img, "qcow2", read_only=False)
        t = d.tracking  # type: ignore[attr-defined]
        if t is None:
            each = min(timeit.repeat(lambda: d.tracking is not None, number=10**6, repeat=5))  # type: ignore[attr-defined]
            print(f"0 bitmaps: {each:.3f} us per write (the hook's attribute test)")
            await d.close()
            return
        t.track(0, 4096)
        await t.prepare()  # the in-use flag, once
        rnd = random.Random(1)
        offs = [rnd.randrange(0, (64 << 30) // 4096) * 4096 for _ in range(200_000)]

        def run() -> None:
            track = t.track
            for o in offs:
                track(o, 4096)

        best = min(timeit.repeat(run, number=1, repeat=5))
        print(f"{len(t.active)} bitmaps: {best / len(offs) * 1e6:.3f} us per 4 KiB write "
              f"({t.overlay_bytes / 2**20:.1f} MiB of overlay clusters after {len(offs)} writes)")
        await d.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1))
