"""The lock matrix: every imagecore verb, and nbdsrv's exports, against every kind of holder of the image.

Holders are qemu-io and qemu-nbd (read-write and read-only), nbdsrv with a client attached (read-write and
read-only export) and another imagecore process. In each cell the reference is what qemu-img (for a verb)
or qemu-nbd (for an export) does against the same holder: the same exit code and the same message, or the
same open-or-refuse outcome.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.interop.nbdsrv_fixture import start_server
from tests.peers import REPO, imagecore_cmd, peer, run

VERBS = [
    ["info", "a.qcow2"], ["info", "-U", "a.qcow2"], ["check", "a.qcow2"], ["check", "-U", "a.qcow2"],
    ["check", "-r", "all", "a.qcow2"], ["check", "-r", "leaks", "-U", "a.qcow2"], ["map", "a.qcow2"],
    ["map", "-U", "a.qcow2"], ["convert", "-O", "raw", "a.qcow2", "o.raw"],
    ["convert", "-U", "-O", "raw", "a.qcow2", "o.raw"], ["convert", "-O", "qcow2", "b.qcow2", "a.qcow2"],
    ["convert", "-n", "-O", "qcow2", "b.qcow2", "a.qcow2"], ["create", "-f", "qcow2", "a.qcow2", "64M"],
    # a.qcow2 as the backing file of a new image: only its size is read, under info's locks.
    ["create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "c.qcow2"],
    # commit opens its top read-write (a.qcow2 has no backing file: refused after the open)
    ["commit", "a.qcow2"], ["bench", "-c", "1", "a.qcow2"], ["bench", "-c", "1", "-U", "a.qcow2"],
    ["bench", "-c", "1", "-w", "a.qcow2"],
]
# vmdk's create opens its parent (to read its CID) with the locks of a plain read.
VMDK_VERBS = [["create", "-f", "vmdk", "-b", "v.vmdk", "-F", "vmdk", "w.vmdk"], ["info", "v.vmdk"],
              ["convert", "-O", "vmdk", "b.qcow2", "v.vmdk"]]

# A process that holds an image through imagecore's own opener until its stdin closes.
IMAGECORE_HOLDER = """
import asyncio, sys
from imagecore import formats
from imagecore.driver import ImageOpener

