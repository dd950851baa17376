"""qed and qcow (version 1) against qemu-img 7.2: create with each option set (the same Formatting line and
the same bytes), info/map/check JSON on images qemu-img made, convert both ways (and ``convert -c -O
qcow``), backing chains across formats, damaged and hostile images with qemu's one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tests.peers import imagecore_cmd, peer, run


def ours(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run([*imagecore_cmd(), *map(str, args)], capture_output=True, timeout=120, cwd=cwd,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])))
    assert b"Traceback" not in proc.stderr, proc.stderr.decode()
    return proc


def qemu(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([peer("qemu-img"), *map(str, args)], capture_output=True, timeout=120, cwd=cwd)


def qio(img: Path, fmt: str, *cmds: str) -> None:
    args: list[str] = []
    for c in cmds:
        args += ["-c", c]
    run(peer("qemu-io"), "-f", fmt, *args, img)


def same(cwd: Path, *args: str | Path) -> subprocess.CompletedProcess[bytes]:
    """The same exit code, stdout and stderr (program name aside) from both tools."""
    q, o = qemu(*args, cwd=cwd), ours(*args, cwd=cwd)
    assert o.returncode == q.returncode, (args, o.stderr, q.stderr)
    assert o.stdout == q.stdout, (args, o.stdout.decode(), q.stdout.decode())
    assert o.stderr.decode().replace("imagecore:", "qemu-img:") == q.stderr.decode(), (args, o.stderr)
    return q


def to_raw(cwd: Path, img: str) -> None:
    """Both tools read ``img`` to the same raw bytes."""
    run(peer("qemu-img"), "convert", "-O", "raw", cwd / img, cwd / "q.raw")
    o = ours("convert", "-O", "raw", img, "o.raw", cwd=cwd)
    assert o.returncode == 0, o.stderr
    assert (cwd / "q.raw").read_bytes() == (cwd / "o.raw").read_bytes()


CREATE_CASES = [
    ("qed", []),
    ("qed", ["-o", "cluster_size=4k"]),
    ("qed", ["-o", "cluster_size=1M,table_size=2"]),
    ("qed", ["-o", "table_size=16"]),
    ("qed", ["-o", "table_size=1"]),        # qemu 7.2 makes it and then cannot open it; neither can we
    ("qed", ["-o", "table_size=3"]),
    ("qed", ["-o", "cluster_size=1k"]),
    ("qed", ["-b", "base.raw", "-F", "raw"]),
    ("qed", ["-b", "base.qcow2", "-F", "qcow2", "-o", "cluster_size=8k"]),
    ("qcow", []),
    ("qcow", ["-b", "base.raw", "-F", "raw"]),
    ("qcow", ["-b", "base.qcow2", "-F", "qcow2"]),
    ("qcow", ["-o", "encryption=on"]),
]


@pytest.mark.parametrize(("fmt", "extra"), CREATE_CASES)
def test_create_matches_qemu_img(tmp_path: Path, fmt: str, extra: list[str]) -> None:
    run(peer("qemu-img"), "create", "-q", "-f", "raw", tmp_path / "base.raw", "3M")
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", tmp_path / "base.qcow2", "5M")
    sizes = ["1000", "5M"] if "-b" not in extra else []
    for size in sizes or [""]:
        args = ["create", "-f", fmt, *extra, "img", *([size] if size else [])]
        q = qemu(*args, cwd=tmp_path)
        theirs = (tmp_path / "img").read_bytes() if q.returncode == 0 else None
        (tmp_path / "img").unlink(missing_ok=True)
        same(tmp_path, *args)
        if theirs is not None:
            assert (tmp_path / "img").read_bytes() == theirs
            same(tmp_path, "info", "--output=json", "img")
            same(tmp_path, "map", "--output=json", "img")
            same(tmp_path, "check", "img")
        (tmp_path / "img").unlink(missing_ok=True)


def test_create_option_help_and_refusals(tmp_path: Path) -> None:
    for fmt in ("qed", "qcow"):
        same(tmp_path, "create", "-f", fmt, "-o", "help")
        same(tmp_path, "create", "-f", fmt, "-o", "help", "x")
    same(tmp_path, "create", "-f", "qcow", "x", "0")
    same(tmp_path, "create", "-f", "qed", "-o", "cluster_size=1M,table_size=16", "x", "2P")


def _qed_with_data(cwd: Path, name: str = "d.qed", opts: str = "cluster_size=64k") -> Path:
    img = cwd / name
    run(peer("qemu-img"), "create", "-q", "-f", "qed", "-o", opts, img, "10M")
    qio(img, "qed", "write -P 1 0 100k", "write -z 1M 128k", "write -P 2 5M 4k", "write -P 3 9M 1M")
    return img


@pytest.mark.parametrize("opts", ["cluster_size=64k", "cluster_size=4k,table_size=2", "table_size=8"])
def test_qemu_made_qed_reads_and_describes_the_same(tmp_path: Path, opts: str) -> None:
    _qed_with_data(tmp_path, opts=opts)
    to_raw(tmp_path, "d.qed")
    for args in (["info", "--output=json"], ["info"], ["map", "--output=json"], ["map"],
                 ["check", "--output=json"], ["check"]):
        same(tmp_path, *args, "d.qed")
    same(tmp_path, "compare", "d.qed", "q.raw")
    same(tmp_path, "measure", "-O", "qcow2", "d.qed")


def test_qemu_made_qcow_with_compressed_clusters(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    data = b"".join((b"block %d " % i) * 600 for i in range(800))[:3 << 20] + os.urandom(1 << 20)
    src.write_bytes(data + bytes(1 << 20))
    # qemu-img exits 1 (without a word) after every convert -c -O qcow: its closing empty compressed
    # write is refused by the qcow driver; the image is complete
    run(peer("qemu-img"), "convert", "-c", "-O", "qcow", src, tmp_path / "c.qcow", check=False)
    qio(tmp_path / "c.qcow", "qcow", "write -P 9 5000 70000")  # partial writes into compressed clusters
    to_raw(tmp_path, "c.qcow")
    for args in (["info", "--output=json"], ["map", "--output=json"], ["map"], ["check"]):
        same(tmp_path, *args, "c.qcow")


@pytest.mark.parametrize("fmt", ["qed", "qcow"])
def test_convert_into_the_format_passes_qemu_checks(tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(300_000) + bytes(2 << 20) + os.urandom(1 << 20) + b"\1" * 5000)
    o = ours("convert", "-O", fmt, "src.raw", "out", cwd=tmp_path)
    assert o.returncode == 0, o.stderr
    if fmt == "qed":
        run(peer("qemu-img"), "check", tmp_path / "out")
    assert b"identical" in run(peer("qemu-img"), "compare", src, tmp_path / "out").stdout
    same(tmp_path, "info", "--output=json", "out")
    same(tmp_path, "map", "--output=json", "out")


def test_convert_compressed_to_qcow(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(b"".join((b"text %d " % i) * 700 for i in range(600))[:2 << 20] + os.urandom(70_000))
    q = qemu("convert", "-c", "-O", "qcow", "src.raw", "q.qcow", cwd=tmp_path)
    o = ours("convert", "-c", "-O", "qcow", "src.raw", "out.qcow", cwd=tmp_path)
    # both exit 1 once the image is complete (qemu's qcow refuses qemu-img's closing empty write), and
    # both without a word (iotest 053 holds qemu-img to that)
    assert o.returncode == q.returncode == 1, o.stderr
    assert o.stderr == q.stderr == b""
    assert b"identical" in run(peer("qemu-img"), "compare", src, tmp_path / "out.qcow").stdout
    assert os.path.getsize(tmp_path / "out.qcow") < 1 << 20  # it did compress
    m = json.loads(run(peer("qemu-img"), "map", "--output=json", tmp_path / "out.qcow").stdout)
    assert m[0]["data"] and "offset" not in m[0]  # compressed clusters, as qemu-img sees them
    same(tmp_path, "convert", "-c", "-O", "qed", "src.raw", "x.qed")


def test_backing_chains_across_formats(tmp_path: Path) -> None:
    q = peer("qemu-img")
    # qed over raw (no-probe flag), qcow2 over qed, qcow over qcow
    (tmp_path / "base.raw").write_bytes(os.urandom(2 << 20))
    run(q, "create", "-q", "-f", "qed", "-b", "base.raw", "-F", "raw", tmp_path / "mid.qed", "4M")
    qio(tmp_path / "mid.qed", "qed", "write -P 5 64k 100k", "write -z 1M 64k", "write -P 6 3M 64k")
    run(q, "create", "-q", "-f", "qcow2", "-b", "mid.qed", "-F", "qed", tmp_path / "top.qcow2")
    qio(tmp_path / "top.qcow2", "qcow2", "write -P 7 100k 8k")
    to_raw(tmp_path, "top.qcow2")
    same(tmp_path, "map", "--output=json", "top.qcow2")
    same(tmp_path, "info", "--backing-chain", "--output=json", "top.qcow2")
    run(q, "create", "-q", "-f", "qcow", tmp_path / "low.qcow", "2M")
    qio(tmp_path / "low.qcow", "qcow", "write -P 1 0 1M")
    run(q, "create", "-q", "-f", "qcow", "-b", "low.qcow", "-F", "qcow", tmp_path / "up.qcow", "3M")
    qio(tmp_path / "up.qcow", "qcow", "write -P 2 512k 1k")
    to_raw(tmp_path, "up.qcow")
    same(tmp_path, "map", "--output=json", "up.qcow")


@pytest.mark.parametrize(("at", "fmt_", "value"), [
    (4, "I", 1000), (8, "I", 3), (16, "Q", 8), (40, "Q", 7), (40, "Q", 0x99999999999),
    (48, "Q", 999999999999999), (12, "I", 99999), (24, "Q", 1), (0, "I", 0),
])
def test_hostile_qed_headers(tmp_path: Path, at: int, fmt_: str, value: int) -> None:
    img = _qed_with_data(tmp_path)
    with img.open("r+b") as f:
        f.seek(at)
        f.write(struct.pack("<" + fmt_, value))
    same(tmp_path, "info", "d.qed")
    same(tmp_path, "info", "-f", "qed", "d.qed")
    same(tmp_path, "check", "-f", "qed", "d.qed")


def test_hostile_qed_tables_and_truncation(tmp_path: Path) -> None:
    img = _qed_with_data(tmp_path)
    l1 = 65536
    with img.open("r+b") as f:
        f.seek(l1)
        l2 = struct.unpack("<Q", f.read(8))[0]
        f.seek(l2 + 16)
        f.write(struct.pack("<QQ", 1 << 60, 0x50000))  # past the end; a cluster referenced twice
    same(tmp_path, "check", "d.qed")
    same(tmp_path, "check", "--output=json", "d.qed")
    o = ours("convert", "-O", "raw", "d.qed", "o.raw", cwd=tmp_path)
    assert o.returncode == 1 and o.stderr.count(b"\n") == 1, o.stderr
    fixed = tmp_path / "f.qed"
    shutil.copy(img, fixed)
    shutil.copy(img, tmp_path / "g.qed")
    run(peer("qemu-img"), "check", "-r", "all", tmp_path / "g.qed", check=False)
    o = ours("check", "-r", "all", "f.qed", cwd=tmp_path)
    assert o.returncode == 2
    assert fixed.read_bytes() == (tmp_path / "g.qed").read_bytes()
    with img.open("r+b") as f:
        f.seek(l1)
        f.write(struct.pack("<Q", 1 << 62))  # an L1 entry past the end
    same(tmp_path, "check", "d.qed")
    same(tmp_path, "map", "d.qed")
    head = tmp_path / "t.qed"
    head.write_bytes(img.read_bytes()[:30])
    same(tmp_path, "info", "t.qed")


def test_qed_need_check_flag_repaired_on_writable_open(tmp_path: Path) -> None:
    img = _qed_with_data(tmp_path)
    with img.open("r+b") as f:
        f.seek(65536)
        l2 = struct.unpack("<Q", f.read(8))[0]
        f.seek(l2 + 8 * 20)
        f.write(struct.pack("<Q", 1 << 50))   # an entry past the end, as a crash under qemu may leave
        f.seek(16)
        f.write(struct.pack("<Q", 2))         # need-check
    theirs = tmp_path / "q.qed"
    shutil.copy(img, theirs)
    # read-only opens leave the flag and the image alone
    same(tmp_path, "check", "d.qed")
    assert img.read_bytes() == theirs.read_bytes()
    # a writable open checks and repairs first, then clears the flag, as qemu's open does
    qio(theirs, "qed", "read 0 4k")
    o = ours("resize", "-f", "qed", "d.qed", "+0", cwd=tmp_path)
    assert img.read_bytes()[16:24] == theirs.read_bytes()[16:24] == bytes(8), o.stderr
    assert img.read_bytes()[l2:l2 + 8 * 32] == theirs.read_bytes()[l2:l2 + 8 * 32]
    same(tmp_path, "check", "d.qed")


@pytest.mark.parametrize(("at", "fmt_", "value"), [
    (0, ">I", 0), (4, ">I", 2), (24, ">Q", 1), (32, ">B", 8), (32, ">B", 17), (33, ">B", 5),
    (33, ">B", 14), (36, ">I", 2), (16, ">I", 5000), (24, ">Q", 1 << 63),
])
def test_hostile_qcow_headers(tmp_path: Path, at: int, fmt_: str, value: int) -> None:
    img = tmp_path / "h.qcow"
    run(peer("qemu-img"), "create", "-q", "-f", "qcow", "-b", "b.raw", "-F", "raw", "-u", img, "1M")
    (tmp_path / "b.raw").write_bytes(bytes(1 << 20))
    with img.open("r+b") as f:
        f.seek(at)
        f.write(struct.pack(fmt_, value))
    same(tmp_path, "info", "-f", "qcow", "h.qcow")
    q = qemu("convert", "-f", "qcow", "-O", "raw", "h.qcow", "q.raw", cwd=tmp_path)
    o = ours("convert", "-f", "qcow", "-O", "raw", "h.qcow", "o.raw", cwd=tmp_path)
    assert o.returncode == q.returncode, (o.stderr, q.stderr)
    assert o.stderr.decode().replace("imagecore:", "qemu-img:").replace("o.raw", "q.raw") == q.stderr.decode()


def test_encrypted_qcow_is_described_and_refused(tmp_path: Path) -> None:
    run(peer("qemu-img"), "create", "-q", "-f", "qcow", "--object", "secret,id=s0,data=abc", "-o",
        "encrypt.format=aes,encrypt.key-secret=s0", tmp_path / "e.qcow", "1M")
    same(tmp_path, "info", "--output=json", "e.qcow")
    same(tmp_path, "info", "e.qcow")
    same(tmp_path, "convert", "-O", "raw", "e.qcow", "x.raw")
    same(tmp_path, "map", "e.qcow")
    assert not (tmp_path / "x.raw").exists()


@pytest.mark.parametrize("args", [["5M"], ["--shrink", "5M"], ["+1000"], ["--preallocation=full", "+1M"],
                                  ["100P"], ["+1M"], ["20M"]])
def test_qed_resize_as_qemu_img(tmp_path: Path, args: list[str]) -> None:
    img = _qed_with_data(tmp_path)
    theirs = tmp_path / "q.qed"
    shutil.copy(img, theirs)
    q = qemu("resize", "q.qed", *args, cwd=tmp_path)
    o = ours("resize", "d.qed", *args, cwd=tmp_path)
    assert (o.returncode, o.stdout) == (q.returncode, q.stdout)
    assert o.stderr.decode().replace("imagecore:", "qemu-img:") == q.stderr.decode()
    assert img.read_bytes() == theirs.read_bytes()


def test_qed_resize_over_a_longer_backing_file_is_refused_as_in_qemu(tmp_path: Path) -> None:
    (tmp_path / "big.raw").write_bytes(os.urandom(3 << 20))
    run(peer("qemu-img"), "create", "-q", "-f", "qed", "-b", "big.raw", "-F", "raw", tmp_path / "ov.qed",
        "1M")
    same(tmp_path, "resize", "ov.qed", "3M")
    same(tmp_path, "info", "--output=json", "ov.qed")


@pytest.mark.parametrize("args", [["-u", "-b", "b1.raw", "-F", "raw"], ["-u", "-b", "b2.qed", "-F", "qed"],
                                  ["-u", "-b", ""], ["-b", "b1.raw", "-F", "raw"], ["-u", "-b", "b1.raw"],
                                  ["-u", "-b", "x" * 70000, "-F", "raw"]])
def test_qed_rebase_as_qemu_img(tmp_path: Path, args: list[str]) -> None:
    q = peer("qemu-img")
    run(q, "create", "-q", "-f", "raw", tmp_path / "b1.raw", "2M")
    qio(tmp_path / "b1.raw", "raw", "write -P 3 0 1M")
    run(q, "create", "-q", "-f", "qed", tmp_path / "b2.qed", "2M")
    run(q, "create", "-q", "-f", "qed", "-b", "b2.qed", "-F", "qed", tmp_path / "t.qed", "2M")
    qio(tmp_path / "t.qed", "qed", "write -P 5 100k 10k")
    shutil.copy(tmp_path / "t.qed", tmp_path / "o.qed")
    theirs = qemu("rebase", *args, "t.qed", cwd=tmp_path)
    mine = ours("rebase", *args, "o.qed", cwd=tmp_path)
    assert (mine.returncode, mine.stdout) == (theirs.returncode, theirs.stdout)
    assert mine.stderr.decode().replace("imagecore:", "qemu-img:").replace("o.qed", "t.qed") \
        == theirs.stderr.decode()
    assert (tmp_path / "o.qed").read_bytes() == (tmp_path / "t.qed").read_bytes()


@pytest.mark.parametrize("header", ["qcow2", "plain"])
def test_commit_into_a_probed_raw_base_keeps_it_raw(tmp_path: Path, header: str) -> None:
    """qcow cannot name its backing file's format, so a raw base is probed; a commit that would write
    another format's header into its first sector is refused (EPERM) as qemu's raw driver refuses it,
    while ordinary data goes in."""
    size = 4 << 20
    payload = tmp_path / "payload"
    if header == "qcow2":
        run(peer("qemu-img"), "create", "-q", "-f", "qcow2", payload, str(size))
        os.truncate(payload, size)
    else:
        payload.write_bytes(os.urandom(size))
    results = []
    for tool, who in ((ours, "ours"), (qemu, "qemu")):
        d = tmp_path / who
        d.mkdir()
        with open(d / "base", "wb") as f:
            f.truncate(size)
        run(peer("qemu-img"), "create", "-q", "-f", "qcow", "-b", "base", "-F", "raw", d / "top.qcow",
            str(size))
        run(peer("qemu-img"), "convert", "-n", "-f", "raw", "-O", "qcow", payload, d / "top.qcow")
        results.append(tool("commit", "-f", "qcow", "top.qcow", cwd=d))
        info = json.loads(run(peer("qemu-img"), "info", "--output=json", d / "base").stdout)
        assert info["format"] == "raw"
        if header == "plain":
            assert (d / "base").read_bytes() == payload.read_bytes()
    o, q = results
    assert o.returncode == q.returncode == (1 if header == "qcow2" else 0)
    assert o.stderr.decode().replace("imagecore:", "qemu-img:") == q.stderr.decode()
    assert o.stdout == q.stdout


def test_qcow_create_refuses_a_backing_format_no_driver_has(tmp_path: Path) -> None:
    with open(tmp_path / "base", "wb") as f:
        f.truncate(1 << 20)
    for fmt, code in (("garbage", 1), ("vmdk", 0), ("file", 0)):
        o = ours("create", "-u", "-f", "qcow", "-b", "base", "-F", fmt, "o.qcow", "1M", cwd=tmp_path)
        q = qemu("create", "-u", "-f", "qcow", "-b", "base", "-F", fmt, "q.qcow", "1M", cwd=tmp_path)
        assert o.returncode == q.returncode == code, (fmt, o.stderr)
        assert o.stderr.decode().replace("imagecore:", "qemu-img:").replace("o.qcow", "q.qcow") == \
            q.stderr.decode()
        assert (tmp_path / "o.qcow").exists() == (tmp_path / "q.qcow").exists() == (code == 0)
        for name in ("o.qcow", "q.qcow"):
            (tmp_path / name).unlink(missing_ok=True)


def test_legacy_aes_qcow_made_by_qemu_reads_back_identical(tmp_path: Path) -> None:
    """qcow's legacy AES (read-only here): decrypted with the secret into the same bytes qemu-img reads,
    map without host offsets (ciphertext), no key a refusal in qemu's words, writing refused."""
    secret = ["--object", "secret,id=s0,data=a passphrase longer than sixteen bytes"]
    img = tmp_path / "e.qcow"
    run(peer("qemu-img"), "create", "-q", "-f", "qcow", *secret, "-o",
        "encrypt.format=aes,encrypt.key-secret=s0", img, "3M")
    opts = f"driver=qcow,encrypt.key-secret=s0,file.filename={img}"
    run(peer("qemu-io"), *secret, "--image-opts", opts, "-c", "write -P 5 1000 70000", "-c",
        "write -P 9 2M 4096", "-c", "write -c -P 3 1M 4k")
    for name in ("q.raw", "o.raw"):
        tool = qemu if name == "q.raw" else ours
        done = tool("convert", *secret, "--image-opts", opts, "-O", "raw", name, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    assert (tmp_path / "o.raw").read_bytes() == (tmp_path / "q.raw").read_bytes()
    assert (tmp_path / "o.raw").read_bytes()[1000:71000] == b"\5" * 70000
    same(tmp_path, "map", "--output=json", *secret, "--image-opts", opts)
    same(tmp_path, "info", "--output=json", "e.qcow")
    same(tmp_path, "convert", "-O", "raw", "e.qcow", "x.raw")
    o = ours("resize", *secret, "--image-opts", opts, "+1M", cwd=tmp_path)
    assert o.returncode == 1 and b"read-only here" in o.stderr
