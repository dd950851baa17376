"""Differential tests of qemu-img's exact words where imagecore once differed: empty and malformed -o
lists, backing-file open errors at every depth of a chain for every verb that opens one, and messages
qemu-img spreads over two lines."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.peers import imagecore_cmd, peer, run

Proc = subprocess.CompletedProcess[bytes]


def qemu_img() -> str:
    return peer("qemu-img")


def both(cwd: Path, *args: str, prefix: tuple[str, ...] = ()) -> tuple[Proc, Proc]:
    """qemu-img and imagecore run with the same arguments in ``cwd`` (under ``prefix``, a command such as
    setpriv that runs them as another user)."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    q = subprocess.run([*prefix, qemu_img(), *args], capture_output=True, cwd=cwd, timeout=120, env=env)
    o = subprocess.run([*prefix, *imagecore_cmd(), *args], capture_output=True, cwd=cwd, timeout=120,
                       env=env)
    assert b"Traceback" not in o.stderr, o.stderr
    return q, o


def same(q: Proc, o: Proc) -> None:
    """Exit code, stdout and every line of stderr as qemu-img's."""
    assert (o.returncode, o.stdout, o.stderr.replace(b"imagecore: ", b"qemu-img: ")) == \
        (q.returncode, q.stdout, q.stderr)


# -- -o option lists ------------------------------------------------------------------------------------

VERBS_WITH_O = {
    "create": ["create", "-f", "qcow2", "OPT", "new.qcow2", "1M"],
    "create-nofile": ["create", "OPT"],
    "convert": ["convert", "-O", "qcow2", "OPT", "a.qcow2", "new.qcow2"],
    "convert-bitmaps": ["convert", "OPT", "--skip-broken-bitmaps", "a.qcow2", "new.qcow2"],
    "amend": ["amend", "-f", "qcow2", "OPT", "a.qcow2"],
    "measure": ["measure", "-O", "qcow2", "OPT", "a.qcow2"],
    "measure-size": ["measure", "OPT", "--size", "x"],
}


@pytest.mark.parametrize("options", ["", ",", ",a", "size=1M,", "help,", "a,,,"])
@pytest.mark.parametrize("verb", sorted(VERBS_WITH_O))
def test_invalid_option_lists(work: Path, verb: str, options: str) -> None:
    """An empty -o, a leading comma or an odd trailing comma is refused while the options are read:
    ``Invalid option list: ...``, exit code 1, nothing created."""
    run(qemu_img(), "create", "-q", "-f", "qcow2", work / "a.qcow2", "1M")
    args = [a for arg in VERBS_WITH_O[verb] for a in (["-o", options] if arg == "OPT" else [arg])]
    q, o = both(work, *args)
    assert q.returncode == 1 and q.stderr == f"qemu-img: Invalid option list: {options}\n".encode()
    same(q, o)
    assert not (work / "new.qcow2").exists()


# -- backing files that do not open -------------------------------------------------------------------

# every verb that opens an image with its backing chain, and how it names the image (t.qcow2, whose chain
# is broken); o.qcow2 and n.qcow2 are sound images without backing files
CHAIN_VERBS = {
    "info": ["info", "--backing-chain", "t.qcow2"],
    "info-json": ["info", "--backing-chain", "--output=json", "t.qcow2"],
    "check": ["check", "t.qcow2"],
    "map": ["map", "t.qcow2"],
    "convert": ["convert", "-O", "raw", "t.qcow2", "out.raw"],
    "convert-second-source": ["convert", "-O", "raw", "o.qcow2", "t.qcow2", "out.raw"],
    "convert-target-backing": ["convert", "-O", "qcow2", "-B", "t.qcow2", "-F", "qcow2", "o.qcow2",
                               "out.qcow2"],
    "compare": ["compare", "t.qcow2", "o.qcow2"],
    "compare-second": ["compare", "o.qcow2", "t.qcow2"],
    "commit": ["commit", "t.qcow2"],
    "rebase": ["rebase", "-b", "n.qcow2", "-F", "qcow2", "t.qcow2"],
    "rebase-onto": ["rebase", "-b", "t.qcow2", "-F", "qcow2", "o.qcow2"],
    "measure": ["measure", "-O", "qcow2", "t.qcow2"],
    "bench": ["bench", "-c", "1", "t.qcow2"],
    "dd": ["dd", "if=t.qcow2", "of=out.raw", "-O", "raw"],
    "resize": ["resize", "t.qcow2", "2M"],
    "snapshot-list": ["snapshot", "-l", "t.qcow2"],
    "snapshot-create": ["snapshot", "-c", "s1", "t.qcow2"],
    "create": ["create", "-f", "qcow2", "-b", "t.qcow2", "-F", "qcow2", "new.qcow2"],
}


