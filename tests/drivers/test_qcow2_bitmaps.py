"""Persistent dirty bitmaps as far as imagecore handles them today: `info` lists bitmaps made by qemu-img
exactly as qemu-img does, and a read-write open by nbdsrv invalidates them the way the qcow2 spec provides
(the autoclear bit), so that no backup tool trusts a bitmap that missed writes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from imagecore.formats.qcow2 import bitmaps as B
from tests.interop.nbdsrv_fixture import disk_path, make_pool, start_server, volid
from tests.peers import imagecore_cmd, peer, run


def with_bitmaps(path: Path) -> Path:
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", path, "64M")
    run(peer("qemu-img"), "bitmap", "--add", path, "b0")
    run(peer("qemu-img"), "bitmap", "--add", "-g", "128k", "--disable", path, "second-bitmap")
    run(peer("qemu-img"), "bitmap", "--add", "-g", "512", path, "ünïcode")
    return path


def test_declarations_and_precompiled_structs_agree() -> None:
    raw = bytes(range(1, 25))
    c = B.DIRECTORY_ENTRY.parse(raw)
    assert B.ENTRY_STRUCT.unpack(raw) == (c.bitmap_table_offset, c.bitmap_table_size, c.flags, c.type,
                                          c.granularity_bits, c.name_size, c.extra_data_size)
    e = B.BITMAPS_EXTENSION.parse(raw)
    assert B.EXTENSION_STRUCT.unpack(raw) == (e.nb_bitmaps, e.reserved32, e.bitmap_directory_size,
                                              e.bitmap_directory_offset)
    assert B.DIRECTORY_ENTRY.sizeof() == B.ENTRY_STRUCT.size and B.BITMAPS_EXTENSION.sizeof() == 24


def test_info_lists_bitmaps_as_qemu_img(tmp_path: Path) -> None:
    img = with_bitmaps(tmp_path / "b.qcow2")
    for args in (["--output=json"], []):
        q = run(peer("qemu-img"), "info", *args, img).stdout
        o = subprocess.run([*imagecore_cmd(), "info", *args, str(img)], capture_output=True,
                           check=True).stdout
        drop = (b"disk size:", b'"actual-size"')
        assert [x for x in o.splitlines() if not x.lstrip().startswith(drop)] == \
            [x for x in q.splitlines() if not x.lstrip().startswith(drop)]
    data = json.loads(run(*imagecore_cmd(), "info", "--output=json", img).stdout)["format-specific"]["data"]
    assert [(b["name"], b["granularity"], b["flags"]) for b in data["bitmaps"]] == [
        ("b0", 65536, ["auto"]), ("second-bitmap", 131072, []), ("ünïcode", 512, ["auto"])]


def test_serving_read_write_invalidates_bitmaps_and_read_only_keeps_them(tmp_path: Path) -> None:
    pool = make_pool(tmp_path / "pool")
    rw = with_bitmaps(disk_path(pool, "disk-0", "qcow2"))
    base = with_bitmaps(disk_path(pool, "disk-1", "qcow2", base=True))  # a template: served read-only
    srv = start_server(tmp_path / "srv", pool=pool)
    try:
        run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x11 0 64k", srv.uri(volid(rw)))
        run(peer("qemu-io"), "-r", "-f", "raw", "-c", "read 0 64k", srv.uri(volid(base)))
    finally:
        srv.stop()
    p = subprocess.run([peer("qemu-img"), "info", "--output=json", str(rw)], capture_output=True, text=True)
    assert "bitmaps" not in p.stdout  # qemu no longer offers them for use ...
    assert "all bitmaps are now considered inconsistent" in p.stderr  # ... and says why
    assert "bitmaps" in json.loads(run(peer("qemu-img"), "info", "--output=json", base).stdout)[
        "format-specific"]["data"]
