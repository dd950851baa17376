"""imagecore as qemu-img wherever qemu-img is used: NBD URLs (over qemu-nbd 7.2 and over nbdsrv), json: and
--image-opts names, --object, and the program's name as invoked, each run next to qemu-img 7.2 on the same
inputs and compared (exit code, stdout, stderr with the program name swapped)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.interop.nbdsrv_fixture import NbdServer, create_image, disk_path, nbdsrv, pool, volid
from tests.peers import REPO, imagecore_cmd, peer, run

__all__ = ["nbdsrv", "pool"]

MiB = 1 << 20


def ours(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*imagecore_cmd(), *map(str, args)], capture_output=True, timeout=60, cwd=cwd)


def qemu(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([peer("qemu-img"), *map(str, args)], capture_output=True, timeout=60, cwd=cwd)


Result = tuple[int, bytes, bytes]


def both(*args: str | Path, cwd: Path | None = None) -> tuple[Result, Result]:
    """(exit code, stdout, stderr) of imagecore (its program name replaced by qemu-img's) and of qemu-img."""
    o = ours(*args, cwd=cwd)
    q = qemu(*args, cwd=cwd)
    assert b"Traceback" not in o.stderr, o.stderr
    return ((o.returncode, o.stdout, o.stderr.replace(b"imagecore: ", b"qemu-img: ")),
            (q.returncode, q.stdout, q.stderr))


def same(*args: str | Path, cwd: Path | None = None) -> Result:
    o, q = both(*args, cwd=cwd)
    assert o == q, (args, o, q)
    return o


@dataclass
class QemuNbd:
    proc: subprocess.Popen[bytes]
    sock: Path
    image: Path

    def url(self, export: str = "exp") -> str:
        return f"nbd+unix:///{export}?socket={self.sock}"


def start_qemu_nbd(image: Path, fmt: str, sock: Path, *extra: str) -> QemuNbd:
    proc = subprocess.Popen([peer("qemu-nbd"), "-k", str(sock), "-f", fmt, "-x", "exp", "-t", *extra,
                             str(image)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        assert time.monotonic() < deadline, "qemu-nbd did not listen"
        time.sleep(0.02)
    return QemuNbd(proc, sock, image)


def fill(path: Path, fmt: str) -> None:
    """Data, a zeroed run, more data and holes."""
    run(peer("qemu-io"), "-f", fmt, "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 1M 128k",
        "-c", "write -z 2M 64k", "-c", "write -P 0x33 3M 4k", path)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[QemuNbd, QemuNbd]]:
    """A qcow2 image served read-write and another served read-only, by qemu-nbd 7.2."""
    rw_img = create_image(tmp_path / "rw.qcow2", "qcow2", "4M")
    fill(rw_img, "qcow2")
    ro_img = create_image(tmp_path / "ro.qcow2", "qcow2", "4M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x44 512k 64k", ro_img)
    # -e: compare opens two connections to the one export at once
    rw = start_qemu_nbd(rw_img, "qcow2", tmp_path / "rw.sock", "-e", "4")
    ro = start_qemu_nbd(ro_img, "qcow2", tmp_path / "ro.sock", "-r")
    try:
        yield rw, ro
    finally:
        for s in (rw, ro):
            s.proc.terminate()
            s.proc.wait(10)


def names(srv: QemuNbd) -> list[str]:
    """Every way of naming the read-write export."""
    sock = str(srv.sock)
    return [srv.url(), f"nbd:unix:{sock}:exportname=exp",
            "json:" + json.dumps({"driver": "nbd", "server": {"type": "unix", "path": sock},
                                  "export": "exp"}),
            "json:" + json.dumps({"driver": "raw", "file": {"driver": "nbd", "server": {"type": "unix",
                                                                                           "path": sock},
                                                            "export": "exp"}}),
            "json:" + json.dumps({"file.driver": "nbd", "file.server.type": "unix", "file.server.path": sock,
                                  "file.export": "exp"})]


def test_info_and_map_over_qemu_nbd(served: tuple[QemuNbd, QemuNbd]) -> None:
    rw, _ro = served
    for name in names(rw):
        for args in (("info",), ("info", "--output=json"), ("map",), ("map", "--output=json")):
            same(*args, name)
    mapped = json.loads(same("map", "--output=json", rw.url())[1])
    # block status came through: the holes and the zeroed run are not data
    assert any(not e["data"] for e in mapped) and any(e["data"] for e in mapped)
    sock = str(rw.sock)
    for opts in (f"driver=nbd,server.type=unix,server.path={sock},export=exp",
                 f"driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={sock},file.export=exp"):
        same("info", "--output=json", "--image-opts", opts)
        same("map", "--output=json", "--image-opts", opts)


def test_info_and_map_over_nbdsrv(nbdsrv: NbdServer, pool: Path) -> None:
    for fmt in ("raw", "qcow2"):
        img = create_image(disk_path(pool, f"disk-{fmt}", fmt), fmt, "4M")
        fill(img, fmt)
        name = volid(img)
        for url in (nbdsrv.uri(name), nbdsrv.unix_uri(name), nbdsrv.qemu_json(name)):
            for args in (("info", "--output=json"), ("map", "--output=json"), ("info",)):
                same(*args, url)


def test_convert_from_and_to_nbd(served: tuple[QemuNbd, QemuNbd], tmp_path: Path) -> None:
    rw, _ro = served
    url = rw.url()
    for fmt in ("raw", "qcow2"):
        a, b = tmp_path / f"ours.{fmt}", tmp_path / f"theirs.{fmt}"
        assert ours("convert", "-O", fmt, url, a).returncode == 0
        run(peer("qemu-img"), "convert", "-O", fmt, url, b)
        run(peer("qemu-img"), "compare", a, url)
        run(peer("qemu-img"), "compare", a, b)
        assert run(peer("qemu-img"), "map", "--output=json", a).stdout == \
            run(peer("qemu-img"), "map", "--output=json", b).stdout
        if fmt == "qcow2":
            run(peer("qemu-img"), "check", a)
    # into the export: first over old bytes everywhere, so that zero runs must be written, not assumed
    src = create_image(tmp_path / "src.raw", "raw", "4M")
    run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x55 512k 100k", "-c", "write -P 0x66 3M 8k", src)
    for extra in ((), ("-n",)):
        run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x77 0 4M", url)
        o = ours("convert", *extra, "-O", "raw", src, url)
        assert (o.returncode, o.stderr) == (0, b""), o.stderr
        run(peer("qemu-img"), "compare", src, url)
    # a qcow2 source, converted into the export and compared with the source through qemu-img
    q = create_image(tmp_path / "src.qcow2", "qcow2", "4M")
    fill(q, "qcow2")
    assert ours("convert", "-n", "-f", "qcow2", "-O", "raw", q, url).returncode == 0
    run(peer("qemu-img"), "compare", q, url)


def test_convert_to_nbdsrv_and_back(nbdsrv: NbdServer, pool: Path, tmp_path: Path) -> None:
    img = create_image(disk_path(pool, "disk-0", "qcow2"), "qcow2", "4M")
    src = create_image(tmp_path / "src.qcow2", "qcow2", "4M")
    fill(src, "qcow2")
    url = nbdsrv.unix_uri(volid(img))
    o = ours("convert", "-n", "-O", "raw", src, url)
    assert o.returncode == 0, o.stderr
    run(peer("qemu-img"), "compare", src, url)
    back = tmp_path / "back.qcow2"
    assert ours("convert", "-O", "qcow2", nbdsrv.uri(volid(img)), back).returncode == 0
    run(peer("qemu-img"), "compare", src, back)
    run(peer("qemu-img"), "check", back)
    same("compare", url, nbdsrv.uri(volid(img)))


def test_compare_two_exports(served: tuple[QemuNbd, QemuNbd]) -> None:
    rw, ro = served
    rc, out, _err = same("compare", rw.url(), ro.url())
    assert rc == 1 and out.startswith(b"Content mismatch")
    assert same("compare", rw.url(), names(rw)[2])[0] == 0
    same("compare", "-s", rw.url(), names(rw)[1])


def test_check_dd_measure_bench(served: tuple[QemuNbd, QemuNbd], tmp_path: Path) -> None:
    rw, _ro = served
    assert same("check", rw.url())[0] == 63
    same("measure", "-O", "qcow2", rw.url())
    same("measure", "--output=json", "-O", "qcow2", rw.url())
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    assert ours("dd", "-O", "raw", "bs=64k", f"if={rw.url()}", f"of={a}").returncode == 0
    run(peer("qemu-img"), "dd", "-O", "raw", "bs=64k", f"if={rw.url()}", f"of={b}")
    assert a.read_bytes() == b.read_bytes()
    # dd into the export writes the input's zeroes over the old bytes too
    src = create_image(tmp_path / "src.raw", "raw", "4M")
    run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x12 1M 64k", src)
    o = ours("dd", "-O", "raw", f"if={src}", f"of={rw.url()}")
    assert o.returncode == 0, o.stderr
    run(peer("qemu-img"), "compare", src, rw.url())
    o = ours("bench", "-c", "200", "-w", "-f", "raw", "-o", "1M", "--pattern=0x5a", rw.url())
    assert o.returncode == 0, o.stderr
    assert o.stdout.startswith(b"Sending 200 write requests")
    run(peer("qemu-io"), "-f", "raw", "-c", "read -P 0x5a 1M 4k", rw.url())
    assert ours("bench", "-c", "100", rw.url()).returncode == 0
    # written to without a format: qemu's warning that probing guessed raw
    o, q = both("bench", "-w", "-c", "1", rw.url())
    assert (o[0], o[2]) == (q[0], q[2]) and q[2].startswith(b"WARNING: Image format was not specified")


def test_refusals_match_qemu(served: tuple[QemuNbd, QemuNbd], tmp_path: Path) -> None:
    rw, ro = served
    src = create_image(tmp_path / "src.raw", "raw", "4M")
    big = create_image(tmp_path / "big.raw", "raw", "8M")
    sock = rw.sock
    cases = [
        ("convert", "-n", "-O", "raw", src, ro.url()),  # a read-only export
        ("convert", "-O", "raw", src, ro.url()),
        ("dd", "-O", "raw", f"if={src}", f"of={ro.url()}"),
        ("convert", "-O", "raw", big, rw.url()),  # cannot grow
        ("convert", "-n", "-O", "raw", big, rw.url()),
        ("create", "-f", "raw", rw.url(), "8M"),
        ("info", f"nbd+unix:///nope?socket={sock}"),  # an export the server does not have
        ("info", f"nbd+unix:///exp?socket={tmp_path / 'absent.sock'}"),
        ("info", "nbd://"), ("info", "nbd+unix:///exp"), ("info", "nbd+foo://x"),
        ("info", "json:" + json.dumps({"driver": "nbd"})),
    ]
    for args in cases:
        rc, _out, err = same(*args)
        assert rc == 1 and err.startswith(b"qemu-img: "), (args, err)


BAD_JSON = [
    'json:{', 'json:', 'json:[]', 'json:{"a":1}}', 'json:{"driver":"qcow2" "x"}', 'json:{"driver":"qcow2",}',
    'json:{"a":[1 2]}', 'json:{x}', 'json:{"a":tru}',
    'json:{"driver":"foo","file":{"driver":"file","filename":"x.qcow2"}}',
    'json:{"driver":"qcow2"}',
    'json:{"driver":"qcow2","file":{"driver":"file"}}',
    'json:{"driver":"qcow2","foo":1,"file":{"driver":"file","filename":"x.qcow2"}}',
    'json:{"driver":"qcow2","file":{"driver":"file","filename":"x.qcow2","foo":"y"}}',
    'json:{"filename":"x.qcow2"}',
    'json:{"driver":"qcow2","file":"x.qcow2"}',
    'json:{"driver":"qcow2","file":{"driver":"file","filename":"nonexist"}}',
]
GOOD_JSON = [
    'json:{"driver":"qcow2","file":{"driver":"file","filename":"x.qcow2"}}',
    'json:{"file":{"driver":"file","filename":"x.qcow2"}}',
    'json:{"driver":"raw","file":{"filename":"x.qcow2"}}',
    'json:{"driver":"qcow2","file.filename":"x.qcow2"}',
    'json: {"driver":"qcow2","lazy-refcounts":"on","file":{"driver":"file","filename":"x.qcow2"}}',
]
IMAGE_OPTS = [
    "driver=qcow2,file.filename=x.qcow2", "driver=qcow2", "driver=qcow2,file.filename=x.qcow2,foo=1",
    "file.filename=x.qcow2", "driver=raw,file.driver=file,file.filename=x.qcow2",
    "driver=foo,file.filename=x.qcow2", "driver=qcow2,file.filename=nonexist", "driver=qcow2,,x",
    "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=1",
]


def test_json_and_image_opts_names(tmp_path: Path) -> None:
    img = create_image(tmp_path / "x.qcow2", "qcow2", "4M")
    fill(img, "qcow2")
    for name in BAD_JSON:
        rc, _out, err = same("info", name, cwd=tmp_path)
        assert rc == 1 and err.count(b"\n") == 1, (name, err)
    for name in GOOD_JSON:
        assert same("info", "--output=json", name, cwd=tmp_path)[0] == 0, name
        same("map", "--output=json", name, cwd=tmp_path)
        same("check", name, cwd=tmp_path)
    for opts in IMAGE_OPTS:
        same("info", "--output=json", "--image-opts", opts, cwd=tmp_path)
    good = "driver=qcow2,file.filename=x.qcow2"
    for verb in (("map", "--output=json"), ("check", "--output=json"), ("snapshot", "-l"), ("info",)):
        assert same(*verb, "--image-opts", good, cwd=tmp_path)[0] == 0
    same("compare", "--image-opts", good, "driver=raw,file.filename=x.qcow2", cwd=tmp_path)
    same("info", "-f", "qcow2", "--image-opts", good, cwd=tmp_path)
    # -f wins over a json: name's own driver
    for fmt in ("raw", "qcow2"):
        same("info", "-f", fmt, GOOD_JSON[0], cwd=tmp_path)
        same("map", "--output=json", "-f", fmt, GOOD_JSON[0], cwd=tmp_path)


def test_objects(tmp_path: Path) -> None:
    img = create_image(tmp_path / "x.qcow2", "qcow2", "1M")
    (tmp_path / "key").write_text("s3cret")
    for obj in ("foo,id=x", "secret,id=sec0,data=abc", "secret,data=abc", "secret,id=s,file=/nonexist",
                "secret,id=s,data=1,bogus=2", "qom-type=secret,id=s,data=1",
                f"secret,id=k,file={tmp_path}/key"):
        same("info", "--object", obj, img)
    same("info", "--object", "secret,id=s,data=1", "--object", "secret,id=s,data=1", img)
    same("check", "--object=secret,id=s,data=1", img)


def test_program_name_is_argv0(tmp_path: Path) -> None:
    """Linked as qemu-img, imagecore's messages and usage are qemu-img's; as imagecore, its own."""
    script = tmp_path / "imagecore-entry"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom imagecore.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for link in ("qemu-img", "imagecore"):
        (tmp_path / link).symlink_to(script)
    cases = [("info", "nonexist"), ("foo",), ("info",), ("check", "-r", "x", "y"), ("convert", "--bogus")]
    for args in cases:
        mine = subprocess.run([str(tmp_path / "qemu-img"), *args], capture_output=True, env=env,
                              cwd=tmp_path, timeout=60)
        theirs = qemu(*args, cwd=tmp_path)
        assert (mine.returncode, mine.stderr) == (theirs.returncode, theirs.stderr), args
        named = subprocess.run([str(tmp_path / "imagecore"), *args], capture_output=True, env=env,
                               cwd=tmp_path, timeout=60)
        assert named.stderr == theirs.stderr.replace(b"qemu-img", b"imagecore"), args
    usage = subprocess.run([str(tmp_path / "qemu-img"), "--help"], capture_output=True, env=env, timeout=60)
    assert usage.stdout.startswith(b"qemu-img version ")
    assert b"\nusage: qemu-img [standard options] command [command options]\n" in usage.stdout


def test_image_opts_for_verbs_that_edit_in_place(tmp_path: Path) -> None:
    """Each verb that edits an image, given it by --image-opts, on two copies: imagecore's and qemu-img's
    output, and the images they leave, are the same."""
    verbs = [("snapshot", "-c", "s1"), ("resize", "{}", "8M"), ("amend", "-o", "lazy_refcounts=on"),
             ("bitmap", "--add", "{}", "b0"), ("check", "-r", "all"), ("commit",), ("rebase", "-u", "-b", "")]
    for i, verb in enumerate(verbs):
        images = []
        for who in ("ours", "theirs"):
            d = tmp_path / f"{i}-{who}"
            d.mkdir()
            base = create_image(d / "base.qcow2", "qcow2", "4M")
            fill(base, "qcow2")
            top = create_image(d / "top.qcow2", "qcow2", "4M", "-b", "base.qcow2", "-F", "qcow2")
            run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x99 1M 64k", top)
            images.append((d, top))
        opts = "driver=qcow2,file.filename=top.qcow2"
        args = [a.replace("{}", "--image-opts") for a in verb]
        if "--image-opts" in args:
            args.insert(args.index("--image-opts") + 1, opts)
        else:
            args += ["--image-opts", opts]
        o = ours(*args, cwd=images[0][0])
        q = qemu(*args, cwd=images[1][0])
        assert (o.returncode, o.stdout, o.stderr.replace(b"imagecore: ", b"qemu-img: ")) == \
            (q.returncode, q.stdout, q.stderr), (args, o, q)
        infos = [json.loads(run(peer("qemu-img"), "info", "--output=json", top).stdout) for _d, top in images]
        for info in infos:
            info.pop("filename", None)
            info.pop("actual-size", None)
            info.pop("backing-filename", None)
            info.pop("full-backing-filename", None)
            for snap in info.get("snapshots", []):
                for key in ("date-sec", "date-nsec", "vm-clock-sec", "vm-clock-nsec"):
                    snap.pop(key, None)
        assert infos[0] == infos[1], args
        run(peer("qemu-img"), "check", images[0][1])
        run(peer("qemu-img"), "compare", images[0][1], images[1][1])


def test_json_backing_options(tmp_path: Path) -> None:
    """``backing``: null opens no backing file, options open another one; info (which opens no backing
    file) refuses options as qemu 7.2 does; convert follows what map shows."""
    base = create_image(tmp_path / "base.qcow2", "qcow2", "1M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 1 0 64k", base)
    alt = create_image(tmp_path / "alt.qcow2", "qcow2", "1M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 2 64k 64k", alt)
    top = create_image(tmp_path / "top.qcow2", "qcow2", "1M", "-b", "base.qcow2", "-F", "qcow2")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 3 512k 64k", top)
    file = {"driver": "file", "filename": "top.qcow2"}
    other = {"driver": "qcow2", "file": {"driver": "file", "filename": "alt.qcow2"}}
    missing = {"driver": "qcow2", "file": {"driver": "file", "filename": "nonexist"}}
    trees = [{"driver": "qcow2", "backing": None, "file": file},
             {"driver": "qcow2", "backing": other, "file": file},
             {"driver": "qcow2", "backing": "foo", "file": file},
             {"driver": "qcow2", "backing.file.filename": "alt.qcow2", "file": file},
             {"driver": "qcow2", "backing": missing, "file": file},
             {"driver": "raw", "backing": None, "file": file}]
    for tree in trees:
        name = "json:" + json.dumps(tree)
        for args in (("info",), ("map", "--output=json"), ("info", "--output=json", "--backing-chain")):
            same(*args, name, cwd=tmp_path)
    for i, tree in enumerate(trees[:2]):
        name = "json:" + json.dumps(tree)
        a, b = tmp_path / f"ours{i}.qcow2", tmp_path / f"theirs{i}.qcow2"
        assert ours("convert", "-O", "qcow2", name, a, cwd=tmp_path).returncode == 0
        assert qemu("convert", "-O", "qcow2", name, b, cwd=tmp_path).returncode == 0
        run(peer("qemu-img"), "compare", a, b)


@pytest.mark.parametrize("greeting", [b"garbage-garbage-garbage-xx", b"", b"NBDMAGIC"])
def test_broken_server_is_an_error_not_a_hang(greeting: bytes) -> None:
    """A server that sends no NBD greeting, or closes: one line on stderr, exit 1, no traceback."""
    import socket
    import threading

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]

    def serve() -> None:
        conn, _ = lsock.accept()
        conn.sendall(greeting)
        conn.close()

    t = threading.Thread(target=serve)
    t.start()
    try:
        o = ours("info", f"nbd://127.0.0.1:{port}/x")
    finally:
        t.join(30)
        lsock.close()
    assert o.returncode == 1 and o.stderr.count(b"\n") == 1, o.stderr
    assert o.stderr.startswith(f"imagecore: Could not open 'nbd://127.0.0.1:{port}/x': ".encode()), o.stderr


def test_target_image_opts(served: tuple[QemuNbd, QemuNbd], tmp_path: Path) -> None:
    """convert --target-image-opts: needs -n, refuses -O, takes the target's format from its options."""
    rw, _ro = served
    src = create_image(tmp_path / "src.raw", "raw", "4M")
    run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x21 64k 64k", "-c", "write -P 0x43 2M 4k", src)
    nbd_opts = f"driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={rw.sock},file.export=exp"
    for args in (("convert", "--target-image-opts", src, nbd_opts),
                 ("convert", "-n", "--target-image-opts", "-O", "raw", src, nbd_opts)):
        assert same(*args)[0] == 1
    assert same("convert", "-n", "--target-image-opts", src, nbd_opts)[0] == 0
    run(peer("qemu-img"), "compare", src, rw.url())
    a = create_image(tmp_path / "a.qcow2", "qcow2", "4M")
    b = create_image(tmp_path / "b.qcow2", "qcow2", "4M")
    o = ours("convert", "-n", "--target-image-opts", src, f"driver=qcow2,file.filename={a}")
    assert o.returncode == 0, o.stderr
    run(peer("qemu-img"), "convert", "-n", "--target-image-opts", src, f"driver=qcow2,file.filename={b}")
    run(peer("qemu-img"), "compare", a, b)
    run(peer("qemu-img"), "compare", src, a)
    run(peer("qemu-img"), "check", a)


def test_nbd_url_as_backing_file(served: tuple[QemuNbd, QemuNbd], tmp_path: Path) -> None:
    """A qcow2 overlay whose backing file is an NBD URL: the name is not taken relative to the overlay's
    folder (qemu's path_combine leaves protocol names alone), and every verb reads through it."""
    _rw, ro = served
    sub = tmp_path / "sub"
    sub.mkdir()
    o = ours("create", "-f", "qcow2", "-b", ro.url(), "-F", "raw", sub / "ov.qcow2")
    assert o.returncode == 0, o.stderr
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x11 2M 64k", sub / "ov.qcow2")
    for args in (("info",), ("info", "--output=json", "--backing-chain"), ("map", "--output=json"),
                 ("check",)):
        same(*args, "sub/ov.qcow2", cwd=tmp_path)
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    assert ours("convert", "-O", "raw", sub / "ov.qcow2", a).returncode == 0
    run(peer("qemu-img"), "convert", "-O", "raw", sub / "ov.qcow2", b)
    assert a.read_bytes() == b.read_bytes()
    missing = ro.url("nope")
    rc, _out, err = same("create", "-f", "qcow2", "-b", missing, "-F", "raw", "sub/o2.qcow2", cwd=tmp_path)
    assert rc == 1 and err.endswith(b"Could not open backing image.\n")


@pytest.mark.parametrize("extra", [(), ("--no-sr",)], ids=["structured", "simple-replies"])
def test_against_nbdkit(tmp_path: Path, extra: tuple[str, ...]) -> None:
    """nbdkit's memory plugin, with and without structured replies (then no block status either)."""
    sock, pid = tmp_path / "kit.sock", tmp_path / "kit.pid"
    run(peer("nbdkit"), "-U", sock, "-P", pid, *extra, "memory", "8M")
    try:
        url = f"nbd+unix:///?socket={sock}"
        src = create_image(tmp_path / "s.raw", "raw", "8M")
        run(peer("qemu-io"), "-f", "raw", "-c", "write -P 7 1M 1M", "-c", "write -P 9 7M 4k", src)
        o = ours("convert", "-n", "-O", "raw", src, url)
        assert o.returncode == 0, o.stderr
        for args in (("map", "--output=json", url), ("info", url), ("compare", src, url)):
            same(*args)
        back = tmp_path / "back.raw"
        assert ours("convert", "-O", "raw", url, back).returncode == 0
        assert back.read_bytes() == src.read_bytes()
    finally:
        os.kill(int(pid.read_text()), 15)


@pytest.mark.parametrize("name", [
    'json:{"driver": "nbd", "host": -1}',  # a number where a string belongs (iotest 162)
    "nbd://no-such-host.invalid:10809/x",
    "json:{'driver': 'nbd', 'host': 'no-such-host.invalid', 'port': '10809'}",
])
def test_a_name_that_does_not_resolve_is_worded_as_qemu_img(name: str) -> None:
    code, _out, err = same("info", name)
    assert code == 1 and b"address resolution failed for " in err