def _broken_chain(folder: Path, kind: str, depth: int) -> None:
    """t.qcow2 -> b.img (depth 1) or t.qcow2 -> m.qcow2 -> b.img (depth 2), where b.img is missing, not the
    qcow2 image its referrer says it is, or unreadable (mode 000, for a user other than root)."""
    def q(*args: str) -> None:
        run(qemu_img(), *args)

    if kind == "wrong-format":
        (folder / "b.img").write_bytes(bytes(1 << 20))
    else:
        q("create", "-q", "-f", "qcow2", str(folder / "b.img"), "1M")
    top_backing = "b.img"
    if depth == 2:
        q("create", "-q", "-f", "qcow2", "-u", "-b", "b.img", "-F", "qcow2", str(folder / "m.qcow2"), "1M")
        top_backing = "m.qcow2"
    q("create", "-q", "-f", "qcow2", "-u", "-b", top_backing, "-F", "qcow2", str(folder / "t.qcow2"), "1M")
    for name in ("o.qcow2", "n.qcow2"):
        q("create", "-q", "-f", "qcow2", str(folder / name), "1M")
    for f in folder.iterdir():
        f.chmod(0o666)
    if kind == "missing":
        (folder / "b.img").unlink()
    elif kind == "unreadable":
        (folder / "b.img").chmod(0)


@pytest.mark.parametrize("verb", sorted(CHAIN_VERBS))
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("kind", ["missing", "wrong-format", "unreadable"])
def test_backing_open_errors_as_qemu_img(work: Path, kind: str, depth: int, verb: str) -> None:
    """A backing file that does not open, at depth 1 or 2 of the chain: every verb words it as qemu-img,
    one "Could not open backing file: " per level after "Could not open 'IMAGE': ", with its exit code."""
    import tempfile

    prefix: tuple[str, ...] = ()
    if kind == "unreadable":
        if os.getuid() != 0:
            pytest.skip("an unreadable file for another user needs root to switch to that user")
        prefix = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
    # a folder any user can reach (the test's own tmp_path is root's alone)
    base = Path(tempfile.mkdtemp(prefix="imagecore-backing-"))
    try:
        base.chmod(0o777)
        results = []
        for tool in ("qemu", "ours"):
            folder = base / tool
            folder.mkdir()
            folder.chmod(0o777)
            _broken_chain(folder, kind, depth)
            cmd = [qemu_img()] if tool == "qemu" else imagecore_cmd()
            env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
            p = subprocess.run([*prefix, *cmd, *CHAIN_VERBS[verb]], capture_output=True, cwd=folder,
                               timeout=120, env=env)
            assert b"Traceback" not in p.stderr, p.stderr
            results.append((p.returncode, p.stdout, p.stderr.replace(b"imagecore: ", b"qemu-img: ")))
        assert results[1] == results[0]
        q_code, _, q_err = results[0]
        levels = 0 if verb.startswith("info") else depth + (verb == "convert-target-backing")
        assert q_code != 0 and q_err.count(b"Could not open backing file: ") == levels, q_err
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- create -o data_file=... ---------------------------------------------------------------------------

def _layout(img: Path) -> list[tuple[int, int, bool]]:
    """Which parts of a file hold blocks, as qemu-img map of the file as raw shows it."""
    runs = json.loads(run(qemu_img(), "map", "-f", "raw", "--output=json", img).stdout)
    return [(r["start"], r["length"], r["data"]) for r in runs]


@pytest.mark.parametrize("opts", [
    "data_file=DF", "data_file=DF,data_file_raw=on", "data_file=DF,data_file_raw=on,extended_l2=on",
    "data_file=DF,preallocation=metadata", "data_file=DF,preallocation=falloc",
    "preallocation=metadata", "preallocation=metadata,extended_l2=on", "preallocation=falloc"])
