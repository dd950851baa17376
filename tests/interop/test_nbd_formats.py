"""Formats over the nbd protocol: qcow2 and vmdk images held in NBD exports (qemu-nbd ``-f raw`` of the image
file, and nbdsrv serving a ``.raw`` volume that holds one), read and written by imagecore next to qemu-img
7.2 on copies of the same exports, compared (exit code, stdout, stderr) and checked clean afterwards."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.nbdsrv_fixture import NbdServer, create_image, disk_path, nbdsrv, pool, volid
from tests.interop.test_cli_nbd_urls import QemuNbd, ours, same, start_qemu_nbd
from tests.peers import peer, run

__all__ = ["nbdsrv", "pool"]


def qemu_img(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return run(peer("qemu-img"), *args)


def make_image(path: Path, fmt: str) -> Path:
    create_image(path, fmt, "4M")
    run(peer("qemu-io"), "-f", fmt, "-c", "write -P 0x11 0 128k", "-c", "write -P 0x22 1M 64k",
        "-c", "write -P 0x33 3M 64k", path)
    return path


def served_raw(image: Path, sock: Path) -> QemuNbd:
    """qemu-nbd serving the image file's bytes (``-f raw``), one client at a time as by default."""
    return start_qemu_nbd(image, "raw", sock)


@pytest.fixture
def exports(tmp_path: Path) -> Iterator[dict[str, tuple[QemuNbd, QemuNbd, Path]]]:
    """Per format: two qemu-nbd exports of two copies of one image (one for imagecore, one for qemu-img)
    and a third copy of the image, untouched."""
    out: dict[str, tuple[QemuNbd, QemuNbd, Path]] = {}
    procs: list[QemuNbd] = []
    try:
        for fmt in ("qcow2", "vmdk"):
            orig = make_image(tmp_path / f"orig.{fmt}", fmt)
            a, b = tmp_path / f"a.{fmt}", tmp_path / f"b.{fmt}"
            shutil.copy(orig, a)
            shutil.copy(orig, b)
            sa, sb = served_raw(a, tmp_path / f"a-{fmt}.sock"), served_raw(b, tmp_path / f"b-{fmt}.sock")
            procs += [sa, sb]
            out[fmt] = (sa, sb, orig)
        yield out
    finally:
        for p in procs:
            p.proc.terminate()
            p.proc.wait(10)


def _read_verbs(url: str, orig: Path, fmt: str) -> None:
    for args in (("info",), ("info", "--output=json"), ("info", "-f", fmt), ("map",),
                 ("map", "--output=json"), ("map", "-f", fmt, "--output=json"), ("check",),
                 ("check", "--output=json", "-f", fmt)):
        same(*args, url)
    same("compare", url, orig)
    same("compare", "-f", fmt, "-F", fmt, url, orig)
    same("compare", "-s", url, orig)


def test_read_verbs_over_qemu_nbd(exports: dict[str, tuple[QemuNbd, QemuNbd, Path]]) -> None:
    for fmt, (sa, _sb, orig) in exports.items():
        url = sa.url()
        info = json.loads(same("info", "--output=json", url)[1])
        # probed through the export, as qemu probes it
        assert info["format"] == fmt and info["virtual-size"] == 4 << 20
        _read_verbs(url, orig, fmt)
        opts = (f"driver={fmt},file.driver=nbd,file.server.type=unix,file.server.path={sa.sock},"
                "file.export=exp")
        same("info", "--output=json", "--image-opts", opts)
        same("map", "--output=json", "--image-opts", opts)
        # a format the export does not hold
        other = "vmdk" if fmt == "qcow2" else "qcow2"
        same("info", "-f", other, url)
        same("check", "-f", "raw", url)


def test_read_verbs_over_nbdsrv(nbdsrv: NbdServer, pool: Path) -> None:
    for fmt in ("qcow2", "vmdk"):
        # a .raw volume is served raw: its bytes are the image
        img = make_image(disk_path(pool, f"disk-{fmt}", "raw"), fmt)
        orig = img.parent / f"orig-{fmt}.img"
        shutil.copy(img, orig)
        for url in (nbdsrv.unix_uri(volid(img)), nbdsrv.uri(volid(img))):
            _read_verbs(url, orig, fmt)
        orig.unlink()


