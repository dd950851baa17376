"""QEMU's own NBD client (qemu-img, qemu-io; 7.2 and 10 with extended headers) against `nbdsrv serve`."""

from __future__ import annotations

import json
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
from tests.peers import peer, qemu10, run

__all__ = ["nbdsrv", "pool"]

FORMATS = ["raw", "qcow2"]


def fill(path: Path, fmt: str) -> None:
    """Some data, a zeroed run and a hole, written by qemu-io into the file itself."""
    run(peer("qemu-io"), "-f", fmt, "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 1M 128k",
        "-c", "write -z 2M 64k", path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_qemu_img_info_url_and_unix(nbdsrv: NbdServer, pool: Path, fmt: str) -> None:
    img = create_image(disk_path(pool, "disk-0", fmt), fmt, "4M")
    name = volid(img)
    for uri in (nbdsrv.uri(name), nbdsrv.unix_uri(name), nbdsrv.qemu_json(name)):
        info = json.loads(run(peer("qemu-img"), "info", "--output=json", uri).stdout)
        assert info["virtual-size"] == 4 * 1024 * 1024, uri
        assert info["format"] in ("raw", "nbd")
    opts = (f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={nbdsrv.port},"
            f"export={name.replace(',', ',,')}")
    info = json.loads(run(peer("qemu-img"), "info", "--output=json", "--image-opts", opts).stdout)
    assert info["virtual-size"] == 4 * 1024 * 1024
    missing = run(peer("qemu-img"), "info", nbdsrv.uri("local:100/vm-100-nope.raw"), check=False)
    assert missing.returncode != 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_both_directions_and_compare(nbdsrv: NbdServer, pool: Path, tmp_path: Path, fmt: str) -> None:
    img = create_image(disk_path(pool, "disk-0", fmt), fmt, "4M")
    fill(img, fmt)
    uri = nbdsrv.uri(volid(img))
    out = tmp_path / "out.raw"
    run(peer("qemu-img"), "convert", "-f", "raw", "-O", "raw", uri, out)
    # The server may still hold the image for a moment after the client left: look at it with -U.
    run(peer("qemu-img"), "compare", "-U", "-f", fmt, "-F", "raw", img, out)
    # The image is open read-write in the server, so qemu-img may only look at it with -U.
    run(peer("qemu-img"), "compare", "-U", "-f", "raw", "-F", fmt, uri, img)

    # And back in: a new pattern into a second export over the unix socket, then compared with the source.
    src = tmp_path / "src.raw"
    create_image(src, "raw", "4M")
    run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x5a 512k 1M", "-c", "write -P 0xa5 3M 4k", src)
    dst = create_image(disk_path(pool, "disk-1", fmt), fmt, "4M")
    run(peer("qemu-img"), "convert", "-n", "-f", "raw", "-O", "raw", src, nbdsrv.unix_uri(volid(dst)))
    run(peer("qemu-img"), "compare", "-f", "raw", "-F", "raw", src, nbdsrv.uri(volid(dst)))
    assert nbdsrv.stop() == 0
    run(peer("qemu-img"), "compare", "-f", "raw", "-F", fmt, src, dst)
    if fmt == "qcow2":
        run(peer("qemu-img"), "check", dst)


@pytest.mark.parametrize("fmt", FORMATS)
def test_qemu_io_write_zero_discard_read(nbdsrv: NbdServer, pool: Path, fmt: str) -> None:
    img = create_image(disk_path(pool, "disk-0", fmt), fmt, "4M")
    uri = nbdsrv.uri(volid(img))
    run(peer("qemu-io"), "-f", "raw",
        "-c", "write -P 0xab 0 256k",
        "-c", "write -P 0xcd 1M 64k",
        "-c", "write -z 64k 64k",
        "-c", "discard 128k 64k",
        "-c", "write -P 0xef 3M 512",
        "-c", "flush", uri)
    res = run(peer("qemu-io"), "-f", "raw",
              "-c", "read -P 0xab 0 64k",
              "-c", "read -P 0 64k 128k",
              "-c", "read -P 0xab 192k 64k",
              "-c", "read -P 0xcd 1M 64k",
              "-c", "read -P 0 2M 512k",
              "-c", "read -P 0xef 3M 512", uri)
    assert b"Pattern verification failed" not in res.stdout, res.stdout
    # A wrong expectation must fail, so the checks above are real.
    bad = run(peer("qemu-io"), "-f", "raw", "-c", "read -P 0xab 64k 4k", uri, check=False)
    assert b"Pattern verification failed" in bad.stdout
    assert nbdsrv.stop() == 0
    res = run(peer("qemu-io"), "-f", fmt, "-c", "read -P 0xab 0 64k", "-c", "read -P 0 64k 128k",
              "-c", "read -P 0xcd 1M 64k", "-c", "read -P 0xef 3M 512", img)
    assert b"Pattern verification failed" not in res.stdout
    if fmt == "qcow2":
        chk = json.loads(run(peer("qemu-img"), "check", "--output=json", img).stdout)
        assert chk.get("corruptions", 0) == 0 and chk.get("leaks", 0) == 0 and chk["check-errors"] == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_qemu10_extended_headers(nbdsrv: NbdServer, pool: Path, fmt: str) -> None:
    qio = qemu10("qemu-io")
    qimg = qemu10("qemu-img")
    img = create_image(disk_path(pool, "disk-0", fmt), fmt, "4M")
    uri = nbdsrv.uri(volid(img))
    run(qio, "-f", "raw", "-c", "write -P 0x77 4k 1M", "-c", "write -z 2M 64k", "-c", "discard 3M 64k", uri)
    res = run(qio, "-f", "raw", "-c", "read -P 0x77 4k 1M", "-c", "read -P 0 0 4k", "-c", "read -P 0 2M 1M",
              uri)
    assert b"Pattern verification failed" not in res.stdout
    mapped = json.loads(run(qimg, "map", "--output=json", "-f", "raw", uri).stdout)
    assert sum(e["length"] for e in mapped) == 4 * 1024 * 1024
    assert any(e["data"] for e in mapped)
    assert "extended=True" in nbdsrv.log()


def test_qemu_img_map_over_nbd_matches_file(nbdsrv: NbdServer, pool: Path) -> None:
    img = create_image(disk_path(pool, "disk-0", "qcow2"), "qcow2", "4M")
    fill(img, "qcow2")
    local = json.loads(run(peer("qemu-img"), "map", "--output=json", "-f", "qcow2", img).stdout)
    remote = json.loads(run(peer("qemu-img"), "map", "--output=json", "-f", "raw",
                            nbdsrv.uri(volid(img))).stdout)

    def runs(entries: list[dict[str, object]]) -> list[tuple[int, int, bool, bool]]:
        out: list[tuple[int, int, bool, bool]] = []
        for e in entries:
            start, length = int(e["start"]), int(e["length"])  # type: ignore[call-overload]
            data, zero = bool(e["data"]), bool(e["zero"])
            if out and out[-1][2:] == (data, zero):
                out[-1] = (out[-1][0], out[-1][1] + length, data, zero)
            else:
                out.append((start, length, data, zero))
        return out

    assert runs(remote) == runs(local)


def test_qemu_img_map_over_nbd_of_a_fragmented_raw_file(nbdsrv: NbdServer, pool: Path) -> None:
    """QEMU asks block status one run at a time (NBD_CMD_FLAG_REQ_ONE): over a raw file of 2,048 runs its
    map through nbdsrv is the file's own, and nbdinfo's (many runs per request) agrees with it."""
    img = disk_path(pool, "disk-0", "raw")
    runs = 1024
    with open(img, "wb") as f:
        f.truncate(runs * 65536)
        for i in range(runs):
            f.seek(i * 65536)
            f.write(bytes([i % 255 + 1]) * 4096)
    local = json.loads(run(peer("qemu-img"), "map", "--output=json", "-f", "raw", img).stdout)
    uri = nbdsrv.uri(volid(img))
    remote = json.loads(run(peer("qemu-img"), "map", "--output=json", "-f", "raw", uri).stdout)
    strip = [(e["start"], e["length"], e["data"], e["zero"]) for e in local]
    assert [(e["start"], e["length"], e["data"], e["zero"]) for e in remote] == strip
    assert len(strip) == 2 * runs
    listed = run(peer("nbdinfo"), "--map", uri).stdout.decode().split("\n")
    seen = [(int(f[0]), int(f[1]), int(f[2]) & 1 == 0) for f in (ln.split() for ln in listed) if len(f) >= 3]
    assert seen == [(start, length, data) for start, length, data, _zero in strip]


def test_vmdk_export_reads_like_the_file(nbdsrv: NbdServer, pool: Path, tmp_path: Path) -> None:
    img = create_image(disk_path(pool, "disk-0", "vmdk"), "vmdk", "4M")
    run(peer("qemu-io"), "-f", "vmdk", "-c", "write -P 0x3c 64k 128k", "-c", "write -P 0x3d 3M 4k", img)
    uri = nbdsrv.uri(volid(img))
    info = json.loads(run(peer("qemu-img"), "info", "--output=json", uri).stdout)
    assert info["virtual-size"] == 4 * 1024 * 1024
    run(peer("qemu-img"), "compare", "-U", "-f", "raw", "-F", "vmdk", uri, img)
    res = run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x3e 1M 64k", "-c", "read -P 0x3e 1M 64k", uri)
    assert b"Pattern verification failed" not in res.stdout
    assert nbdsrv.stop() == 0
    res = run(peer("qemu-io"), "-f", "vmdk", "-c", "read -P 0x3e 1M 64k", "-c", "read -P 0x3c 64k 128k", img)
    assert b"Pattern verification failed" not in res.stdout
    run(peer("qemu-img"), "check", img)
