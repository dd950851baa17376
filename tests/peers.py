"""Finding the real peers the tests talk to; under CI=true a missing peer fails instead of skipping."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VAR = REPO / "var"
QEMU10_BIN = Path(os.environ.get("NBDSRV_QEMU10_BIN", VAR / "qemu10" / "usr" / "bin"))
SYSTEM_PYTHON = "/usr/bin/python3"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str) -> None:
    """Fail under CI, skip elsewhere."""
    if in_ci():
        pytest.fail(f"required peer {what} is missing (CI=true)")
    pytest.skip(f"{what} is not installed")


def peer(name: str) -> str:
    """Absolute path of a peer program such as qemu-img or nbdinfo."""
    path = shutil.which(name)
    if path is None:
        missing(name)
        raise AssertionError("unreachable")
    return path


def qemu10(name: str) -> str:
    """A qemu 10 program (qemu-img, qemu-io, qemu-nbd, qemu-storage-daemon) from the unpacked backport."""
    path = QEMU10_BIN / name
    if not path.exists():
        missing(f"qemu 10 {name} (run scripts/setup)")
    return str(path)


def run(*args: str | os.PathLike[str], check: bool = True, input: bytes | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    """Run a command and capture its output; on failure the assertion shows stderr."""
    proc = subprocess.run([str(a) for a in args], capture_output=True, input=input, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited {proc.returncode}\n"
            f"stdout: {proc.stdout.decode(errors='replace')}\nstderr: {proc.stderr.decode(errors='replace')}")
    return proc


def imagecore_cmd() -> list[str]:
    """How to run the project's own `imagecore` command."""
    import sys

    return [sys.executable, "-m", "imagecore.cli"]


OUR_HINT = "Try 'imagecore --help' for more information\n"
QEMU_HINT = "Try 'qemu-img --help' for more information\n"


def one_error_as_qemu(ours: subprocess.CompletedProcess[bytes],
                      qemu: subprocess.CompletedProcess[bytes]) -> str:
    """imagecore's stderr is qemu-img's error lines, as many as qemu-img prints (its messages of two lines,
    its hints after a message), with the pointer to --help exactly where qemu-img prints one."""
    text = ours.stderr.decode()
    assert "Traceback" not in text and text.startswith("imagecore: "), text
    pointed = text.endswith(OUR_HINT)
    assert pointed == qemu.stderr.decode().endswith(QEMU_HINT), (text, qemu.stderr)
    assert text.count("\n") == qemu.stderr.decode().count("\n"), (text, qemu.stderr)
    return text