def test_convert_and_create_onto_exports(tmp_path: Path) -> None:
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    servers: list[QemuNbd] = []
    try:
        for who in ("ours", "theirs"):
            target = tmp_path / f"{who}.raw"
            target.write_bytes(b"\xa5" * (8 << 20))  # old bytes everywhere
            servers.append(served_raw(target, tmp_path / f"{who}.sock"))
        ua, ub = servers[0].url(), servers[1].url()
        for url, who in ((ua, "ours"), (ub, "theirs")):
            tool = ours if who == "ours" else (lambda *a: subprocess.run([peer("qemu-img"), *map(str, a)],
                                                                         capture_output=True, timeout=60))
            o = tool("convert", "-O", "qcow2", src, url)
            assert o.returncode == 0, o.stderr
            qemu_img("check", url)
            qemu_img("compare", src, url)
        assert qemu_img("map", "--output=json", ua).stdout == qemu_img("map", "--output=json", ub).stdout
        # qcow2 writes through the export: allocation after the image's last cluster, never past the export
        pattern = create_image(tmp_path / "p.raw", "raw", "4M")
        run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x5a 2M 256k", "-c", "write -P 0x6b 0 4k", pattern)
        for url in (ua, ub):
            o = ours("convert", "-n", "-f", "raw", "-O", "qcow2", pattern, url) if url == ua else \
                subprocess.run([peer("qemu-img"), "convert", "-n", "-f", "raw", "-O", "qcow2", str(pattern),
                                url], capture_output=True, timeout=60)
            assert o.returncode == 0, o.stderr
            qemu_img("check", url)
            qemu_img("compare", "-f", "raw", "-F", "qcow2", pattern, url)
        assert json.loads(qemu_img("check", "--output=json", ua).stdout)["image-end-offset"] == \
            json.loads(qemu_img("check", "--output=json", ub).stdout)["image-end-offset"]
        # create over the export: the protocol cannot create, the format writes over it
        args: tuple[str, ...]
        for args in (("create", "-f", "qcow2", ua, "1G"), ("create", "-f", "raw", ua, "16M"),
                     ("create", "-f", "raw", ua, "8M")):
            mine = ours(*args)
            theirs = subprocess.run([peer("qemu-img"), *[a.replace(ua, ub) for a in args]],
                                    capture_output=True, timeout=60)
            assert (mine.returncode, mine.stdout.replace(ua.encode(), ub.encode()),
                    mine.stderr.replace(b"imagecore: ", b"qemu-img: ").replace(ua.encode(), ub.encode())) == \
                (theirs.returncode, theirs.stdout, theirs.stderr), args
        qemu_img("create", "-f", "qcow2", ua, "64M")
        qemu_img("create", "-f", "qcow2", ub, "64M")
        for args in (("resize", "{}", "128M"), ("resize", "-f", "raw", "{}", "16M"),
                     ("resize", "-f", "raw", "{}", "8M"), ("resize", "--shrink", "-f", "raw", "{}", "4M"),
                     ("resize", "-f", "qcow2", "{}", "+1M")):
            mine = ours(*[a.replace("{}", ua) for a in args])
            theirs = subprocess.run([peer("qemu-img"), *[a.replace("{}", ub) for a in args]],
                                    capture_output=True, timeout=60)
            assert (mine.returncode, mine.stdout,
                    mine.stderr.replace(b"imagecore: ", b"qemu-img: ").replace(ua.encode(), ub.encode())) == \
                (theirs.returncode, theirs.stdout, theirs.stderr), args
        qemu_img("check", ua)
        assert json.loads(qemu_img("info", "--output=json", ua).stdout)["virtual-size"] == (129 << 20)
    finally:
        for s in servers:
            s.proc.terminate()
            s.proc.wait(10)


def test_writes_over_nbdsrv(nbdsrv: NbdServer, pool: Path, tmp_path: Path) -> None:
    """A qcow2 and a vmdk in nbdsrv volumes, written by imagecore through the server (vmdk within its
    allocated grains: a new grain would go past the end of the export, which qemu refuses too)."""
    for fmt in ("qcow2", "vmdk"):
        img = make_image(disk_path(pool, f"w-{fmt}", "raw"), fmt)
        if fmt == "qcow2":
            with img.open("r+b") as f:  # room in the export for new clusters
                f.truncate(8 << 20)
        url = nbdsrv.unix_uri(volid(img))
        src = tmp_path / f"src.{fmt}"
        create_image(src, fmt, "4M")
        run(peer("qemu-io"), "-f", fmt, "-c", "write -P 0x44 0 128k", "-c", "write -P 0x55 1M 64k", src)
        if fmt == "qcow2":
            run(peer("qemu-io"), "-f", fmt, "-c", "write -P 0x66 2M 64k", src)
        o = ours("convert", "-n", "-f", fmt, "-O", fmt, src, url)
        assert o.returncode == 0, o.stderr
        qemu_img("check", url)
        qemu_img("compare", "-f", fmt, "-F", fmt, src, url)
        same("check", url)
    # create -f qcow2 onto a volume, then a convert into it
    vol = create_image(disk_path(pool, "new", "raw"), "raw", "8M")
    url = nbdsrv.unix_uri(volid(vol))
    o = ours("create", "-f", "qcow2", url, "4M")
    assert o.returncode == 0, o.stderr
    qemu_img("check", url)
    src = make_image(tmp_path / "s2.qcow2", "qcow2")
    assert ours("convert", "-n", "-O", "qcow2", src, url).returncode == 0
    qemu_img("check", url)
    qemu_img("compare", src, url)


def test_backing_file_of_an_image_in_an_export(tmp_path: Path) -> None:
    """A qcow2 in an export whose backing file is named relative to it: no folder to resolve it in over
    NBD (qemu's 'Cannot generate a base directory for NBD nodes'); an absolute name opens."""
    base = make_image(tmp_path / "base.qcow2", "qcow2")
    rel, absolute = tmp_path / "rel.qcow2", tmp_path / "abs.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", rel)
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", absolute)
    servers = [served_raw(rel, tmp_path / "rel.sock"), served_raw(absolute, tmp_path / "abs.sock")]
    try:
        for srv in servers:
            for args in (("info",), ("info", "--output=json"), ("map", "--output=json"), ("check",),
                         ("resize", "-f", "qcow2"), ("compare", "-f", "qcow2", "-F", "qcow2")):
                extra: tuple[str, ...] = ("8M",) if args[0] == "resize" else \
                    (str(base),) if args[0] == "compare" else ()
                same(*args, srv.url(), *extra)
    finally:
        for s in servers:
            s.proc.terminate()
            s.proc.wait(10)
