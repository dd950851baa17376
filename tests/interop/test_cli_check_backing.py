"""`imagecore check` of an image whose backing chain misses a file: qemu-img's message and exit code 1."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.interop.test_cli_failures import both, qemu_img, same
from tests.peers import run


@pytest.mark.parametrize("args", [[], ["-U"], ["-r", "leaks"], ["--output=json"], ["-f", "qcow2"]])
def test_check_missing_backing_file(work: Path, args: list[str]) -> None:
    d = work / "d"
    d.mkdir()
    run(qemu_img(), "create", "-q", "-f", "qcow2", d / "b.qcow2", "1M")
    run(qemu_img(), "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", d / "t.qcow2")
    (d / "b.qcow2").unlink()
    q, o = both(work, "check", *args, "d/t.qcow2")
    assert q.returncode == 1
    same(q, o)
    assert b"Could not open backing file: Could not open 'd/b.qcow2'" in q.stderr


def test_check_missing_backing_file_deeper_in_the_chain(work: Path) -> None:
    run(qemu_img(), "create", "-q", "-f", "qcow2", work / "a.qcow2", "1M")
    run(qemu_img(), "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", work / "b.qcow2")
    run(qemu_img(), "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", work / "c.qcow2")
    (work / "a.qcow2").unlink()
    q, o = both(work, "check", "c.qcow2")
    assert q.returncode == 1
    same(q, o)


def test_check_missing_vmdk_parent(work: Path) -> None:
    run(qemu_img(), "create", "-q", "-f", "vmdk", work / "p.vmdk", "1M")
    run(qemu_img(), "create", "-q", "-f", "vmdk", "-b", "p.vmdk", "-F", "vmdk", work / "c.vmdk")
    (work / "p.vmdk").unlink()
    q, o = both(work, "check", "c.vmdk")
    assert q.returncode == 1
    same(q, o)


def test_check_with_backing_present_still_checks(work: Path) -> None:
    run(qemu_img(), "create", "-q", "-f", "qcow2", work / "b.qcow2", "1M")
    run(qemu_img(), "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", work / "t.qcow2")
    q, o = both(work, "check", "t.qcow2")
    assert q.returncode == 0
    same(q, o)
