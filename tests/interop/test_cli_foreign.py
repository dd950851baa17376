"""Foreign formats: images in formats imagecore cannot open yet (bochs, dmg, cloop) are named and refused,
never read as raw; probing a raw image warns where qemu-img warns."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from imagecore.formats.foreign import CLOOP_MAGIC
from tests.peers import imagecore_cmd, peer


def ours(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*imagecore_cmd(), *map(str, args)], capture_output=True, timeout=60, cwd=cwd)


def qemu(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([peer("qemu-img"), *map(str, args)], capture_output=True, timeout=60, cwd=cwd)


def refused(proc: subprocess.CompletedProcess[bytes], path: Path, fmt: str) -> None:
    text = proc.stderr.decode()
    assert proc.returncode == 1, text
    assert "Traceback" not in text
    assert text.startswith(f"imagecore: Could not open '{path}': Driver '{fmt}' is not whitelisted\n"), text


def test_signatureless_formats_dmg_by_name_and_cloop_by_script(tmp_path: Path) -> None:
    dmg = tmp_path / "apple.dmg"
    dmg.write_bytes(b"\1" * 4096)
    refused(ours("info", dmg), dmg, "dmg")
    cloop = tmp_path / "knoppix.img"
    cloop.write_bytes(CLOOP_MAGIC + bytes(4096))
    refused(ours("info", cloop), cloop, "cloop")
    # qemu probes neither an empty file nor a name alone: an empty ``.dmg`` is raw there and here.
    empty = tmp_path / "empty.dmg"
    empty.write_bytes(b"")
    assert json.loads(qemu("info", "--output=json", empty).stdout)["format"] == "raw"
    assert json.loads(ours("info", "--output=json", empty).stdout)["format"] == "raw"


def test_bochs_header_is_recognised(tmp_path: Path) -> None:
    head = bytearray(512)
    head[0:23] = b"Bochs Virtual HD Image\0"
    head[32:40] = b"Redolog\0"
    head[48:56] = b"Growing\0"
    head[64:68] = (0x00020000).to_bytes(4, "little")
    img = tmp_path / "old.img"
    img.write_bytes(bytes(head) + bytes(4096))
    refused(ours("info", img), img, "bochs")


def test_luks2_and_garbage_probe_as_raw_as_in_qemu(tmp_path: Path) -> None:
    # qemu 7.2 probes only LUKS version 1; a version-2 header is raw to it, and so to us.
    img = tmp_path / "v2.img"
    img.write_bytes(b"LUKS\xba\xbe\x00\x02" + bytes(8192))
    assert json.loads(qemu("info", "--output=json", img).stdout)["format"] == "raw"
    assert json.loads(ours("info", "--output=json", img).stdout)["format"] == "raw"


def test_raw_probe_warning_where_qemu_img_prints_it(tmp_path: Path) -> None:
    img = tmp_path / "plain.img"
    img.write_bytes(bytes(1 << 20))
    # Read-write open of a probed raw image: the same three lines, then the same error and exit code.
    theirs, mine = qemu("check", "-r", "all", img), ours("check", "-r", "all", img)
    assert theirs.stderr.decode().startswith("WARNING: Image format was not specified")
    assert mine.returncode == theirs.returncode == 63
    assert mine.stderr.decode().replace("imagecore:", "qemu-img:") == theirs.stderr.decode()
    # Read-only opens do not warn, in either tool.
    for args in (["info", img], ["check", img], ["map", img]):
        assert b"WARNING" not in qemu(*args).stderr
        assert b"WARNING" not in ours(*args).stderr
    # Naming the format removes the warning.
    assert b"WARNING" not in ours("check", "-f", "raw", "-r", "all", img).stderr
