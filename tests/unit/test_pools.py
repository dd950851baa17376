"""Directory pools: volume naming, layout rules, containment of every opened path, configuration parsing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imagecore.driver import OpenContext
from imagecore.errors import InvalidArgumentError, NotFoundError, PermissionDeniedError
from nbdsrv.config import ImageConfig, PoolConfig, ServerConfig, load_toml, parse_listen, parse_pool_arg
from nbdsrv.exports import image_volume
from nbdsrv.pools import Pool, PoolOpener, PoolSet, check_export_name


def make_pool(root: Path) -> Path:
    (root / "images" / "100").mkdir(parents=True)
    (root / "images" / "101").mkdir(parents=True)
    (root / "template" / "iso").mkdir(parents=True)
    (root / "images" / "100" / "vm-100-disk-0.raw").write_bytes(b"\0" * 4096)
    (root / "images" / "100" / "vm-100-disk-1.qcow2").write_bytes(b"\0" * 4096)
    (root / "images" / "100" / "base-100-disk-2.vmdk").write_bytes(b"\0" * 4096)
    (root / "images" / "101" / "vm-101-disk-0.raw").write_bytes(b"\0" * 4096)
    (root / "template" / "iso" / "debian.iso").write_bytes(b"\0" * 4096)
    # Not volumes: wrong VMID, unknown extension, stray names.
    (root / "images" / "101" / "vm-100-disk-9.raw").write_bytes(b"")
    (root / "images" / "101" / "vm-101-disk-1.img").write_bytes(b"")
    (root / "images" / "101" / "notes.txt").write_bytes(b"")
    (root / "images" / "abc").mkdir()
    (root / "template" / "iso" / "readme").write_bytes(b"")
    return root


def test_scan_layout_formats_and_read_only(tmp_path: Path) -> None:
    pool = Pool("local", str(make_pool(tmp_path / "p")))
    vols = {v.volid: v for v in pool.volumes()}
    assert sorted(vols) == [
        "local:100/base-100-disk-2.vmdk",
        "local:100/vm-100-disk-0.raw",
        "local:100/vm-100-disk-1.qcow2",
        "local:101/vm-101-disk-0.raw",
        "local:iso/debian.iso",
    ]
    assert vols["local:100/vm-100-disk-0.raw"].fmt == "raw"
    assert vols["local:100/vm-100-disk-1.qcow2"].fmt == "qcow2"
    assert vols["local:100/base-100-disk-2.vmdk"].fmt == "vmdk"
    assert vols["local:iso/debian.iso"].fmt == "raw"
    assert not vols["local:100/vm-100-disk-0.raw"].read_only
    assert vols["local:100/base-100-disk-2.vmdk"].read_only
    assert vols["local:iso/debian.iso"].read_only
    assert vols["local:100/base-100-disk-2.vmdk"].kind == "base"


def test_read_only_pool(tmp_path: Path) -> None:
    pool = Pool("ro", str(make_pool(tmp_path / "p")), read_only=True)
    assert all(v.read_only for v in pool.volumes())


def test_new_image_found_on_lookup_without_rescan(tmp_path: Path) -> None:
    root = make_pool(tmp_path / "p")
    pools = PoolSet([Pool("local", str(root))])
    assert pools.lookup("local:100/vm-100-disk-5.raw") is None
    (root / "images" / "100" / "vm-100-disk-5.raw").write_bytes(b"\0" * 512)
    vol = pools.lookup("local:100/vm-100-disk-5.raw")
    assert vol is not None and vol.path.endswith("vm-100-disk-5.raw")


@pytest.mark.parametrize("name", [
    "local:100/../101/vm-101-disk-0.raw",
    "local:../etc/passwd",
    "/etc/passwd",
    "local:..",
    "..:100/vm-100-disk-0.raw",
])
def test_escaping_names_refused(tmp_path: Path, name: str) -> None:
    pools = PoolSet([Pool("local", str(make_pool(tmp_path / "p")))])
    with pytest.raises(PermissionDeniedError):
        pools.lookup(name)


def test_nul_and_long_names_refused(tmp_path: Path) -> None:
    pools = PoolSet([Pool("local", str(make_pool(tmp_path / "p")))])
    with pytest.raises(InvalidArgumentError):
        pools.lookup("local:100/vm-100-disk-0.raw\0x")
    with pytest.raises(InvalidArgumentError):
        pools.lookup("local:100/" + "a" * 4097)
    check_export_name("local:100/" + "a" * 4000)


@pytest.mark.parametrize("name", [
    "local:100/vm-100-disk-0.raw/x",
    "local:100",
    "local:",
    "nope:100/vm-100-disk-0.raw",
    "local:101/vm-100-disk-9.raw",
    "local:100/notes.txt",
    "local:iso/readme",
    "",
])
def test_unknown_names(tmp_path: Path, name: str) -> None:
    pools = PoolSet([Pool("local", str(make_pool(tmp_path / "p")))])
    assert pools.lookup(name) is None


def test_symlink_out_of_pool_not_listed(tmp_path: Path) -> None:
    root = make_pool(tmp_path / "p")
    outside = tmp_path / "secret.raw"
    outside.write_bytes(b"secret")
    os.symlink(outside, root / "images" / "100" / "vm-100-disk-7.raw")
    os.symlink(tmp_path, root / "images" / "102")
    pools = PoolSet([Pool("local", str(root))])
    names = [v.volid for v in pools.volumes()]
    assert "local:100/vm-100-disk-7.raw" not in names
    assert not any(n.startswith("local:102/") for n in names)
    assert pools.lookup("local:100/vm-100-disk-7.raw") is None


def test_symlink_inside_pool_is_followed(tmp_path: Path) -> None:
    root = make_pool(tmp_path / "p")
    os.symlink(root / "images" / "100" / "vm-100-disk-0.raw", root / "images" / "100" / "vm-100-disk-8.raw")
    pools = PoolSet([Pool("local", str(root))])
    assert pools.lookup("local:100/vm-100-disk-8.raw") is not None


def test_opener_confines_backing_and_data_files(tmp_path: Path) -> None:
    root = make_pool(tmp_path / "p")
    (tmp_path / "outside.raw").write_bytes(b"x" * 512)
    opener = PoolOpener(str(root), lock=False)
    img = str(root / "images" / "101" / "vm-101-disk-0.raw")
    ctx = OpenContext(opener=opener, read_only=True, path=img)
    # Relative names resolve against the image's folder and may reach another VM's folder in the pool.
    assert opener.resolve("../100/vm-100-disk-0.raw", img) == str(root / "images/100/vm-100-disk-0.raw")
    for bad in ("../../../outside.raw", str(tmp_path / "outside.raw"), "/etc/passwd"):
        with pytest.raises(PermissionDeniedError):
            opener.resolve(bad, img)
        with pytest.raises(PermissionDeniedError):
            opener.open_data_file(bad, ctx)
    with pytest.raises(InvalidArgumentError):
        opener.resolve("a\0b", img)
    os.symlink(tmp_path / "outside.raw", root / "images" / "101" / "link.raw")
    with pytest.raises(PermissionDeniedError):
        opener.open_file(str(root / "images" / "101" / "link.raw"), read_only=True)
    hf = opener.open_file(img, read_only=True)
    try:
        assert hf.size() == 4096
    finally:
        hf.close()


async def test_backing_outside_pool_refused(tmp_path: Path) -> None:
    root = make_pool(tmp_path / "p")
    (tmp_path / "outside.raw").write_bytes(b"x" * 512)
    opener = PoolOpener(str(root), lock=False)
    img = str(root / "images" / "101" / "vm-101-disk-0.raw")
    ctx = OpenContext(opener=opener, read_only=True, path=img)
    with pytest.raises(PermissionDeniedError):
        await opener.open_backing(str(tmp_path / "outside.raw"), "raw", ctx)
    with pytest.raises(NotFoundError):
        await opener.open_backing("vm-101-nothere.raw", "raw", ctx)


def test_pool_validation(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError):
        Pool("bad name", str(tmp_path))
    with pytest.raises(NotFoundError):
        Pool("x", str(tmp_path / "missing"))
    with pytest.raises(InvalidArgumentError):
        PoolSet([Pool("a", str(tmp_path)), Pool("a", str(tmp_path))])


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:1234").port == 1234
    a = parse_listen("[::1]:10809")
    assert (a.host, a.port) == ("::1", 10809)
    assert parse_listen("unix:/run/x.sock").unix == "/run/x.sock"
    assert parse_listen("localhost").port == 10809
    for bad in ("::1:10809", "1.2.3.4:x", "1.2.3.4:70000", "unix:", "[::1"):
        with pytest.raises(InvalidArgumentError):
            parse_listen(bad)
    assert parse_pool_arg("local=/var/lib/vz").name == "local"
    with pytest.raises(InvalidArgumentError):
        parse_pool_arg("local")


def test_toml_config(tmp_path: Path) -> None:
    (tmp_path / "vz").mkdir()
    cfg_file = tmp_path / "nbdsrv.toml"
    cfg_file.write_text(
        '[server]\nlisten = ["127.0.0.1:0", "unix:/tmp/x.sock"]\nread_only = true\nlog_level = "debug"\n'
        '[pools.local]\npath = "vz"\n[pools.backup]\npath = "/srv"\nread_only = true\n'
        '[[images]]\npath = "disk.qcow2"\nname = "disk"\n')
    cfg = load_toml(str(cfg_file))
    cfg.validate()
    assert [str(a) for a in cfg.listen] == ["127.0.0.1:0", "unix:/tmp/x.sock"]
    assert cfg.read_only and cfg.log_level == "debug"
    assert cfg.pools[0].path == str(tmp_path / "vz")
    assert cfg.pools[1].read_only
    assert cfg.images == [ImageConfig(str(tmp_path / "disk.qcow2"), "disk", None)]
    cfg_file.write_text('[server]\nlisten = 5\n')
    with pytest.raises(InvalidArgumentError):
        load_toml(str(cfg_file))
    cfg_file.write_text('[pools.x]\npath = "a"\nbogus = 1\n')
    with pytest.raises(InvalidArgumentError, match="bogus"):
        load_toml(str(cfg_file))
    cfg_file.write_text('not toml [')
    with pytest.raises(InvalidArgumentError):
        load_toml(str(cfg_file))
    with pytest.raises(InvalidArgumentError):
        ServerConfig().validate()


def test_image_volume_format_from_extension(tmp_path: Path) -> None:
    (tmp_path / "a.qcow2").write_bytes(b"")
    (tmp_path / "a.img").write_bytes(b"")
    assert image_volume(ImageConfig(str(tmp_path / "a.qcow2")), read_only=False).fmt == "qcow2"
    assert image_volume(ImageConfig(str(tmp_path / "a.img"), format="raw"), read_only=False).fmt == "raw"
    with pytest.raises(InvalidArgumentError):
        image_volume(ImageConfig(str(tmp_path / "a.img")), read_only=False)
    with pytest.raises(InvalidArgumentError):
        image_volume(ImageConfig(str(tmp_path / "missing.raw")), read_only=False)


async def test_registry_shares_one_instance_and_closes_after_last(tmp_path: Path) -> None:
    import asyncio

    from imagecore.errors import ShutdownError
    from nbdsrv.exports import ExportRegistry

    root = make_pool(tmp_path / "p")
    reg = ExportRegistry(PoolSet([Pool("local", str(root))]), lock=True)
    name = "local:100/vm-100-disk-0.raw"
    a, b = await asyncio.gather(reg.acquire(name), reg.acquire(name))
    assert a is not None and a is b and a.refs == 2
    assert reg.open_count() == 1
    info = a.info(name)
    assert info.size == 4096 and not info.read_only and info.can_multi_conn
    iso = await reg.acquire("local:iso/debian.iso")
    assert iso is not None and iso.info("x").read_only and not iso.info("x").can_trim
    await reg.release(iso)
    await reg.release(a)
    assert reg.open_count() == 1
    await reg.release(b)
    assert reg.open_count() == 0
    c = await reg.acquire(name)
    assert c is not None and c is not a
    assert await reg.acquire("local:100/vm-100-nothing.raw") is None
    await reg.close_all()
    assert reg.open_count() == 0
    with pytest.raises(ShutdownError):
        await reg.acquire(name)


async def test_registry_read_only_everything(tmp_path: Path) -> None:
    from imagecore.errors import ReadOnlyError
    from nbdsrv.exports import ExportRegistry

    root = make_pool(tmp_path / "p")
    reg = ExportRegistry(PoolSet([Pool("local", str(root))]), read_only=True)
    exp = await reg.acquire("local:100/vm-100-disk-0.raw")
    assert exp is not None and exp.read_only and exp.info("n").read_only
    with pytest.raises(ReadOnlyError):
        await exp.driver.write(0, memoryview(b"x"))
    names = [n for n, _ in reg.list()]
    assert "local:100/vm-100-disk-0.raw" in names and "local:iso/debian.iso" in names
    await reg.close_all()


def test_command_line_pairs_names_and_formats_with_images(tmp_path: Path) -> None:
    from nbdsrv.__main__ import _parser, build_config

    (tmp_path / "a.img").write_bytes(b"")
    (tmp_path / "b.qcow2").write_bytes(b"")
    argv = ["serve", "--image", str(tmp_path / "a.img"), "--format", "raw", "--name=a",
            "--image=" + str(tmp_path / "b.qcow2"), "--read-only", "--listen", "unix:/tmp/x.sock",
            "--handshake-timeout", "3"]
    cfg = build_config(argv, _parser().parse_args(argv))
    assert cfg.images == [ImageConfig(str(tmp_path / "a.img"), "a", "raw"),
                          ImageConfig(str(tmp_path / "b.qcow2"), None, None)]
    assert cfg.read_only and cfg.handshake_timeout == 3 and cfg.listen[0].unix == "/tmp/x.sock"
    from imagecore.errors import BlockError

    for bad in (["serve", "--name", "x", "--image", "y"],
                ["serve", "--image", "y", "--name", "a", "--name", "b"]):
        with pytest.raises(BlockError):
            build_config(bad, _parser().parse_args(bad))
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--ima", "x"])


def test_vm_symlink_to_template_or_iso_is_read_only(tmp_path: Path) -> None:
    root = make_pool(tmp_path / "p")
    d = root / "images" / "100"
    os.symlink("base-100-disk-2.vmdk", d / "vm-100-disk-5.vmdk")
    os.symlink("../../template/iso/debian.iso", d / "vm-100-disk-6.raw")
    os.symlink("vm-100-disk-0.raw", d / "vm-100-disk-7.raw")
    pools = PoolSet([Pool("local", str(root))])
    for name, ro in (("vm-100-disk-5.vmdk", True), ("vm-100-disk-6.raw", True), ("vm-100-disk-7.raw", False)):
        vol = pools.lookup(f"local:100/{name}")
        assert vol is not None and vol.read_only is ro, name


async def test_list_probes_within_its_budget_and_resumes(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A LIST probes changed volumes for PROBE_BUDGET seconds at most (a pool of 100,000 would otherwise be
    opened whole for every LIST); what it leaves is described plainly and probed by the next LISTs, so a
    broken image is named as such once its turn comes."""
    import nbdsrv.exports as exports
    from nbdsrv.exports import ExportRegistry

    root = make_pool(tmp_path / "p")
    d = root / "images" / "300"
    d.mkdir(parents=True)
    for n in range(40):
        (d / f"vm-300-disk-{n}.raw").write_bytes(bytes(4096))
    (d / "vm-300-disk-99.qcow2").write_bytes(b"QFI\xfb" + bytes(508))  # a qcow2 that cannot be opened
    reg = ExportRegistry(PoolSet([Pool("local", str(root))]), lock=True)
    monkeypatch.setattr(exports, "PROBE_BUDGET", 0.0)
    listed = dict(await reg.list_probed())
    assert len(listed) == len(reg.entries()) and len(reg._probes) <= 1
    assert not any(desc.startswith("cannot be opened") for desc in listed.values())
    monkeypatch.setattr(exports, "PROBE_BUDGET", 30.0)
    listed = dict(await reg.list_probed())
    assert len(reg._probes) == len(reg.entries())
    assert listed["local:300/vm-300-disk-99.qcow2"].startswith("cannot be opened")
    await reg.close_all()


