"""A pool's import/ directory (Proxmox VE 8's import content): files of any registered format listed and
served read-only as ``<pool>:import/<file>``, their format from the extension (pools never probe), copied
out with nbdcopy and ``qemu-img convert nbd://``; the admin socket lists them with content ``import``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from imagecore.driver import format_specs
from nbdsrv.admin.client import AdminClient, AdminError
from nbdsrv.formats import POOL_DISK_FORMATS, image_formats
from nbdsrv.pools import Pool
from tests.interop.nbdsrv_fixture import admin_server, create_image, make_pool, start_server, with_client
from tests.peers import imagecore_cmd, in_ci, peer, run

try:
    import nbd
except ImportError:
    if in_ci():
        raise
    pytest.skip("python nbd (libnbd) is not installed", allow_module_level=True)

MiB = 1 << 20
FORMATS = ["raw", "qcow2", "vmdk"]


def fill(path: Path, fmt: str) -> bytes:
    """Write a pattern into an image with qemu-io; the guest bytes it should read as."""
    run(peer("qemu-io"), "-f", fmt, "-c", "write -P 0x5a 0 64k", "-c", "write -P 0x33 1M 4k", path)
    data = bytearray(2 * MiB)
    data[:65536] = b"\x5a" * 65536
    data[MiB:MiB + 4096] = b"\x33" * 4096
    return bytes(data)


def test_import_files_listed_by_extension_never_probed(tmp_path: Path) -> None:
    root = make_pool(tmp_path / "p")
    (root / "import").mkdir()
    for fmt in FORMATS:
        create_image(root / "import" / f"disk.{fmt}", fmt, "2M")
    # a qcow2 named .raw is raw to a pool (the name decides, the content is never probed)
    create_image(root / "import" / "looks-qcow2.raw", "qcow2", "1M")
    (root / "import" / "notes.txt").write_text("not an image")
    (root / "import" / ".hidden.raw").write_bytes(b"")
    vols = {v.volid: v for v in Pool("local", str(root)).volumes()}
    imports = {k: v for k, v in vols.items() if k.startswith("local:import/")}
    assert sorted(imports) == ["local:import/disk.qcow2", "local:import/disk.raw", "local:import/disk.vmdk",
                               "local:import/looks-qcow2.raw"]
    assert {k: (v.fmt, v.read_only, v.kind) for k, v in imports.items()} == {
        "local:import/disk.qcow2": ("qcow2", True, "import"),
        "local:import/disk.raw": ("raw", True, "import"),
        "local:import/disk.vmdk": ("vmdk", True, "import"),
        "local:import/looks-qcow2.raw": ("raw", True, "import"),
    }


def test_pool_disk_formats_are_proxmox_rule_and_registered() -> None:
    # Proxmox VE's rule, stated once: pool disks are raw, qcow2 and vmdk; import/ takes every format
    assert POOL_DISK_FORMATS == ("raw", "qcow2", "vmdk")
    assert set(POOL_DISK_FORMATS) <= set(image_formats())
    assert [s.name for s in format_specs()] == image_formats()
    assert all(s.extensions for s in format_specs())


@pytest.mark.parametrize("fmt", FORMATS)
def test_import_volume_copied_out_read_only(tmp_path: Path, fmt: str) -> None:
    root = make_pool(tmp_path / "p")
    (root / "import").mkdir()
    src = create_image(root / "import" / f"vm.{fmt}", fmt, "2M")
    want = fill(src, fmt)
    before = src.read_bytes()
    srv = start_server(tmp_path / "run", pool=root)
    try:
        name = f"local:import/vm.{fmt}"
        h = nbd.NBD()
        h.set_export_name(name)
        h.connect_unix(srv.sock)
        assert h.is_read_only()
        assert h.get_size() == 2 * MiB
        assert h.pread(2 * MiB, 0) == want
        h.set_strict_mode(0)
        with pytest.raises(nbd.Error):
            h.pwrite(b"x" * 512, 0)
        h.shutdown()
        out = tmp_path / "copy.raw"
        run(peer("nbdcopy"), srv.unix_uri(name), out)
        assert out.read_bytes() == want
        conv = tmp_path / "conv.qcow2"
        run(peer("qemu-img"), "convert", "-f", "raw", "-O", "qcow2", srv.unix_uri(name), conv)
        run(peer("qemu-img"), "compare", "-f", fmt, "-F", "qcow2", src, conv)
    finally:
        assert srv.stop() == 0
    assert src.read_bytes() == before


def test_admin_lists_import_content(tmp_path: Path) -> None:
    root = make_pool(tmp_path / "p")
    (root / "import").mkdir()
    fill(create_image(root / "import" / "vm.vmdk", "vmdk", "2M"), "vmdk")
    create_image(root / "images" / "100" / "vm-100-disk-0.raw", "raw", "1M")

    async def body(c: AdminClient) -> None:
        vols = await c.execute("volume-list", {"pool": "local", "content": "import"})
        assert [(v["volid"], v["format"], v["content"], v["read-only"]) for v in vols] == [
            ("local:import/vm.vmdk", "vmdk", "import", True)]
        every = await c.execute("volume-list", {"pool": "local"})
        assert {v["content"] for v in every} == {"images", "import"}
        info = await c.execute("image-info", {"volid": "local:import/vm.vmdk"})
        assert info["format"] == "vmdk"
        with pytest.raises(AdminError, match="belongs to no VM"):
            await c.execute("image-convert", {"volid": "local:import/vm.vmdk"})
        r = await c.execute("image-convert", {"volid": "local:import/vm.vmdk", "vmid": 100,
                                              "format": "qcow2", "job-id": "imp"})
        assert r["volid"] == "local:100/vm-100-disk-1.qcow2"
        rec = await c.execute("job-wait", {"id": "imp", "timeout": 60})
        assert rec["status"] == "concluded" and "error" not in rec, rec

    with admin_server(tmp_path, root) as (_srv, admin):
        with_client(admin, body)
    run(peer("qemu-img"), "compare", "-f", "vmdk", "-F", "qcow2", root / "import" / "vm.vmdk",
        root / "images" / "100" / "vm-100-disk-1.qcow2")


def test_cli_probes_as_qemu_img_with_the_raw_warning(tmp_path: Path) -> None:
    """The CLI probes as qemu-img does, warning as it does for raw opened read-write; pools never probe
    (test_import_files_listed_by_extension_never_probed, and test_nbd_serve's
    test_format_comes_from_extension_not_content)."""
    for side in ("q", "o"):
        (tmp_path / side).mkdir()
        (tmp_path / side / "x.img").write_bytes(b"\0" * MiB)
    q = subprocess.run([peer("qemu-img"), "resize", "x.img", "2M"], capture_output=True, cwd=tmp_path / "q")
    o = subprocess.run([*imagecore_cmd(), "resize", "x.img", "2M"], capture_output=True, cwd=tmp_path / "o")
    assert b"probing guessed raw" in q.stderr
    assert (o.returncode, o.stdout, o.stderr) == (q.returncode, q.stdout, q.stderr)
    for fmt in FORMATS:
        img = create_image(tmp_path / f"probe-{fmt}.img", fmt, "1M")
        ours = json.loads(run(*imagecore_cmd(), "info", "--output=json", img).stdout)
        theirs = json.loads(run(peer("qemu-img"), "info", "--output=json", img).stdout)
        assert ours["format"] == theirs["format"] == fmt
