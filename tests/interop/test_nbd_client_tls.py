"""imagecore's NBD client over TLS (--object tls-creds-x509,endpoint=client and tls-creds=ID in --image-opts
and json: names), against qemu-nbd 7.2 with TLS and nbdsrv with TLS, each next to qemu-img 7.2: the same
exit code, stdout and stderr, refusals included (an unknown issuer, a hostname that does not match, a
server that wants TLS from a client without it)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.nbdsrv_fixture import create_image, disk_path, make_pool, start_server, volid
from tests.interop.test_cli_nbd_urls import both, ours, same
from tests.peers import peer, run
from tests.tlsutil import CA


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Creds:
    def __init__(self, tmp: Path) -> None:
        ca = CA.make()
        self.server = ca.server_dir(tmp / "srv")
        self.client = ca.client_dir(tmp / "cli")
        self.anon = ca.client_dir(tmp / "anon", None)
        other = CA.make("CN=another CA")
        self.wrong_ca = tmp / "wrongca"
        self.wrong_ca.mkdir()
        shutil.copy(other.client_dir(tmp / "other", None) / "ca-cert.pem", self.wrong_ca / "ca-cert.pem")

    def obj(self, folder: Path, endpoint: str = "client") -> list[str]:
        return ["--object", f"tls-creds-x509,id=tls0,dir={folder},endpoint={endpoint}"]


def image(path: Path) -> Path:
    create_image(path, "qcow2", "4M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x5a 0 128k", "-c", "write -P 0x33 1M 64k", path)
    return path


@pytest.fixture
def qemu_tls(tmp_path: Path) -> Iterator[tuple[int, Creds, Path]]:
    """qemu-nbd with TLS serving a qcow2 file's bytes (-f raw) on 127.0.0.1."""
    creds = Creds(tmp_path / "creds")
    img = image(tmp_path / "disk.qcow2")
    port = free_port()
    proc = subprocess.Popen([peer("qemu-nbd"), "--object",
                             f"tls-creds-x509,id=tls0,dir={creds.server},endpoint=server", "--tls-creds",
                             "tls0", "-f", "raw", "-t", "-b", "127.0.0.1", "-p", str(port), img],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "qemu-nbd did not listen"
            time.sleep(0.05)
    try:
        yield port, creds, img
    finally:
        proc.terminate()
        proc.wait(10)


def test_tls_over_qemu_nbd(qemu_tls: tuple[int, Creds, Path]) -> None:
    port, creds, img = qemu_tls
    cli = creds.obj(creds.client)
    server = f"server.type=inet,server.host=127.0.0.1,server.port={port}"
    fserver = f"file.server.type=inet,file.server.host=localhost,file.server.port={port}"
    info = same("info", *cli, "--output=json", "--image-opts", f"driver=qcow2,file.driver=nbd,{fserver},"
                "file.tls-creds=tls0")
    assert b'"format": "qcow2"' in info[1]
    for args in (("info", "--image-opts", f"driver=nbd,{server},tls-creds=tls0"),
                 ("map", "--output=json", "--image-opts", f"driver=qcow2,file.driver=nbd,{fserver},"
                  "file.tls-creds=tls0"),
                 ("check", "--image-opts", f"driver=qcow2,file.driver=nbd,{fserver},file.tls-creds=tls0"),
                 ("info", f'json:{{"driver":"nbd","host":"localhost","port":"{port}","tls-creds":"tls0"}}'),
                 ("info", "--image-opts", f"driver=nbd,{server},tls-creds=tls0,tls-hostname=localhost"),
                 # refusals
                 ("info", "--image-opts", f"driver=nbd,{server},tls-creds=tls0,tls-hostname=wrong.example"),
                 ("info", "--image-opts", f"driver=nbd,{server}"),
                 ("info", f"nbd://127.0.0.1:{port}"),
                 ("info", "--image-opts", f"driver=nbd,{server},tls-creds=nope")):
        same(args[0], *cli, *args[1:])
    # compare reads through TLS the image the export holds
    same("compare", *cli, "-U", "--image-opts", f"driver=qcow2,file.driver=nbd,{fserver},file.tls-creds=tls0",
         "--image-opts", f"driver=qcow2,file.driver=file,file.filename={img},force-share=on")
    rc, _out, err = same("info", *creds.obj(creds.wrong_ca), "--image-opts",
                         f"driver=nbd,{server},tls-creds=tls0")
    assert rc == 1 and b"The certificate hasn't got a known issuer" in err
    rc, _out, err = same("info", *creds.obj(creds.anon), "--image-opts",
                         f"driver=nbd,{server},tls-creds=tls0")
    assert rc == 1  # qemu-nbd verifies clients: a client without a certificate is dropped
    # credentials refused when they are defined or looked up, as qemu-img refuses them
    same("info", *creds.obj(creds.client, "server"), "--image-opts", f"driver=nbd,{server},tls-creds=tls0")
    same("info", *creds.obj(creds.client.parent / "none"), "--image-opts",
         f"driver=nbd,{server},tls-creds=tls0")


def test_tls_over_nbdsrv(tmp_path: Path) -> None:
    creds = Creds(tmp_path / "creds")
    pool = make_pool(tmp_path / "pool")
    img = image(disk_path(pool, "disk-0", "raw"))  # a raw volume holding a qcow2 image
    plain = create_image(disk_path(pool, "disk-1", "qcow2"), "qcow2", "4M")
    srv = start_server(tmp_path / "run", "--tls-creds", str(creds.server), pool=pool)
    try:
        cli = creds.obj(creds.client)
        for name in (volid(img), volid(plain)):
            for args in (("info", "--output=json", "--image-opts",
                          f"driver=nbd,host=127.0.0.1,port={srv.port},export={name},tls-creds=tls0"),
                         ("map", "--output=json", "--image-opts",
                          f"file.driver=nbd,file.host=127.0.0.1,file.port={srv.port},file.export={name},"
                          "file.tls-creds=tls0")):
                same(args[0], *cli, *args[1:])
        opts = (f"driver=qcow2,file.driver=nbd,file.host=127.0.0.1,file.port={srv.port},"
                f"file.export={volid(img)},file.tls-creds=tls0")
        same("check", *cli, "--image-opts", opts)
        # writes through TLS: a convert into the qcow2 the volume holds, checked clean afterwards
        src = image(tmp_path / "src.qcow2")
        run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x77 2M 64k", src)
        with img.open("r+b") as f:
            f.truncate(8 << 20)  # room for new clusters in the export
        o = ours("convert", *cli, "-n", "--target-image-opts", src, opts)
        assert o.returncode == 0, o.stderr
        same("check", *cli, "--image-opts", opts)
        run(peer("qemu-img"), "compare", *cli, "--image-opts",
            f"driver=qcow2,file.driver=file,file.filename={src}", opts)
        o2, q = both("info", *creds.obj(creds.wrong_ca), "--image-opts",
                       f"driver=nbd,host=127.0.0.1,port={srv.port},export={volid(img)},tls-creds=tls0")
        assert q[0] == 1 and q == o2
        same("info", f"nbd://127.0.0.1:{srv.port}/{volid(img)}")  # TLS required: qemu's refusal and hint
    finally:
        assert srv.stop() == 0, srv.log()
