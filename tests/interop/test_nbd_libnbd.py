"""libnbd clients (nbdinfo, nbdcopy, python nbd as nbdsh uses it) against `nbdsrv serve`.

Options in opt mode, every command and flag, structured replies on and off, and the error paths with
libnbd's own checks switched off (``set_strict_mode(0)``) so that the server's validation answers.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.nbdsrv_fixture import (
    NbdServer,
    create_image,
    disk_path,
    nbdsrv,
    pool,
    volid,
)
from tests.peers import SYSTEM_PYTHON, in_ci, peer, run

__all__ = ["nbdsrv", "pool"]

try:
    import nbd
except ImportError:
    if in_ci():
        raise
    pytest.skip("python nbd (libnbd) is not installed", allow_module_level=True)

MiB = 1024 * 1024


def connect(srv: NbdServer, name: str, *, structured: bool = True, opt_mode: bool = False,
            contexts: tuple[str, ...] = ()) -> nbd.NBD:
    h = nbd.NBD()
    h.set_export_name(name)
    h.set_request_structured_replies(structured)
    for c in contexts:
        h.add_meta_context(c)
    if opt_mode:
        h.set_opt_mode(True)
    h.connect_unix(srv.sock)
    return h


@pytest.fixture
def volumes(pool: Path) -> dict[str, Path]:
    vols = {
        "raw": create_image(disk_path(pool, "disk-0", "raw"), "raw", "4M"),
        "qcow2": create_image(disk_path(pool, "disk-1", "qcow2"), "qcow2", "8M"),
        "base": create_image(disk_path(pool, "disk-2", "qcow2", base=True), "qcow2", "2M"),
        "iso": create_image(pool / "template" / "iso" / "install.iso", "raw", "1M"),
    }
    run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x61 0 1M", vols["raw"])
    return vols


def test_nbdinfo_list_json(nbdsrv: NbdServer, volumes: dict[str, Path]) -> None:
    out = json.loads(run(peer("nbdinfo"), "--list", "--json", f"nbd+unix:///?socket={nbdsrv.sock}").stdout)
    exports = {e["export-name"]: e for e in out["exports"]}
    assert set(exports) == {volid(p) for p in volumes.values()}
    expect = {"raw": (4 * MiB, False), "qcow2": (8 * MiB, False), "base": (2 * MiB, True),
              "iso": (1 * MiB, True)}
    for key, (size, ro) in expect.items():
        e = exports[volid(volumes[key])]
        assert e["export-size"] == size, key
        assert e["is_read_only"] is ro, key
        assert e["can_multi_conn"] is True
    assert exports[volid(volumes["raw"])]["can_trim"] is True
    assert exports[volid(volumes["base"])]["can_trim"] is False
    assert "qemu:allocation-depth" in exports[volid(volumes["qcow2"])]["contexts"]


def test_new_image_appears_in_list_without_restart(nbdsrv: NbdServer, volumes: dict[str, Path],
                                                   pool: Path) -> None:
    h = connect(nbdsrv, "", opt_mode=True)
    names: list[str] = []
    h.opt_list(lambda name, desc: names.append(name) or 0)
    assert "local:100/vm-100-disk-9.raw" not in names
    new = create_image(disk_path(pool, "disk-9", "raw", vmid=105), "raw", "1M")
    names.clear()
    h.opt_list(lambda name, desc: names.append(name) or 0)
    assert volid(new) in names
    h.opt_abort()


def _qemu_runs(img: Path, key: str) -> list[tuple[int, int, int]]:
    # -U: the server may still hold the image for a moment after nbdinfo left.
    entries = json.loads(run(peer("qemu-img"), "map", "-U", "--output=json", "-f", "qcow2", img).stdout)
    out: list[tuple[int, int, int]] = []
    for e in entries:
        if key == "base:allocation":
            t = (0 if e["data"] else 1) | (2 if e["zero"] else 0)
        else:
            t = e["depth"] + 1 if e.get("present", True) else 0
        if out and out[-1][2] == t:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], t)
        else:
            out.append((e["start"], e["length"], t))
    return out


def _nbdinfo_runs(uri: str, ctx: str) -> list[tuple[int, int, int]]:
    arg = "--map" if ctx == "base:allocation" else f"--map={ctx}"
    entries = json.loads(run(peer("nbdinfo"), arg, "--json", uri).stdout)
    out: list[tuple[int, int, int]] = []
    for e in entries:
        if out and out[-1][2] == e["type"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], e["type"])
        else:
            out.append((e["offset"], e["length"], e["type"]))
    return out


@pytest.mark.parametrize("ctx", ["base:allocation", "qemu:allocation-depth"])
def test_nbdinfo_map_matches_qemu_img_map(nbdsrv: NbdServer, pool: Path, ctx: str) -> None:
    base = create_image(disk_path(pool, "disk-0", "qcow2", base=True), "qcow2", "4M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x11 0 512k", "-c", "write -P 0x12 2M 256k", base)
    clone = disk_path(pool, "disk-0", "qcow2", vmid=101)
    create_image(clone, "qcow2", "4M", "-b", "../100/" + base.name, "-F", "qcow2")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x21 256k 512k", "-c", "write -z 3M 64k", clone)
    nbd_runs = _nbdinfo_runs(nbdsrv.unix_uri(volid(clone)), ctx)
    assert nbd_runs == _qemu_runs(clone, ctx)
    assert len(nbd_runs) > 2


def test_option_info_go_and_errors(nbdsrv: NbdServer, volumes: dict[str, Path]) -> None:
    h = connect(nbdsrv, "local:100/missing.raw", opt_mode=True)
    with pytest.raises(nbd.Error):
        h.opt_info()
    for bad in ("local:100/../100/vm-100-disk-0.raw", "/etc/passwd", "local:../../etc/passwd", "nope:1/x"):
        h.set_export_name(bad)
        with pytest.raises(nbd.Error):
            h.opt_info()
    h.set_export_name(volid(volumes["base"]))
    h.opt_info()
    assert h.get_size() == 2 * MiB
    assert h.is_read_only()
    contexts: list[str] = []
    h.opt_list_meta_context(lambda name: contexts.append(name) or 0)
    assert set(contexts) >= {"base:allocation", "qemu:allocation-depth"}
    h.set_export_name(volid(volumes["raw"]))
    h.add_meta_context("base:allocation")
    h.opt_go()
    assert h.get_size() == 4 * MiB
    assert not h.is_read_only()
    assert h.can_meta_context("base:allocation")
    assert h.get_structured_replies_negotiated()
    assert h.get_block_size(nbd.SIZE_MAXIMUM) >= 32 * MiB
    assert h.pread(4, 0) == b"aaaa"
    h.shutdown()


@pytest.mark.parametrize("structured", [True, False])
def test_commands_and_flags(nbdsrv: NbdServer, volumes: dict[str, Path], structured: bool) -> None:
    h = connect(nbdsrv, volid(volumes["raw"]), structured=structured, contexts=("base:allocation",))
    assert h.get_structured_replies_negotiated() is structured
    for can in (h.can_flush, h.can_fua, h.can_trim, h.can_zero, h.can_cache, h.can_multi_conn):
        assert can()
    assert h.pread(MiB, 0) == b"a" * MiB
    h.pwrite(b"\x42" * 65536, 65536, nbd.CMD_FLAG_FUA)
    assert h.pread(65536, 65536) == b"\x42" * 65536
    h.zero(65536, 0, nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(65536, 0) == bytes(65536)
    h.zero(65536, 131072, nbd.CMD_FLAG_FUA)
    assert h.pread(65536, 131072) == bytes(65536)
    if h.can_fast_zero():
        h.zero(65536, 196608, nbd.CMD_FLAG_FAST_ZERO)
        assert h.pread(65536, 196608) == bytes(65536)
    h.trim(65536, 262144)
    h.flush()
    h.cache(MiB, 0)
    if structured:
        chunks: list[tuple[int, int]] = []

        def chunk(buf: bytes, offset: int, status: int, err: list[int]) -> int:
            assert status == nbd.READ_DATA and buf == b"a" * len(buf)
            chunks.append((offset, len(buf)))
            return 0

        h.pread_structured(4096, 512 * 1024, chunk, nbd.CMD_FLAG_DF)
        assert chunks == [(512 * 1024, 4096)]
        # A large read over a sparse image comes back as data and hole chunks.
        image = bytearray(4 * MiB)
        statuses: list[int] = []

        def sparse(buf: bytes, offset: int, status: int, err: list[int]) -> int:
            statuses.append(status)
            image[offset:offset + len(buf)] = buf
            return 0

        h.pread_structured(4 * MiB, 0, sparse)
        assert nbd.READ_HOLE in statuses and nbd.READ_DATA in statuses
        assert bytes(image) == h.pread(4 * MiB, 0)
        assert image[512 * 1024:MiB] == b"a" * (512 * 1024) and image[2 * MiB:] == bytes(2 * MiB)
        seen: list[tuple[int, list[int]]] = []

        def cb(ctx: str, offset: int, entries: list[int], err: list[int]) -> int:
            assert ctx == "base:allocation"
            seen.append((offset, list(entries)))
            return 0

        h.block_status(4 * MiB, 0, cb)
        assert seen and seen[0][0] == 0
        assert sum(seen[0][1][0::2]) <= 4 * MiB
        seen.clear()
        h.block_status(4 * MiB, 0, cb, nbd.CMD_FLAG_REQ_ONE)
        assert len(seen[0][1]) == 2
    h.shutdown()
    assert nbdsrv.alive()


def test_error_paths_with_strict_mode_off(nbdsrv: NbdServer, volumes: dict[str, Path]) -> None:
    h = connect(nbdsrv, volid(volumes["raw"]))
    h.set_strict_mode(0)
    size = 4 * MiB
    with pytest.raises(nbd.Error) as ei:
        h.pread(4096, size - 1024)
    assert ei.value.errnum == errno.EINVAL
    with pytest.raises(nbd.Error) as ei:
        h.pwrite(b"x" * 4096, size)
    assert ei.value.errnum in (errno.EINVAL, errno.ENOSPC)
    with pytest.raises(nbd.Error) as ei:
        h.pread(16, 0, 1 << 9)  # an unknown command flag
    assert ei.value.errnum == errno.EINVAL
    with pytest.raises(nbd.Error) as ei:
        h.trim(4096, size - 1)
    assert ei.value.errnum == errno.EINVAL
    # The connection is still usable after every refusal.
    assert h.pread(4, 0) == b"aaaa"
    h.shutdown()

    ro = connect(nbdsrv, volid(volumes["base"]))
    ro.set_strict_mode(0)
    for op in (lambda: ro.pwrite(b"x" * 512, 0), lambda: ro.zero(512, 0), lambda: ro.trim(512, 0)):
        with pytest.raises(nbd.Error) as ei:
            op()
        assert ei.value.errnum == errno.EPERM
    assert ro.pread(512, 0) == bytes(512)
    ro.shutdown()

    iso = connect(nbdsrv, volid(volumes["iso"]))
    assert iso.is_read_only()
    iso.set_strict_mode(0)
    with pytest.raises(nbd.Error) as ei:
        iso.pwrite(b"x" * 512, 0)
    assert ei.value.errnum == errno.EPERM
    iso.shutdown()


def test_multi_conn_writes_visible_across_connections(nbdsrv: NbdServer, volumes: dict[str, Path]) -> None:
    a = connect(nbdsrv, volid(volumes["qcow2"]))
    b = connect(nbdsrv, volid(volumes["qcow2"]))
    assert a.can_multi_conn() and b.can_multi_conn()
    a.pwrite(b"\x99" * 8192, 1 << 20)
    a.flush()
    assert b.pread(8192, 1 << 20) == b"\x99" * 8192
    a.shutdown()
    b.shutdown()


def _cmp(a: Path, fmt_a: str, b: Path, fmt_b: str) -> None:
    run(peer("qemu-img"), "compare", "-f", fmt_a, "-F", fmt_b, a, b)


@pytest.fixture
def random_raw(tmp_path: Path) -> Iterator[Path]:
    p = tmp_path / "random.raw"
    p.write_bytes(os.urandom(3 * MiB) + bytes(MiB))
    yield p


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_nbdcopy_both_directions_multi_conn(nbdsrv: NbdServer, pool: Path, tmp_path: Path,
                                            random_raw: Path, fmt: str) -> None:
    dst = create_image(disk_path(pool, "disk-3", fmt), fmt, "4M")
    uri = nbdsrv.unix_uri(volid(dst))
    run(peer("nbdcopy"), "--connections=4", "--requests=8", str(random_raw), uri)
    back = tmp_path / "back.raw"
    run(peer("nbdcopy"), "--connections=4", uri, str(back))
    assert back.read_bytes() == random_raw.read_bytes()
    assert nbdsrv.stop() == 0
    _cmp(random_raw, "raw", dst, fmt)
    if fmt == "qcow2":
        run(peer("qemu-img"), "check", dst)


def test_nbdsh_script(nbdsrv: NbdServer, volumes: dict[str, Path]) -> None:
    uri = nbdsrv.unix_uri(volid(volumes["qcow2"]))
    script = (
        "assert h.get_size() == 8 * 1024 * 1024\n"
        "assert h.can_multi_conn() and h.can_flush() and not h.is_read_only()\n"
        "h.pwrite(b'nbdsh' * 1000, 12345)\n"
        "h.flush()\n"
        "assert h.pread(5000, 12345) == b'nbdsh' * 1000\n"
        "h.zero(4096, 12345 + 1000, nbd.CMD_FLAG_FUA)\n"
        "assert h.pread(4096, 12345 + 1000) == bytes(4096)\n"
        "print('nbdsh-ok')\n")
    # nbdsh is a wrapper around `python3 -m nbd`; run that with the system python, which has the nbd
    # module whatever python3 comes first on PATH.
    peer("nbdsh")
    nbdsh = (SYSTEM_PYTHON, "-m", "nbd")
    res = run(*nbdsh, "-u", uri, "-c", script)
    assert b"nbdsh-ok" in res.stdout
    fail = run(*nbdsh, "-u", uri, "-c", "assert h.pread(5, 12345) == b'xxxxx'", check=False)
    assert fail.returncode != 0