async def main() -> None:
    drv = await ImageOpener(lock=True).open(sys.argv[1], sys.argv[3], read_only=sys.argv[2] == "ro")
    print("held", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await drv.close()

asyncio.run(main())
"""


def _wait_for(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        assert proc.poll() is None, f"{what} exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{what} did not start"
        time.sleep(0.02)


def _qemu_nbd_ready(sock: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    _wait_for(sock, proc, what)
    deadline = time.monotonic() + 20
    # the socket is bound before it listens: retry until a client is served
    while run(peer("qemu-img"), "info", "-f", "raw", f"nbd+unix:///?socket={sock}", check=False).returncode:
        assert proc.poll() is None, f"{what} exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{what} serves no client"
        time.sleep(0.05)


@contextmanager
def _process(cmd: list[str], cwd: Path, *, ready: Callable[[subprocess.Popen[bytes]], None],
             env: dict[str, str] | None = None) -> Iterator[None]:
    proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    try:
        ready(proc)
        yield
    finally:
        proc.kill()
        proc.wait()


def _qemu_io_ready(proc: subprocess.Popen[bytes]) -> None:
    # qemu-io answers a command only once the image is open with its locks.
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"read 0 512\n")
    proc.stdin.flush()
    assert b"read" in proc.stdout.readline(), proc.stderr.read() if proc.stderr else b""


@contextmanager
def hold(kind: str, work: Path, name: str = "a.qcow2") -> Iterator[None]:
    img = work / name
    fmt = img.suffix[1:]
    if kind in ("qemu-io", "qemu-io -r"):
        ro = ["-r"] if kind.endswith("-r") else []
        with _process([peer("qemu-io"), *ro, "-f", fmt, str(img)], work, ready=_qemu_io_ready):
            yield
    elif kind in ("qemu-nbd", "qemu-nbd -r"):
        sock = work / "holder.sock"
        ro = ["-r"] if kind.endswith("-r") else []
        # qemu-nbd listens before it opens the image, so the holder is ready (its locks taken) only once
        # a client has been served; -t keeps it serving after that client.
        with _process([peer("qemu-nbd"), "-t", *ro, "-f", fmt, "-k", str(sock), str(img)], work,
                      ready=lambda p: _qemu_nbd_ready(sock, p, kind)):
            yield
    elif kind in ("nbdsrv", "nbdsrv --read-only"):
        ro = ["--read-only"] if kind.endswith("only") else []
        srv = start_server(work / "srv", "--image", str(img), "--format", fmt, *ro, use_pool=False)
        try:
            # nbdsrv opens an image when a client chooses it (GO), so a client stays attached.
            with _process([peer("qemu-io"), "-r", "-f", "raw", f"nbd+unix:///?socket={srv.sock}"], work,
                          ready=_qemu_io_ready):
                yield
        finally:
            srv.stop()
    elif kind in ("imagecore", "imagecore read-only"):
        mode = "ro" if kind.endswith("only") else "rw"
        env = dict(os.environ, PYTHONPATH=str(REPO))

        def ready(p: subprocess.Popen[bytes]) -> None:
            assert p.stdout is not None and p.stdout.readline() == b"held\n"

        with _process([sys.executable, "-c", IMAGECORE_HOLDER, str(img), mode, fmt], work, ready=ready,
                      env=env):
            yield
    else:
        raise AssertionError(kind)


HOLDERS = ["qemu-io", "qemu-io -r", "qemu-nbd", "qemu-nbd -r", "nbdsrv", "nbdsrv --read-only", "imagecore",
           "imagecore read-only"]


def _outcome(cmd: list[str], cwd: Path, prog: str) -> tuple[int, str]:
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60)
    return p.returncode, p.stderr.replace(prog + ":", "PROG:")


def _fresh(work: Path) -> None:
    for name in ("a.qcow2", "b.qcow2"):
        run(peer("qemu-img"), "create", "-q", "-f", "qcow2", work / name, "64M")
    run(peer("qemu-img"), "create", "-q", "-f", "vmdk", work / "v.vmdk", "64M")
    for name in SCRATCH:
        (work / name).unlink(missing_ok=True)


SCRATCH = ("o.raw", "c.qcow2", "w.vmdk")


@pytest.mark.parametrize("holder", HOLDERS)
def test_every_verb_against_holder(tmp_path: Path, holder: str) -> None:
    _fresh(tmp_path)
    cells: list[tuple[str, tuple[int, str], tuple[int, str]]] = []
    for held, verbs in (("a.qcow2", VERBS), ("v.vmdk", VMDK_VERBS)):
        with hold(holder, tmp_path, held):
            for verb in verbs:
                want = _outcome([peer("qemu-img"), *verb], tmp_path, "qemu-img")
                for name in SCRATCH:
                    (tmp_path / name).unlink(missing_ok=True)
                got = _outcome([*imagecore_cmd(), *verb], tmp_path, "imagecore")
                for name in SCRATCH:
                    (tmp_path / name).unlink(missing_ok=True)
                cells.append((" ".join(verb), want, got))
    wrong = [(verb, want, got) for verb, want, got in cells if want != got]
    assert wrong == [], "\n".join(f"{v}: qemu-img {w} imagecore {g}" for v, w, g in wrong)
    # The matrix has both outcomes in it, so that a holder that holds nothing cannot pass unnoticed.
    if holder in ("qemu-io", "qemu-nbd", "nbdsrv", "imagecore"):
        assert any(want[0] != 0 for _, want, _ in cells)


def _qemu_nbd_opens(work: Path, read_only: bool) -> bool:
    """Whether qemu-nbd serves the image; it listens before it opens it, so a client has to ask."""
    sock = work / "subject.sock"
    sock.unlink(missing_ok=True)
    ro = ["-r"] if read_only else []
    proc = subprocess.Popen([peer("qemu-nbd"), *ro, "-f", "qcow2", "-k", str(sock), "a.qcow2"], cwd=work,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            if proc.poll() is not None:
                return False
            assert time.monotonic() < deadline
            time.sleep(0.02)
        p = run(peer("qemu-img"), "info", "-f", "raw", f"nbd+unix:///?socket={sock}", check=False)
        return p.returncode == 0
    finally:
        proc.kill()
        proc.wait()


def _nbdsrv_opens(work: Path, read_only: bool) -> bool:
    srv = start_server(work / "subject", "--image", str(work / "a.qcow2"), "--format", "qcow2",
                       *(["--read-only"] if read_only else []), use_pool=False)
    try:
        p = run(peer("qemu-img"), "info", "-f", "raw", f"nbd+unix:///?socket={srv.sock}", check=False)
        if p.returncode != 0:
            assert b"lock" in p.stderr, p.stderr  # refused with the reason, not "no such export"
        return p.returncode == 0
    finally:
        srv.stop()


@pytest.mark.parametrize("holder", [h for h in HOLDERS if not h.startswith("nbdsrv")])
def test_nbdsrv_export_against_holder(tmp_path: Path, holder: str) -> None:
    """nbdsrv's read-write and read-only exports open exactly where qemu-nbd and qemu-nbd -r open."""
    _fresh(tmp_path)
    with hold(holder, tmp_path):
        for read_only in (False, True):
            want = _qemu_nbd_opens(tmp_path, read_only)
            assert _nbdsrv_opens(tmp_path, read_only) == want, (holder, read_only, want)
