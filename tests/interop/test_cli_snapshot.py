"""`imagecore snapshot` beside `qemu-img snapshot` 7.2: the same list, the same images after create, apply
and delete (qemu-img compare, qemu-img check), each tool using the other's snapshots, and the same
messages and exit codes for everything qemu-img refuses."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from tests.interop.nbdsrv_fixture import qemu_io_holding
from tests.peers import imagecore_cmd, peer, run


def ours(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*imagecore_cmd(), "snapshot", *map(str, args)], capture_output=True, timeout=60,
                          cwd=cwd)


def qemu(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([peer("qemu-img"), "snapshot", *map(str, args)], capture_output=True, timeout=60,
                          cwd=cwd)


def same(a: subprocess.CompletedProcess[bytes], b: subprocess.CompletedProcess[bytes]) -> None:
    """Same exit code, stdout and stderr, but for the program's name."""
    assert (a.returncode, a.stdout) == (b.returncode, b.stdout), (a, b)
    named = a.stderr.replace(b"imagecore:", b"qemu-img:").replace(b"'imagecore --help'", b"'qemu-img --help'")
    assert named == b.stderr, (a.stderr, b.stderr)


def io(img: Path, *cmds: str) -> bytes:
    args: list[str] = []
    for c in cmds:
        args += ["-c", c]
    out = run(peer("qemu-io"), "-f", "qcow2", *args, img).stdout
    assert b"Pattern verification failed" not in out, out
    return out


def base_image(work: Path) -> Path:
    img = work / "a.qcow2"
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", img, "16M")
    io(img, "write -P 0x11 0 1M", "write -P 0x12 8M 64k")
    run(peer("qemu-img"), "snapshot", "-c", "first", img)
    io(img, "write -P 0x21 0 64k", "write -z 8M 64k", "write -P 0x22 12M 1M")
    run(peer("qemu-img"), "snapshot", "-c", "second", img)
    io(img, "write -P 0x31 64k 64k")
    return img


def info(img: Path) -> dict[str, object]:
    data = json.loads(run(peer("qemu-img"), "info", "--output=json", img).stdout)
    data.pop("actual-size", None)
    data.pop("filename", None)
    return data  # type: ignore[no-any-return]


def test_list_apply_delete_match_qemu_img(tmp_path: Path) -> None:
    img = base_image(tmp_path)
    same(ours("-l", img), qemu("-l", img))
    same(ours("-q", "-l", img), qemu("-q", "-l", img))
    same(ours("-U", "-l", img), qemu("-U", "-l", img))
    for action, name in (("-a", "first"), ("-a", "2"), ("-d", "first"), ("-d", "second")):
        a, b = tmp_path / f"ours{action}{name}.qcow2", tmp_path / f"qemu{action}{name}.qcow2"
        shutil.copy(img, a)
        shutil.copy(img, b)
        same(ours(action, name, a), qemu(action, name, b))
        run(peer("qemu-img"), "check", a)
        assert run(peer("qemu-img"), "compare", a, b).returncode == 0
        assert info(a) == info(b)
        same(ours("-l", a), qemu("-l", b))
    # after apply, the image reads as it did when the snapshot was taken
    io(tmp_path / "ours-afirst.qcow2", "read -P 0x11 0 1M", "read -P 0x12 8M 64k", "read -P 0 12M 1M")


def test_snapshots_made_by_imagecore_are_qemus(tmp_path: Path) -> None:
    img = tmp_path / "b.qcow2"
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", img, "16M")
    io(img, "write -P 0x41 0 2M")
    p = ours("-c", "mine", img)
    assert (p.returncode, p.stdout, p.stderr) == (0, b"", b"")
    io(img, "write -P 0x42 0 1M")
    assert ours("-c", "", img).returncode == 0  # an empty name, as qemu-img allows
    run(peer("qemu-img"), "check", img)
    listed = run(peer("qemu-img"), "snapshot", "-l", img).stdout.decode().splitlines()
    assert listed[0] == "Snapshot list:" and listed[2].split()[:2] == ["1", "mine"]
    assert listed[3].split()[0] == "2"
    snaps = json.loads(run(peer("qemu-img"), "info", "--output=json", img).stdout)["snapshots"]
    assert [s["name"] for s in snaps] == ["mine", ""] and snaps[0]["vm-state-size"] == 0
    run(peer("qemu-img"), "snapshot", "-a", "mine", img)
    io(img, "read -P 0x41 0 2M")
    assert ours("-d", "mine", img).returncode == 0
    run(peer("qemu-img"), "check", img)
    io(img, "read -P 0x41 0 2M")
    assert [s["name"] for s in json.loads(run(peer("qemu-img"), "info", "--output=json", img).stdout)
            ["snapshots"]] == [""]


def test_refusals_match_qemu_img(tmp_path: Path) -> None:
    img = base_image(tmp_path)
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(1 << 20))
    vmdk = tmp_path / "v.vmdk"
    run(peer("qemu-img"), "create", "-q", "-f", "vmdk", vmdk, "1M")
    cases: list[list[str | Path]] = [
        ["-d", "nope", img], ["-a", "nope", img], ["-a", "99", img],
        ["-l", raw], ["-c", "x", raw], ["-d", "x", raw], ["-a", "x", raw],
        ["-l", vmdk], ["-c", "x", vmdk],
        ["-l", "-c", "x", img], ["-U", "-c", "x", img], ["-l", tmp_path / "missing"], [], ["-l", img, img],
        ["-f", "qcow2", "-l", img], ["-x", img],
    ]
    for args in cases:
        same(ours(*args, cwd=tmp_path), qemu(*args, cwd=tmp_path))
    # no action: both open the image read-write and do nothing
    same(ours(img), qemu(img))
    with qemu_io_holding(img, "qcow2"):
        for args in (["-c", "held", img], ["-l", img], ["-U", "-l", img]):
            same(ours(*args), qemu(*args))
