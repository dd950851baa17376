"""luks images against qemu-img 7.2: each tool opens the other's volumes with the same secret and reads the
same bytes; info, map and check as qemu-img's; a wrong, unknown or missing secret fails with qemu-img's
message; no plaintext reaches the file."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.peers import imagecore_cmd, peer

SECRET = ["--object", "secret,id=sec0,data=correct horse"]
MiB = 1 << 20
# a pattern that must never appear in an encrypted file
PLAIN = b"PLAINTEXT-MARKER-" * 64


def ours(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*imagecore_cmd(), *map(str, args)], capture_output=True, timeout=120)


def qemu(*args: str | Path, tool: str = "qemu-img") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([peer(tool), *map(str, args)], capture_output=True, timeout=120)


def opts(img: Path, secret: str = "sec0") -> list[str]:
    return ["--image-opts", f"driver=luks,file.filename={img},key-secret={secret}"]


def same_error(mine: subprocess.CompletedProcess[bytes], theirs: subprocess.CompletedProcess[bytes]) -> None:
    text = mine.stderr.decode()
    assert "Traceback" not in text
    assert mine.returncode == theirs.returncode != 0, (text, theirs.stderr)
    assert text.replace("imagecore:", "qemu-img:") == theirs.stderr.decode()


def qemu_create(img: Path, size: str, extra: str = "") -> None:
    """qemu-img create -f luks, again when its PBKDF timing fails on a busy machine."""
    o = "key-secret=sec0,iter-time=10" + ("," + extra if extra else "")
    for attempt in range(20):
        done = qemu("create", "-q", "-f", "luks", *SECRET, "-o", o, img, size)
        if b"Unable to get accurate CPU usage" not in done.stderr:
            break
        time.sleep(0.05 * (attempt + 1))
    assert done.returncode == 0, done.stderr


CIPHERS = [
    "",
    "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv",
    "cipher-alg=aes-128,cipher-mode=xts,ivgen-alg=plain,hash-alg=sha512",
    "cipher-alg=aes-128,cipher-mode=xts,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha1",
    "cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=plain64,ivgen-hash-alg=sha1",
]


def test_aes_192_xts_is_refused_with_its_cause(tmp_path: Path) -> None:
    img = tmp_path / "q.luks"
    qemu_create(img, "1M", "cipher-alg=aes-192")
    mine = ours("convert", *SECRET, *opts(img), "-O", "raw", tmp_path / "o.raw")
    assert mine.returncode == 1 and b"Traceback" not in mine.stderr
    assert b"Cipher aes-192 in mode xts is not supported" in mine.stderr


def test_aes_192_outside_xts_is_refused_where_qemu_aborts(tmp_path: Path) -> None:
    # 24-byte keys make 96000 bytes of key material, not whole sectors: qemu 7.2 aborts on an assertion
    # making such a volume, and would abort opening one; imagecore refuses to make it
    mine = ours("create", *SECRET, "-f", "luks", "-o", "key-secret=sec0,cipher-alg=aes-192,cipher-mode=cbc",
                tmp_path / "x.luks", "1M")
    assert mine.returncode == 1 and b"Traceback" not in mine.stderr
    assert mine.stderr.decode().count("\n") == 1 and "aes-192" in mine.stderr.decode()


@pytest.mark.parametrize("extra", CIPHERS)
def test_qemu_made_volume_reads_identical_and_describes_alike(tmp_path: Path, extra: str) -> None:
    img = tmp_path / "q.luks"
    qemu_create(img, "2M", extra)
    written = qemu("--object", SECRET[1], *opts(img), "-c", "write -P 0x5a 4096 65536",
                   "-c", "write -P 0x33 1000000 777", "-c", "write -P 0x1 2096640 512", tool="qemu-io")
    assert written.returncode == 0, written.stderr
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    assert qemu("convert", *SECRET, *opts(img), "-O", "raw", a).returncode == 0
    mine = ours("convert", *SECRET, *opts(img), "-O", "raw", b)
    assert mine.returncode == 0, mine.stderr
    assert a.read_bytes() == b.read_bytes()
    for args in (["info", "--output=json", img], ["info", img],
                 ["info", "--output=json", *SECRET, *opts(img)],
                 ["map", "--output=json", *SECRET, *opts(img)]):
        theirs, mine = qemu(*args), ours(*args)
        assert mine.returncode == theirs.returncode == 0, mine.stderr
        if "--output=json" in args and args[0] == "info":
            t, m = json.loads(theirs.stdout), json.loads(mine.stdout)
            # allocation differs by file system
            del t["actual-size"], m["actual-size"]
            assert m == t
        elif args[0] == "info":
            strip = [ln for ln in theirs.stdout.decode().splitlines() if not ln.startswith("disk size")]
            assert [ln for ln in mine.stdout.decode().splitlines() if not ln.startswith("disk size")] == strip
        else:
            assert mine.stdout == theirs.stdout
    # qemu-img compare through both tools, secrets given the same way
    for tool, raw in ((qemu, b), (ours, a)):
        assert tool("compare", *SECRET, *opts(img), "--image-opts", f"driver=raw,file.filename={raw}"
                    ).returncode == 0


@pytest.mark.parametrize("extra", CIPHERS[:3])
def test_imagecore_made_volume_opens_in_qemu_and_hides_the_data(tmp_path: Path, extra: str) -> None:
    src = tmp_path / "src.raw"
    body = PLAIN * 100 + bytes(MiB) + PLAIN * 50
    src.write_bytes(body + bytes(-len(body) % 512))
    img = tmp_path / "ours.luks"
    o = "key-secret=sec0,iter-time=10" + ("," + extra if extra else "")
    made = ours("convert", *SECRET, "-O", "luks", "-o", o, src, img)
    assert made.returncode == 0, made.stderr
    data = img.read_bytes()
    assert b"PLAINTEXT-MARKER" not in data
    cmp = qemu("compare", *SECRET, *opts(img), "--image-opts", f"driver=raw,file.filename={src}")
    assert cmp.returncode == 0, (cmp.stdout, cmp.stderr)
    check = qemu("check", *SECRET, *opts(img))
    assert check.returncode == 63 and b"does not support checks" in check.stderr
    info = json.loads(qemu("info", "--output=json", img).stdout)
    spec = info["format-specific"]["data"]
    assert info["encrypted"] is True and info["virtual-size"] == src.stat().st_size
    want = dict(p.split("=") for p in extra.split(",") if p) if extra else {}
    assert spec["cipher-alg"] == want.get("cipher-alg", "aes-256")
    assert spec["cipher-mode"] == want.get("cipher-mode", "xts")
    assert spec["ivgen-alg"] == want.get("ivgen-alg", "plain64")
    assert spec["hash-alg"] == want.get("hash-alg", "sha256")
    assert [s["active"] for s in spec["slots"]] == [True] + [False] * 7
    # and qemu-io writes into it, which imagecore then reads back
    w = qemu("--object", SECRET[1], *opts(img), "-c", "write -P 0x77 512 1000", tool="qemu-io")
    assert w.returncode == 0, w.stderr
    out = tmp_path / "back.raw"
    assert ours("convert", *SECRET, *opts(img), "-O", "raw", out).returncode == 0
    want_bytes = bytearray(src.read_bytes())
    want_bytes[512:1512] = b"\x77" * 1000
    assert out.read_bytes() == bytes(want_bytes)


def test_create_line_help_and_refusals_as_qemu(tmp_path: Path) -> None:
    theirs, mine = qemu("create", "-f", "luks", "-o", "help"), ours("create", "-f", "luks", "-o", "help")
    assert mine.stdout == theirs.stdout
    a, b = tmp_path / "a.luks", tmp_path / "b.luks"
    for o in ("key-secret=sec0,iter-time=10",
              "key-secret=sec0,cipher-alg=aes-128,ivgen-alg=essiv,iter-time=5"):
        theirs, mine = qemu("create", *SECRET, "-f", "luks", "-o", o, a, "1M"), \
            ours("create", *SECRET, "-f", "luks", "-o", o, b, "1M")
        assert mine.stdout.replace(b"b.luks", b"a.luks") == theirs.stdout
    for args in (["-o", "iter-time=10"], ["-o", "key-secret=nope"], ["-o", "key-secret=sec0,cipher-alg=foo"],
                 ["-o", "key-secret=sec0,cipher-mode=bar"], ["-o", "key-secret=sec0,iter-time=abc"],
                 ["-o", "key-secret=sec0,hash-alg=sha3"], ["-o", "key-secret=sec0,ivgen-alg=essiv,"
                                                           "ivgen-hash-alg=sha1"]):
        c, d = tmp_path / "c.luks", tmp_path / "d.luks"
        theirs = qemu("create", *SECRET, "-f", "luks", *args, c, "1M")
        mine = ours("create", *SECRET, "-f", "luks", *args, d, "1M")
        assert mine.returncode == theirs.returncode == 1, (args, mine.stderr)
        assert mine.stderr.decode().replace("d.luks", "c.luks").replace("imagecore:", "qemu-img:") \
            == theirs.stderr.decode(), args
        assert mine.stdout.replace(b"d.luks", b"c.luks") == theirs.stdout
        assert c.exists() == d.exists()


def test_secret_errors_as_qemu_and_no_traceback(tmp_path: Path) -> None:
    img = tmp_path / "q.luks"
    qemu_create(img, "1M")
    wrong = ["--object", "secret,id=sec0,data=wrong"]
    for args in (["convert", "-O", "raw", img, tmp_path / "o.raw"],
                 ["convert", *wrong, *opts(img), "-O", "raw", tmp_path / "o.raw"],
                 ["convert", *SECRET, *opts(img, "other"), "-O", "raw", tmp_path / "o.raw"],
                 ["check", img], ["check", *wrong, *opts(img)], ["check", *SECRET, *opts(img)],
                 ["map", *SECRET, *opts(img)], ["compare", *wrong, *opts(img), img],
                 ["info", "--output=json", *SECRET, *opts(img, "other")]):
        theirs, mine = qemu(*args), ours(*args)
        if theirs.returncode == 0:
            assert mine.returncode == 0, (args, mine.stderr)
            continue
        same_error(mine, theirs)
    # a secret read from a file, base64: the same key
    key = tmp_path / "key"
    key.write_bytes(b"Y29ycmVjdCBob3JzZQ==")
    b64 = ["--object", f"secret,id=sec0,file={key},format=base64"]
    assert ours("convert", *b64, *opts(img), "-O", "raw", tmp_path / "o.raw").returncode == 0


def test_served_over_nbd_with_the_secret_and_written_through(tmp_path: Path) -> None:
    from tests.interop.nbdsrv_fixture import start_server

    img = tmp_path / "q.luks"
    qemu_create(img, "1M")
    w = qemu("--object", SECRET[1], *opts(img), "-c", "write -P 0x42 0 64k", tool="qemu-io")
    assert w.returncode == 0, w.stderr
    srv = start_server(tmp_path / "srv", "--object", SECRET[1], "--image", str(img), "--format", "luks",
                       "--key-secret", "sec0", use_pool=False)
    try:
        url = srv.unix_uri("")
        # written through the server: unaligned, so that sectors are read, merged and encrypted again
        w = qemu("-f", "raw", url, "-c", "write -P 0x17 1000 3000", tool="qemu-io")
        assert w.returncode == 0, w.stderr
        over_nbd = tmp_path / "nbd.raw"
        assert qemu("convert", "-f", "raw", url, "-O", "raw", over_nbd).returncode == 0
    finally:
        assert srv.stop() == 0, srv.log()
    direct = tmp_path / "direct.raw"
    assert qemu("convert", *SECRET, *opts(img), "-O", "raw", direct).returncode == 0
    # (what was never written reads as whatever zero bytes decrypt to, in both)
    want = bytearray(b"\x42" * 65536)
    want[1000:4000] = b"\x17" * 3000
    assert direct.read_bytes() == over_nbd.read_bytes()
    assert direct.read_bytes()[:65536] == bytes(want)
    assert b"\x17" * 64 not in img.read_bytes()
    # a wrong or unknown secret: qemu-nbd's one line and exit code, from both servers
    for secret in ("nosuch", "sec0"):
        args = ["--object", "secret,id=sec0,data=wrong", "--image-opts",
                f"driver=luks,file.filename={img},key-secret={secret}", "-k", str(tmp_path / "x.sock")]
        theirs = subprocess.run([peer("qemu-nbd"), *args], capture_output=True, timeout=60)
        mine = subprocess.run([*imagecore_cmd()[:1], "-m", "nbdsrv", "qemu-nbd", *args], capture_output=True,
                              timeout=60)
        assert mine.returncode == theirs.returncode == 1, mine.stderr
        assert mine.stderr == theirs.stderr


# (name, offset, bytes) edits of a LUKS1 header, each refused by info as qemu-img refuses it
_SLOT = 208  # the first key slot; each is 48 bytes: active, iterations, salt, key offset, stripes
HOSTILE = [
    ("version 2 named luks", 6, b"\x00\x02"),
    ("stripes 0", _SLOT + 3 * 48 + 44, b"\x00\x00\x00\x00"),
    ("slot state", _SLOT + 2 * 48, b"\x00\x00\x00\x01"),
    ("key material in the payload", _SLOT + 7 * 48 + 40, (4000).to_bytes(4, "big")),
    ("slots overlapping", _SLOT + 5 * 48 + 40, (8 + 4 * 504).to_bytes(4, "big")),
    ("cipher name", 8, b"foo\x00"),
    ("hash name", 72, b"sha2566\x00"),
    ("mode without iv", 40, b"xts" + bytes(29)),
    ("unknown mode", 40, b"abc-plain64" + bytes(21)),
    ("essiv without hash", 40, b"xts-essiv" + bytes(23)),
    ("payload in the header", 104, (1).to_bytes(4, "big")),
    ("absurd key length", 108, b"\xff\xff\xff\xff"),
    ("truncated", -1, b""),
]


@pytest.mark.parametrize("name,at,data", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_headers_refused_as_qemu(tmp_path: Path, name: str, at: int, data: bytes) -> None:
    if "template" not in _HOSTILE_TEMPLATE:
        t = tmp_path / "t.luks"
        qemu_create(t, "1M")
        _HOSTILE_TEMPLATE["template"] = t.read_bytes()
    raw = bytearray(_HOSTILE_TEMPLATE["template"])
    if at < 0:
        raw = raw[:300]
    else:
        raw[at:at + len(data)] = data
    img = tmp_path / "h.luks"
    img.write_bytes(raw)
    runs: list[list[str | Path]] = [
        ["info", "-f", "luks", img],
        ["convert", *SECRET, "--image-opts", f"driver=luks,file.filename={img},key-secret=sec0", "-O", "raw",
         tmp_path / "o.raw"]]
    for args in runs:
        theirs, mine = qemu(*args), ours(*args)
        if theirs.returncode == 0:
            assert mine.returncode == 0, (name, mine.stderr)
            continue
        same_error(mine, theirs)


_HOSTILE_TEMPLATE: dict[str, bytes] = {}


def test_measure_as_qemu(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(PLAIN * 200)
    # (each qemu-img measure with a key secret times PBKDF2 for a second or two: few cases)
    for args in (["-O", "luks", "-o", "key-secret=sec0,cipher-alg=aes-128,cipher-mode=cbc", "--size", "1000"],
                 ["-O", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=sec0,cluster_size=4k", src],
                 ["-O", "luks", "-o", "key-secret=nope", "--size", "1M"], ["-O", "luks", "--size", "1M"]):
        for attempt in range(20):
            # qemu sizes the header by making one, PBKDF timing included, which fails now and then
            theirs = qemu("measure", *SECRET, *args)
            if b"Unable to get accurate CPU usage" not in theirs.stderr:
                break
            time.sleep(0.05 * (attempt + 1))
        mine = ours("measure", *SECRET, *args)
        assert mine.returncode == theirs.returncode, (args, mine.stderr, theirs.stderr)
        assert mine.stdout == theirs.stdout, args
        assert mine.stderr.replace(b"imagecore:", b"qemu-img:") == theirs.stderr, args


@pytest.mark.parametrize(("secret", "options", "deleted"), [
    # the secret is read once the file is made: a failure there deletes it, even one that was there
    # before (iotest 282), as does a missing key-secret
    ("file=bad-utf8", "key-secret=s0", True),
    ("data=x", "iter-time=10", True),
    # refused while the options are parsed, before the file is touched: it stays
    ("data=x", "key-secret=s0,cipher-alg=bogus", False),
    ("data=x", "key-secret=s0,hash-alg=bogus", False),
    ("data=x", "key-secret=s0,iter-time=x", False),
])
def test_a_failed_create_deletes_the_file_where_qemu_does(tmp_path: Path, secret: str, options: str,
                                                          deleted: bool) -> None:
    (tmp_path / "bad-utf8").write_bytes(b"\x3a\x3c\x3b\xff")
    results = []
    for tool, name in ((ours, "o.luks"), (qemu, "q.luks")):
        img = tmp_path / name
        img.write_bytes(b"a file that was here before")
        results.append(tool("create", "-q", "-f", "luks", "--object",
                            f"secret,id=s0,{secret.replace('bad-utf8', str(tmp_path / 'bad-utf8'))}",
                            "-o", options, img, "4M"))
        assert img.exists() != deleted, (name, results[-1].stderr)
    mine, theirs = results
    assert mine.returncode == theirs.returncode == 1
    assert mine.stderr.decode().replace("imagecore:", "qemu-img:").replace("o.luks", "q.luks") == \
        theirs.stderr.decode()


def test_resize_grows_and_shrinks_the_payload_as_qemu_img(tmp_path: Path) -> None:
    """resize opens the volume with its secret (iotest 048), then the file grows or shrinks with the
    payload; the data before the cut stays readable through qemu-io."""
    wrong = ["--object", "secret,id=sec0,data=wrong"]
    steps: list[list[str]] = [
        [*SECRET, "+2M"], ["+2M"], [*wrong, "1M"], [*SECRET, "3M"], ["--shrink", *SECRET, "3M"],
        ["--preallocation=full", *SECRET, "5M"], ["--preallocation=falloc", *SECRET, "+1M"],
    ]
    sizes = []
    for tool, name in ((ours, "o.luks"), (qemu, "q.luks")):
        img = tmp_path / name
        qemu_create(img, "4M")
        io = qemu("--image-opts", *SECRET, "-c", "write -P 7 0 4M", opts(img)[1], tool="qemu-io")
        assert io.returncode == 0, io.stderr
        outputs = []
        for step in steps:
            args = step[:-1]
            target = opts(img) if "--object" in " ".join(args) else [str(img)]
            p = tool("resize", *args, *target, step[-1])
            outputs.append((p.returncode, p.stdout, p.stderr.decode().replace("imagecore:", "qemu-img:")
                            .replace(name, "IMG")))
        sizes.append((img.stat().st_size, outputs))
        io = qemu("--image-opts", *SECRET, "-c", "read -P 7 0 3M", opts(img)[1], tool="qemu-io")
        assert io.returncode == 0 and b"read 3145728/3145728" in io.stdout, io.stdout
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("fmt", ["luks", "qcow2"])
def test_amend_key_slots_as_qemu_img(tmp_path: Path, fmt: str) -> None:
    """amend adds a passphrase to a slot and erases slots, with qemu-img's refusals word for word (iotests
    293 to 296), in a luks volume and in a qcow2 image's LUKS header (its ``encrypt.`` options): afterwards
    the erased passphrase opens nothing, even with the old header put back (its key material is
    overwritten), and the new one opens the image in qemu-io."""
    both = ["--object", "secret,id=sec0,data=correct horse", "--object", "secret,id=sec1,data=battery"]
    pre = "" if fmt == "luks" else "encrypt."
    steps = [
        "state=active,new-secret=sec1,keyslot=1,iter-time=10", "state=active,new-secret=sec1,keyslot=1",
        "state=inactive,keyslot=0", "state=inactive,keyslot=0", "state=inactive,keyslot=1",
        "state=inactive,old-secret=sec1", "state=bogus", "keyslot=3", "state=inactive",
        "state=active,keyslot=9,new-secret=sec0", "state=inactive,new-secret=sec0",
        "state=inactive,iter-time=5,keyslot=1", "state=active,old-secret=sec0,new-secret=sec0",
        "state=active,new-secret=sec0,iter-time=10", "state=inactive,old-secret=sec0",
    ]
    def sequence(tool: Callable[..., subprocess.CompletedProcess[bytes]], img: Path
                 ) -> list[tuple[int, str]]:
        img.unlink(missing_ok=True)
        if fmt == "luks":
            qemu_create(img, "4M")
        else:
            for attempt in range(20):
                made = qemu("create", "-q", "-f", "qcow2", *SECRET, "-o",
                            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=50", img, "4M")
                if b"Unable to get accurate CPU usage" not in made.stderr:
                    break
                time.sleep(0.05 * (attempt + 1))
            assert made.returncode == 0, made.stderr
        # where the LUKS header lies: the file's start, or the clusters the qcow2 extension names
        at = img.read_bytes().find(b"LUKS\xba\xbe")
        assert at >= 0 and (at == 0) == (fmt == "luks")
        backup = img.read_bytes()[at:at + 4096]
        outputs = []
        for i, step in enumerate(steps):
            key = "sec0" if i < 2 else "sec1"
            name_opts = f"driver={fmt},file.filename={img},{pre}key-secret={key}"
            p = tool("amend", *both, "--image-opts", name_opts, "-o",
                     ",".join(pre + part for part in step.split(",")))
            outputs.append((p.returncode, p.stderr.decode().replace("imagecore:", "qemu-img:")))
        s0, s1 = (qemu(*both, "--image-opts", "-c", "read 0 4k",
                       f"driver={fmt},file.filename={img},{pre}key-secret={k}", tool="qemu-io")
                  for k in ("sec0", "sec1"))
        assert s1.returncode == 0 and b"read 4096/4096" in s1.stdout, s1.stderr
        assert s0.returncode != 0 or b"Invalid password" in s0.stdout + s0.stderr
        if fmt == "qcow2":
            ok = qemu("check", *both, "--image-opts",
                      f"driver=qcow2,file.filename={img},encrypt.key-secret=sec1")
            assert ok.returncode == 0, ok.stdout
        with open(img, "r+b") as f:
            f.seek(at)
            f.write(backup)  # slot 0's header back: its key material is gone all the same
        s0 = qemu(*both, "--image-opts", "-c", "read 0 4k",
                  f"driver={fmt},file.filename={img},{pre}key-secret=sec0", tool="qemu-io")
        assert b"Invalid password" in s0.stdout + s0.stderr
        return outputs

    seen = [sequence(ours, tmp_path / "o.img")]
    for attempt in range(10):
        # qemu's PBKDF timing fails now and then on a busy machine ("Unable to get accurate CPU usage")
        theirs = sequence(qemu, tmp_path / "q.img")
        if not any("accurate CPU usage" in text for _code, text in theirs):
            break
        time.sleep(0.05 * (attempt + 1))
    seen.append(theirs)
    assert seen[0] == seen[1]
    assert [code for code, _ in seen[0]].count(0) == 4
    help_o = ours("amend", "-f", "luks", "-o", "help", "x")
    help_q = qemu("amend", "-f", "luks", "-o", "help", "x")
    assert help_o.stdout == help_q.stdout and help_o.returncode == help_q.returncode == 0


def test_amend_of_legacy_aes_key_slots_is_refused_as_qemu_img(tmp_path: Path) -> None:
    img = tmp_path / "aes.qcow2"
    made = qemu("create", "-q", "-f", "qcow2", *SECRET, "-o", "encrypt.format=aes,encrypt.key-secret=sec0",
                img, "1M")
    assert made.returncode == 0, made.stderr
    args = ["amend", *SECRET, "--image-opts", f"driver=qcow2,file.filename={img},encrypt.key-secret=sec0",
            "-o", "encrypt.state=active,encrypt.new-secret=sec0"]
    o, q = ours(*args), qemu(*args)
    assert q.returncode == 1 and b"Only LUKS encryption options can be amended" in q.stderr
    assert o.returncode == q.returncode and o.stderr.replace(b"imagecore:", b"qemu-img:") == q.stderr


@pytest.mark.parametrize("verb", [
    ["amend", "-o", "state=active,new-secret=sec1,keyslot=2,iter-time=10"],
    ["resize", "+1M"],
], ids=["amend key slot", "resize"])
def test_luks_edits_while_qemu_io_holds_the_volume(tmp_path: Path, verb: list[str]) -> None:
    """A luks volume held read-write by qemu-io. amend is refused with qemu-img's words (the key update
    shares neither consistent read nor write) and the volume is left as it was; resize goes ahead, as
    qemu-img's does (the luks driver shares what raw shares)."""
    img = tmp_path / "held.luks"
    qemu_create(img, "4M")
    before = img.read_bytes()
    both = [*SECRET, "--object", "secret,id=sec1,data=battery"]
    holder = subprocess.Popen([peer("qemu-io"), *SECRET, "--image-opts", opts(img)[1]],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        o = ours(verb[0], *both, *opts(img), *verb[1:])
        q = qemu(verb[0], *both, *opts(img), *verb[1:])
    finally:
        holder.kill()
        holder.wait()
    if verb[0] == "resize":
        assert o.returncode == q.returncode == 0 and o.stdout == q.stdout == b"Image resized.\n", o.stderr
        assert img.stat().st_size == len(before) + (2 << 20)  # ours, then qemu-img's
        return
    assert q.returncode == o.returncode == 1, o.stderr
    assert o.stderr.replace(b"imagecore", b"PROG") == q.stderr.replace(b"qemu-img", b"PROG")
    assert o.stderr.startswith(b'imagecore: Failed to get shared "consistent read" lock\n')
    assert img.read_bytes() == before