def test_shared_and_rbd_pools_on_the_command_line() -> None:
    assert parse_pool_arg("s=/mnt/cephfs/pve,shared") == PoolConfig("s", "/mnt/cephfs/pve", shared=True)
    assert parse_pool_arg("s=/p,ro") == PoolConfig("s", "/p", read_only=True)
    assert parse_pool_arg("c=rbd:rbd/pve,conf=/etc/ceph/ceph.conf,client=nbd") == PoolConfig(
        "c", "", type="rbd", rbd_pool="rbd", namespace="pve", ceph_conf="/etc/ceph/ceph.conf", client="nbd")
    assert parse_pool_arg("c=rbd:vms").namespace is None
    for bad in ("s=/p,shared,shared", "s=/p,bogus", "s=/p,conf=/x", "c=rbd:vms,shared", "c=rbd:",
                "s=/p,shared=1", "c=rbd:x,conf"):
        with pytest.raises(InvalidArgumentError):
            parse_pool_arg(bad)


def test_shared_and_rbd_pools_in_toml(tmp_path: Path) -> None:
    cfg_file = tmp_path / "nbdsrv.toml"
    cfg_file.write_text('[server]\nnode = "pve2"\n'
                        '[pools.cephfs]\npath = "/mnt/pve/cephfs"\nshared = true\n'
                        '[pools.ceph]\ntype = "rbd"\nrbd_pool = "vms"\nceph_conf = "ceph.conf"\n'
                        'namespace = "pve"\nclient = "nbd"\n')
    cfg = load_toml(str(cfg_file))
    assert cfg.node == "pve2"
    shared, ceph = cfg.pools
    assert shared.shared and shared.type == "dir"
    assert (ceph.type, ceph.rbd_pool, ceph.namespace, ceph.client) == ("rbd", "vms", "pve", "nbd")
    assert ceph.ceph_conf == str(tmp_path / "ceph.conf")
    for table in ('[pools.x]\ntype = "rbd"\n', '[pools.x]\ntype = "rbd"\nrbd_pool = "a"\npath = "/p"\n',
                  '[pools.x]\npath = "/p"\nrbd_pool = "a"\n', '[pools.x]\ntype = "zfs"\npath = "/p"\n'):
        cfg_file.write_text(table)
        with pytest.raises(InvalidArgumentError):
            load_toml(str(cfg_file))
    assert ServerConfig().node  # the host name by default
    bad = ServerConfig(pools=[shared], node="two words")
    with pytest.raises(InvalidArgumentError, match="node name"):
        bad.validate()


def test_shared_flag_is_kept_by_the_pool(tmp_path: Path) -> None:
    root = make_pool(tmp_path / "p")
    assert Pool("s", str(root), shared=True).shared and not Pool("l", str(root)).shared


async def test_shared_pool_keeps_no_description_across_opens(tmp_path: Path) -> None:
    """INFO on a volume of a single-host pool is answered from what the last INFO found while the file is
    unchanged; on a shared pool another node may have changed the image unseen, so it is read each time."""
    from nbdsrv.exports import ExportRegistry

    for shared in (False, True):
        root = make_pool(tmp_path / f"p{shared}")
        reg = ExportRegistry(PoolSet([Pool("local", str(root), shared=shared)]))
        name = "local:100/vm-100-disk-0.raw"
        info = await reg.describe(name)
        assert info is not None and info.size == 4096
        assert bool(reg._infos) is not shared
        assert name in [n for n, _ in await reg.list_probed()]
        await reg.close_all()
