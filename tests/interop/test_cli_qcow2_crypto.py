"""qcow2 with LUKS encryption (read and written) and legacy AES (read) against qemu-img 7.2: the images
each tool makes open in the other with the same secret and read the same; info, map and check as
qemu-img's; no plaintext in the file; qemu-img's refusals."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.peers import imagecore_cmd, peer

SECRET = ["--object", "secret,id=sec0,data=correct horse"]
MiB = 1 << 20
PLAIN = b"PLAINTEXT-MARKER-" * 64


def ours(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*imagecore_cmd(), *map(str, args)], capture_output=True, timeout=120)


def qemu(*args: str | Path, tool: str = "qemu-img") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([peer(tool), *map(str, args)], capture_output=True, timeout=120)


def opts(img: Path, secret: str = "sec0") -> list[str]:
    return ["--image-opts", f"driver=qcow2,file.filename={img},encrypt.key-secret={secret}"]


def qemu_create(img: Path, o: str, size: str = "2M") -> None:
    """qemu-img create, again when LUKS's PBKDF timing fails on a busy machine."""
    for attempt in range(20):
        done = qemu("create", "-q", "-f", "qcow2", *SECRET, "-o", o, img, size)
        if b"Unable to get accurate CPU usage" not in done.stderr:
            break
        time.sleep(0.05 * (attempt + 1))
    assert done.returncode == 0, done.stderr


LUKS = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"
OPTION_SETS = [
    LUKS,
    LUKS + ",encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,cluster_size=4096",
    LUKS + ",compat=0.10,encrypt.hash-alg=sha1,encrypt.ivgen-alg=plain",
]


def same_json(args: list[str | Path]) -> None:
    theirs, mine = qemu(*args), ours(*args)
    assert mine.returncode == theirs.returncode == 0, mine.stderr
    t, m = json.loads(theirs.stdout), json.loads(mine.stdout)
    if isinstance(t, dict):
        t.pop("actual-size", None), m.pop("actual-size", None)
    assert m == t


@pytest.mark.parametrize("o", OPTION_SETS)
def test_qemu_made_image_reads_identical(tmp_path: Path, o: str) -> None:
    img = tmp_path / "q.qcow2"
    qemu_create(img, o)
    w = qemu("--object", SECRET[1], *opts(img), "-c", "write -P 0x5a 4096 65536", "-c",
             "write -P 0x33 1000000 777", "-c", "write -z 1200000 65536", tool="qemu-io")
    assert w.returncode == 0, w.stderr
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    assert qemu("convert", *SECRET, *opts(img), "-O", "raw", a).returncode == 0
    mine = ours("convert", *SECRET, *opts(img), "-O", "raw", b)
    assert mine.returncode == 0, mine.stderr
    assert a.read_bytes() == b.read_bytes()
    same_json(["info", "--output=json", img])
    same_json(["info", "--output=json", *SECRET, *opts(img)])
    same_json(["map", "--output=json", *SECRET, *opts(img)])
    same_json(["check", "--output=json", *SECRET, *opts(img)])
    theirs, mine = qemu("map", *SECRET, *opts(img)), ours("map", *SECRET, *opts(img))
    assert mine.returncode == theirs.returncode == 1
    assert mine.stderr.replace(b"imagecore:", b"qemu-img:") == theirs.stderr


@pytest.mark.parametrize("o", OPTION_SETS[:2])
def test_imagecore_made_image_opens_in_qemu(tmp_path: Path, o: str) -> None:
    src = tmp_path / "src.raw"
    body = PLAIN * 100 + bytes(MiB) + PLAIN * 50
    src.write_bytes(body + bytes(-len(body) % 512))
    img = tmp_path / "ours.qcow2"
    made = ours("convert", *SECRET, "-O", "qcow2", "-o", o, src, img)
    assert made.returncode == 0, made.stderr
    assert b"PLAINTEXT-MARKER" not in img.read_bytes()
    cmp = qemu("compare", *SECRET, *opts(img), "--image-opts", f"driver=raw,file.filename={src}")
    assert cmp.returncode == 0, (cmp.stdout, cmp.stderr)
    check = qemu("check", *SECRET, *opts(img))
    assert check.returncode == 0, check.stdout
    info = json.loads(qemu("info", "--output=json", img).stdout)
    assert info["encrypted"] is True
    enc = info["format-specific"]["data"]["encrypt"]
    assert enc["format"] == "luks" and enc["slots"][0]["active"] is True
    # unaligned writes through imagecore (an NBD export of it), then qemu reads them
    from tests.interop.nbdsrv_fixture import start_server

    srv = start_server(tmp_path / "srv", "--object", SECRET[1], "--image", str(img), "--format", "qcow2",
                       "--key-secret", "sec0", use_pool=False)
    try:
        w = qemu("-f", "raw", srv.unix_uri(""), "-c", "write -P 0x17 1000 3000", "-c",
                 "write -P 0x18 1100000 70000", "-c", "write -z 200000 100000", tool="qemu-io")
        assert w.returncode == 0, (w.stdout, w.stderr, srv.log())
    finally:
        assert srv.stop() == 0, srv.log()
    want = bytearray(src.read_bytes())
    want[1000:4000] = b"\x17" * 3000
    want[1100000:1170000] = b"\x18" * 70000
    want[200000:300000] = bytes(100000)
    out = tmp_path / "out.raw"
    assert qemu("convert", *SECRET, *opts(img), "-O", "raw", out).returncode == 0
    assert out.read_bytes() == bytes(want)
    assert qemu("check", *SECRET, *opts(img)).returncode == 0
    assert b"\x18" * 64 not in img.read_bytes()


