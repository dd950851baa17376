"""Differential tests of qemu-img's exact words where imagecore once differed: empty and malformed -o
lists, backing-file open errors at every depth of a chain for every verb that opens one, and messages
qemu-img spreads over two lines."""

from __future__ import annotations

import os
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