@pytest.mark.parametrize("size", ["8M", "100001", "3k"])
def test_create_layout_as_qemu_img(work: Path, opts: str, size: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The image file (and its data file) hold the same blocks as qemu-img's: the whole first cluster; in
    a data file its first block, which qemu's file driver writes into a file it grows from empty; with
    preallocation, the zeroes qemu writes after the end of the disk in its last (sub)cluster, and the
    length that leaves. So qemu-img map (which tells metadata preallocation by the image file's
    allocation) and info's disk size are the same."""
    monkeypatch.chdir(work)  # the data file's name is relative to the working directory, as qemu-img made it
    for name, cmd in (("q", [qemu_img()]), ("o", imagecore_cmd())):
        p = subprocess.run([*cmd, "create", "-q", "-f", "qcow2", "-o", opts.replace("DF", f"{name}.df"),
                            f"{name}.qcow2", size], capture_output=True, cwd=work, timeout=120)
        assert p.returncode == 0, p.stderr
    assert _layout(Path("o.qcow2")) == _layout(Path("q.qcow2"))
    if "data_file" in opts:
        assert _layout(Path("o.df")) == _layout(Path("q.df"))
    assert run(qemu_img(), "map", "--output=json", "o.qcow2").stdout == \
        run(qemu_img(), "map", "--output=json", "q.qcow2").stdout

    def disk_size(img: str) -> object:
        return json.loads(run(qemu_img(), "info", "--output=json", img).stdout)["actual-size"]
    assert disk_size("o.qcow2") == disk_size("q.qcow2")
    run(qemu_img(), "check", "o.qcow2")
    run(qemu_img(), "compare", "q.qcow2", "o.qcow2")


# -- messages of several lines ------------------------------------------------------------------------

MULTI_LINE = [
    # two error_report lines
    ["create", "-f", "raw", "x.raw", "1Q"],
    ["create", "-f", "raw", "x.raw", "1.5"],
    ["create", "-f", "raw", "x.raw", "1 k"],
    ["measure", "-O", "qcow2", "-l", "snapshot.foo=1", "a.qcow2"],
    ["measure", "-O", "qcow2", "-o", "cluster_size=xyz", "a.qcow2"],
    # a message and qemu's hint lines (QemuOpts' size hint)
    ["create", "-f", "qcow2", "-o", "size=1Q", "x.qcow2"],
    ["create", "-f", "qcow2", "-o", "cluster_size=xyz", "x.qcow2", "1M"],
    ["convert", "-O", "qcow2", "-o", "cluster_size=xyz", "a.qcow2", "x.qcow2"],
    ["resize", "a.qcow2", "1.5"],
    # a message and a hint of create's
    ["create", "-f", "qcow2", "-b", "nope.qcow2", "-F", "qcow2", "x.qcow2"],
    ["create", "-f", "qcow2", "-b", "a.qcow2", "-F", "nope", "x.qcow2"],
    ["create", "-f", "qcow2", "-b", "r.raw", "-F", "qcow2", "x.qcow2"],
    # "Detected format of qcow2." ends without a newline in qemu-img 7.2
    ["create", "-f", "qcow2", "-b", "a.qcow2", "x.qcow2"],
    ["create", "-f", "vmdk", "-b", "a.qcow2", "x.vmdk"],
]

ONE_LINE = [
    ["create", "-f", "qcow2", "-o", "size=16E", "x.qcow2"],
    ["create", "-f", "qcow2", "-b", "nope.qcow2", "-F", "qcow2", "-u", "x.qcow2"],
    ["create", "-f", "qcow2", "-b", "", "-F", "qcow2", "x.qcow2", "1M"],
    ["create", "-f", "qcow2", "-u", "-b", "a.qcow2", "x.qcow2", "1M"],
    ["create", "-f", "raw", "-b", "a.qcow2", "-F", "qcow2", "x.raw", "1M"],
    ["create", "-f", "raw", "-F", "qcow2", "x.raw", "1M"],
    ["create", "-f", "raw", "-o", "preallocation=bogus", "x.raw", "1M"],
    ["create", "-f", "raw", "-o", "preallocation=metadata", "x.raw", "1M"],
    ["convert", "-O", "raw", "-t", "bogus", "a.qcow2", "x.raw"],
    ["convert", "-O", "raw", "-T", "bogus", "a.qcow2", "x.raw"],
    ["convert", "-O", "qcow2", "-l", "nope", "a.qcow2", "x.qcow2"],
    ["convert", "-O", "qcow2", "-B", "nope.qcow2", "-F", "qcow2", "r.raw", "x.qcow2"],
    ["compare", "--output=json", "a.qcow2", "a.qcow2"],
    ["measure", "-O", "qcow2", "--size", "9E"],
    # formats qemu has but cannot create (qemu's iotests 082 and 113): named, not "Unknown file format"
    ["create", "-f", "bochs", "x.img", "1M"],
    ["create", "-f", "bochs", "-o", "help"],
    ["create", "-f", "vvfat", "nbd://example.com", "64M"],
    ["convert", "-O", "bochs", "-o", "help"],
    ["convert", "-O", "cloop", "r.raw", "x.img"],
    ["amend", "-f", "bochs", "-o", "help"],
    ["amend", "-f", "nope", "-o", "help"],
    ["measure", "-O", "vvfat", "--size", "1M"],
]


@pytest.mark.parametrize("args", MULTI_LINE + ONE_LINE, ids=[" ".join(a) for a in MULTI_LINE + ONE_LINE])
def test_error_lines_as_qemu_img(work: Path, args: list[str]) -> None:
    """Every line qemu-img prints for a refusal, with its prefix or bare as qemu-img has it (its hints, a
    message's continuation), and nothing more; and what the refusal leaves behind."""
    run(qemu_img(), "create", "-q", "-f", "qcow2", work / "a.qcow2", "1M")
    run(qemu_img(), "create", "-q", "-f", "raw", work / "r.raw", "1M")
    results = []
    for name in ("qemu", "ours"):
        d = work / name
        d.mkdir()
        for f in ("a.qcow2", "r.raw"):
            shutil.copy(work / f, d / f)
        p = subprocess.run([*([qemu_img()] if name == "qemu" else imagecore_cmd()), *args],
                           capture_output=True, cwd=d, timeout=120)
        err = p.stderr.replace(b"imagecore: ", b"qemu-img: ")
        err = err.replace(b"'imagecore --help'", b"'qemu-img --help'")
        results.append((p.returncode, p.stdout, err, sorted(f.name for f in d.iterdir())))
    assert results[1] == results[0]
    q_code, _, q_err, _ = results[0]
    assert q_code == 1
    message = q_err.removesuffix(b"Try 'qemu-img --help' for more information\n")
    assert (message.count(b"\n") > 1 or not message.endswith(b"\n")) == (args in MULTI_LINE), q_err


@pytest.mark.parametrize("action", [["-c", "s"], ["-d", "s"], ["-a", "s"], ["-l"]], ids=lambda a: a[0])
def test_snapshots_of_an_image_with_a_data_file_as_qemu_img(work: Path, action: list[str]) -> None:
    """qcow2 refuses internal snapshots with an external data file; qemu-img words each action its own way
    (qemu's iotest 244): the messages, exit codes and the untouched image are qemu-img's."""
    results = []
    for name in ("qemu", "ours"):
        d = work / name
        d.mkdir()
        run(qemu_img(), "create", "-q", "-f", "qcow2", "-o", f"data_file={d / 'd.raw'}", d / "x.qcow2", "1M")
        before = (d / "x.qcow2").read_bytes()
        p = subprocess.run([*([qemu_img()] if name == "qemu" else imagecore_cmd()), "snapshot", *action,
                            "x.qcow2"], capture_output=True, cwd=d, timeout=120)
        assert (d / "x.qcow2").read_bytes() == before
        results.append((p.returncode, p.stdout, p.stderr.replace(b"imagecore: ", b"qemu-img: ")))
    assert results[1] == results[0]
    assert results[0][0] == (0 if action == ["-l"] else 1)


@pytest.mark.parametrize("bfmt", ["host_device", "file", "vvfat", "blkdebug", "nosuch", "raw-format"])
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_unsafe_rebase_takes_any_driver_qemu_has(work: Path, bfmt: str, compat: str) -> None:
    """qemu-img rebase -u -F takes the name of any driver qemu has, even one that is not an image format
    (qemu's iotest 031 writes host_device): the same exit code, messages and header bytes."""
    results = []
    for name in ("qemu", "ours"):
        d = work / name
        d.mkdir()
        run(qemu_img(), "create", "-q", "-f", "qcow2", "-o", f"compat={compat}", d / "x.qcow2", "1M")
        p = subprocess.run([*([qemu_img()] if name == "qemu" else imagecore_cmd()), "rebase", "-u", "-b",
                            "/some/backing/file/path", "-F", bfmt, "x.qcow2"], capture_output=True, cwd=d,
                           timeout=120)
        results.append((p.returncode, p.stdout, p.stderr.replace(b"imagecore: ", b"qemu-img: "),
                        (d / "x.qcow2").read_bytes()))
    assert results[1] == results[0]
    assert results[0][0] == (1 if bfmt in ("nosuch", "raw-format") else 0)