def test_create_refusals_as_qemu(tmp_path: Path) -> None:
    for o in ("encrypt.format=luks", "encrypt.key-secret=sec0", "encrypt.format=foo",
              "encrypt.format=luks,encrypt.key-secret=nope",
              "encrypt.format=luks,encrypt.key-secret=sec0,encryption=on", "encryption=on",
              "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=foo",
              "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=abc"):
        theirs = qemu("create", *SECRET, "-f", "qcow2", "-o", o, tmp_path / "a.qcow2", "1M")
        mine = ours("create", *SECRET, "-f", "qcow2", "-o", o, tmp_path / "b.qcow2", "1M")
        assert mine.returncode == theirs.returncode == 1, (o, mine.stderr)
        assert mine.stderr.replace(b"imagecore:", b"qemu-img:").replace(b"b.qcow2", b"a.qcow2") \
            == theirs.stderr, o
        assert mine.stdout.replace(b"b.qcow2", b"a.qcow2") == theirs.stdout, o
    src = tmp_path / "src.raw"
    src.write_bytes(bytes(MiB))
    args: list[str | Path] = ["convert", "-c", *SECRET, "-O", "qcow2", "-o", LUKS, src]
    theirs, mine = qemu(*args, tmp_path / "c1.qcow2"), ours(*args, tmp_path / "c2.qcow2")
    assert mine.returncode == theirs.returncode == 1
    assert mine.stderr.replace(b"imagecore:", b"qemu-img:") == theirs.stderr


def test_wrong_or_missing_secret_as_qemu(tmp_path: Path) -> None:
    img = tmp_path / "q.qcow2"
    qemu_create(img, LUKS)
    wrong = ["--object", "secret,id=sec0,data=wrong"]
    for args in (["convert", "-O", "raw", img, tmp_path / "o.raw"],
                 ["convert", *wrong, *opts(img), "-O", "raw", tmp_path / "o.raw"],
                 ["convert", *SECRET, *opts(img, "other"), "-O", "raw", tmp_path / "o.raw"],
                 ["check", img], ["check", *wrong, *opts(img)], ["map", img]):
        theirs, mine = qemu(*args), ours(*args)
        assert "Traceback" not in mine.stderr.decode()
        assert mine.returncode == theirs.returncode != 0, (args, mine.stderr, theirs.stderr)
        assert mine.stderr.replace(b"imagecore:", b"qemu-img:") == theirs.stderr, args


def test_legacy_aes_read_as_qemu_reads_it(tmp_path: Path) -> None:
    img = tmp_path / "aes.qcow2"
    qemu_create(img, "encryption=on,encrypt.key-secret=sec0")
    w = qemu("--object", SECRET[1], *opts(img), "-c", "write -P 0x61 0 100k", "-c",
             "write -P 0x62 70000 1000", tool="qemu-io")
    assert w.returncode == 0, w.stderr
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    assert qemu("convert", *SECRET, *opts(img), "-O", "raw", a).returncode == 0
    mine = ours("convert", *SECRET, *opts(img), "-O", "raw", b)
    assert mine.returncode == 0, mine.stderr
    assert a.read_bytes() == b.read_bytes()
    assert b"\x61" * 64 not in img.read_bytes()
    same_json(["info", "--output=json", img])
    same_json(["map", "--output=json", *SECRET, *opts(img)])
    # writing is refused, with the reason
    refused = ours("convert", "-n", *SECRET, "--image-opts", f"driver=raw,file.filename={a}",
                   "--target-image-opts", f"driver=qcow2,file.filename={img},encrypt.key-secret=sec0")
    assert refused.returncode == 1 and b"Traceback" not in refused.stderr
    assert b"Legacy qcow2 AES encryption is supported read-only" in refused.stderr
