"""NBD over TLS with real clients: qemu-img and qemu-io (7.2 and 10), nbdinfo, nbdcopy and nbdsh read and
write raw and qcow2 exports through STARTTLS, with and without client certificates; what `--tls require`
refuses to a plaintext client; plaintext injected after STARTTLS; refusals (wrong CA, expired
certificate, a DN not on the export's list) logged with reason and peer while others are served; access
by address; reload of the credentials; and shutdown that no handshaking client can hold.

Every test makes its own CA and certificates (tests/tlsutil.py). The server runs on uvloop, and on the
asyncio loop too where the transport's upgrade matters.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.interop.nbdsrv_fixture import NbdServer, create_image, disk_path, make_pool, start_server, volid
from tests.interop.test_admin_net import admin_run
from tests.peers import peer, qemu10, run
from tests.tlsutil import CA

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
OPT_EXPORT_NAME, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY = 1, 3, 5, 6, 7, 8
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_POLICY, REP_ERR_TLS_REQD = (1 << 31) | 2, (1 << 31) | 5
REQUEST_MAGIC, SIMPLE_REPLY_MAGIC = 0x25609513, 0x67446698
FLAG_SEND_DF = 1 << 7
MiB = 1 << 20
CLIENT_DN = "CN=client.example.com,O=Example,C=GB"
LOOPS = ["uvloop", "asyncio"]


def _env(loop: str) -> dict[str, str] | None:
    return {"NBDSRV_LOOP": "asyncio"} if loop == "asyncio" else None


class Setup:
    """A pool with a raw and a qcow2 disk full of a pattern, a CA, and credentials directories."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.pool = make_pool(tmp / "pool")
        self.raw = create_image(disk_path(self.pool, "disk-0", "raw"), "raw", "4M")
        self.qcow2 = create_image(disk_path(self.pool, "disk-1", "qcow2"), "qcow2", "4M")
        for img, fmt in ((self.raw, "raw"), (self.qcow2, "qcow2")):
            run(peer("qemu-io"), "-f", fmt, "-c", "write -P 0x5a 0 2M", img)
        self.ca = CA.make()
        self.server_creds = self.ca.server_dir(tmp / "creds" / "server")
        self.client_creds = self.ca.client_dir(tmp / "creds" / "client", CLIENT_DN)
        self.anon_creds = self.ca.client_dir(tmp / "creds" / "anon", None)

    def start(self, *args: str, loop: str = "uvloop", name: str = "srv") -> NbdServer:
        return start_server(self.tmp / name, "--tls-creds", str(self.server_creds), *args, pool=self.pool,
                            env=_env(loop))


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def stop(srv: NbdServer) -> str:
    assert srv.stop() == 0, srv.log()
    log = srv.log()
    assert "Traceback" not in log, log
    return log


# --- clients ---------------------------------------------------------------------------------------------

def qemu_opts(srv: NbdServer, name: str, creds: Path) -> list[str]:
    return ["--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={creds}",
            "--image-opts", f"driver=nbd,host=127.0.0.1,port={srv.port},export={name},tls-creds=tls0"]


def nbds(srv: NbdServer, name: str, creds: Path) -> str:
    return f"nbds://127.0.0.1:{srv.port}/{name}?tls-certificates={creds}"


def nbdsh(script: str, *, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))
    proc = subprocess.run([peer("nbdsh"), "-c", script], capture_output=True, env=env, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr.decode()
    return proc


def nbdsh_tls(srv: NbdServer, name: str, creds: Path, body: str) -> str:
    return (f"h.set_tls(nbd.TLS_REQUIRE)\nh.set_tls_certificates({str(creds)!r})\n"
            f"h.set_export_name({name!r})\nh.connect_tcp('127.0.0.1', '{srv.port}')\n"
            f"assert h.get_tls_negotiated()\n{body}\n")


# --- a raw socket client, for what no real client would send ----------------------------------------------

class Raw:
    def __init__(self, port: int, *, source: str | None = None) -> None:
        self.s = socket.create_connection(("127.0.0.1", port), timeout=10,
                                          source_address=(source, 0) if source else None)
        magic, opt, _ = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
        self.s.sendall(struct.pack(">I", 3))

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"EOF after {len(buf)} of {n} bytes")
            buf += chunk
        return buf

    @staticmethod
    def opt(option: int, data: bytes = b"") -> bytes:
        return struct.pack(">QII", IHAVEOPT, option, len(data)) + data

    @staticmethod
    def go_data(name: str) -> bytes:
        return struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", 0)

    def replies(self, option: int) -> list[tuple[int, bytes]]:
        out = []
        while True:
            magic, ropt, rtype, length = struct.unpack(">QIII", self.recv(20))
            assert magic == OPT_REPLY_MAGIC and ropt == option, (hex(magic), ropt)
            out.append((rtype, self.recv(length)))
            if rtype == REP_ACK or rtype & (1 << 31):
                return out

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        self.s.sendall(self.opt(option, data))
        return self.replies(option)

    def starttls(self, creds: Path, *, extra: bytes = b"") -> None:
        self.s.sendall(self.opt(OPT_STARTTLS) + extra)
        assert self.replies(OPT_STARTTLS) == [(REP_ACK, b"")]
        ctx = ssl.create_default_context(cafile=str(creds / "ca-cert.pem"))
        if (creds / "client-cert.pem").exists():
            ctx.load_cert_chain(str(creds / "client-cert.pem"), str(creds / "client-key.pem"))
        self.s = ctx.wrap_socket(self.s, server_hostname="localhost")

    def go_flags(self, name: str) -> int:
        reps = self.option(OPT_GO, self.go_data(name))
        assert reps[-1][0] == REP_ACK, reps
        for rtype, body in reps:
            if rtype == REP_INFO and struct.unpack_from(">H", body)[0] == 0:
                return int(struct.unpack_from(">QH", body, 2)[1])
        raise AssertionError(reps)

    def close(self) -> None:
        self.s.close()


# ==================================================================================== clients through TLS

@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("verify_peer", [True, False], ids=["client-cert", "no-client-cert"])
def test_real_clients_read_and_write_through_tls(setup: Setup, loop: str, verify_peer: bool) -> None:
    srv = setup.start("--tls-verify-peer", loop=loop) if verify_peer else setup.start(loop=loop)
    creds = setup.client_creds if verify_peer else setup.anon_creds
    ref = setup.tmp / "ref.raw"
    shutil.copy(setup.raw, ref)
    run(peer("qemu-io"), "-f", "raw", "-c", "write -P 0x11 1M 64k", "-c", "write -P 0x22 3M 4k", ref)
    try:
        for img in (setup.raw, setup.qcow2):
            name = volid(img)
            # qemu-io 7.2 writes; qemu 10 writes; nbdsh writes; the others read back
            run(peer("qemu-io"), *qemu_opts(srv, name, creds), "-c", "write -P 0x11 1M 64k")
            run(qemu10("qemu-io"), *qemu_opts(srv, name, creds), "-c", "write -P 0x11 1M 32k",
                "-c", "read -P 0x11 1M 64k")
            nbdsh(nbdsh_tls(srv, name, creds, "h.pwrite(b'\\x22' * 4096, 3 * 1024 * 1024)\nh.flush()"))
            out = run(peer("nbdinfo"), nbds(srv, name, creds)).stdout.decode()
            assert "with TLS" in out and "4194304" in out
            for qimg in (peer("qemu-img"), qemu10("qemu-img")):
                cmp = run(qimg, "compare", *qemu_opts(srv, name, creds)[:2], "--image-opts",
                          f"driver=nbd,host=127.0.0.1,port={srv.port},export={name},tls-creds=tls0",
                          f"driver=raw,file.driver=file,file.filename={ref}")
                assert b"Images are identical" in cmp.stdout
            copy = setup.tmp / f"copy-{img.suffix[1:]}.raw"
            run(peer("nbdcopy"), nbds(srv, name, creds), str(copy))
            assert copy.read_bytes() == ref.read_bytes()
        # nbdcopy writes through TLS as well
        run(peer("nbdcopy"), str(ref), nbds(srv, volid(setup.raw), creds))
    finally:
        log = stop(srv)
    assert log.count("TLS established") >= 10
    if verify_peer:
        assert f'client="{CLIENT_DN}"' in log
    run(peer("qemu-img"), "check", "-q", "-f", "qcow2", setup.qcow2)
    cmp = run(peer("qemu-img"), "compare", "-f", "qcow2", "-F", "raw", setup.qcow2, ref)
    assert b"Images are identical" in cmp.stdout


# ============================================================================= require: nothing in plaintext

def test_require_refuses_every_plaintext_option_and_serves_no_data(setup: Setup) -> None:
    srv = setup.start()
    name = volid(setup.raw)
    try:
        r = Raw(srv.port)
        for option, data in ((OPT_LIST, b""), (OPT_INFO, Raw.go_data(name)), (OPT_GO, Raw.go_data(name)),
                             (OPT_STRUCTURED_REPLY, b"")):
            reps = r.option(option, data)
            assert [t for t, _ in reps] == [REP_ERR_TLS_REQD], (option, reps)
        # still in the handshake: a READ now is garbage to the server, which hangs up; no data ever
        r.s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 0, 1, 0, 4096))
        r.s.settimeout(5)
        rest = b""
        try:
            while chunk := r.s.recv(65536):
                rest += chunk
        except OSError:
            pass
        assert b"\x5a" * 64 not in rest
        r.close()
        # EXPORT_NAME cannot be refused politely: the connection closes without a byte
        r = Raw(srv.port)
        r.s.sendall(Raw.opt(OPT_EXPORT_NAME, name.encode()))
        assert r.s.recv(100) == b""
        r.close()
        # a plaintext libnbd client is refused as well
        proc = run(peer("nbdinfo"), srv.uri(name), check=False)
        assert proc.returncode != 0
        proc = run(peer("nbdinfo"), "--list", f"nbd://127.0.0.1:{srv.port}", check=False)
        assert proc.returncode != 0 and name.encode() not in proc.stdout
        # qemu-img without TLS
        proc = run(peer("qemu-img"), "info", srv.uri(name), check=False)
        assert proc.returncode != 0
    finally:
        stop(srv)


@pytest.mark.parametrize("loop", LOOPS)
def test_options_injected_with_starttls_have_no_effect(setup: Setup, loop: str) -> None:
    srv = setup.start(loop=loop)
    name = volid(setup.raw)
    try:
        r = Raw(srv.port)
        injected = Raw.opt(OPT_STRUCTURED_REPLY) + Raw.opt(OPT_GO, Raw.go_data(name))
        r.starttls(setup.anon_creds, extra=injected)
        # the injected GO was not answered: nothing is waiting on the TLS stream
        r.s.settimeout(0.5)
        with pytest.raises(TimeoutError):
            r.s.recv(1)
        r.s.settimeout(10)
        # and the injected STRUCTURED_REPLY was not honoured: GO now advertises no DF, and a READ gets a
        # simple reply
        flags = r.go_flags(name)
        assert not flags & FLAG_SEND_DF
        r.s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 0, 7, 0, 4096))
        magic, err, cookie = struct.unpack(">IIQ", r.recv(16))
        assert (magic, err, cookie) == (SIMPLE_REPLY_MAGIC, 0, 7)
        assert r.recv(4096) == b"\x5a" * 4096
        r.close()
    finally:
        log = stop(srv)
    assert "plaintext after STARTTLS discarded" in log
    assert f"bytes={len(injected)}" in log


# ================================================================================================ refusals

def test_refusals_are_logged_with_reason_and_peer_and_others_are_served(setup: Setup) -> None:
    other = CA.make("CN=another CA")
    # a client certificate from a CA the server does not know (the client trusts the server's CA)
    wrong_ca = other.client_dir(setup.tmp / "creds" / "wrongca", CLIENT_DN, trust=setup.ca)
    # a client that does not trust the server's CA: it hangs up, and the server says so
    untrusting = setup.ca.client_dir(setup.tmp / "creds" / "untrusting", CLIENT_DN, trust=other)
    expired = setup.ca.client_dir(setup.tmp / "creds" / "expired", CLIENT_DN, expired=True)
    stranger = setup.ca.client_dir(setup.tmp / "creds" / "stranger", "CN=stranger,O=Elsewhere,C=FR")
    config = setup.tmp / "access.toml"
    config.write_text(f'[[access]]\nexports = ["{volid(setup.raw)}"]\nauthz = ["CN=client.example.com,*"]\n')
    srv = setup.start("--tls-verify-peer", "--config", str(config))
    name = volid(setup.raw)
    good = nbds(srv, name, setup.client_creds)
    try:
        for creds in (wrong_ca, untrusting, expired):
            proc = run(peer("nbdinfo"), nbds(srv, name, creds), check=False)
            assert proc.returncode != 0
            assert run(peer("nbdinfo"), good).returncode == 0  # the server keeps serving others
        proc = run(peer("nbdinfo"), nbds(srv, name, stranger), check=False)
        assert proc.returncode != 0
        # the stranger may use another export, which has no DN list
        run(peer("nbdinfo"), nbds(srv, volid(setup.qcow2), stranger))
        # and its listing leaves out the export it may not open
        listed = run(peer("nbdinfo"), "--list", "--json",
                     f"nbds://127.0.0.1:{srv.port}?tls-certificates={stranger}").stdout
        names = [e["export-name"] for e in json.loads(listed)["exports"]]
        assert volid(setup.qcow2) in names and name not in names
        # the refusal of the DN is NBD_REP_ERR_POLICY and nothing else (no data)
        r = Raw(srv.port)
        r.starttls(stranger)
        assert [t for t, _ in r.option(OPT_GO, Raw.go_data(name))] == [REP_ERR_POLICY]
        r.close()
        # a TLS client without a certificate is refused (verify-peer)
        proc = run(peer("nbdinfo"), nbds(srv, name, setup.anon_creds), check=False)
        assert proc.returncode != 0
    finally:
        log = stop(srv)
    lines = [ln for ln in log.splitlines() if "TLS handshake failed" in ln]
    assert any("certificate has expired" in ln for ln in lines), lines
    assert any("unable to get local issuer certificate" in ln for ln in lines), lines
    assert any("peer closed the connection during the TLS handshake" in ln for ln in lines), lines
    assert any("PEER_DID_NOT_RETURN_A_CERTIFICATE" in ln or "certificate required" in ln.lower()
               for ln in lines), lines
    assert all("peer=127.0.0.1:" in ln for ln in lines)
    refused = [ln for ln in log.splitlines() if "export refused" in ln and "not authorized" in ln]
    assert refused and "CN=stranger" in refused[0] and "peer=127.0.0.1:" in refused[0]


def test_tls_on_serves_plaintext_except_exports_that_require_tls(setup: Setup) -> None:
    config = setup.tmp / "access.toml"
    config.write_text(f'[[access]]\nexports = ["{volid(setup.raw)}"]\ntls = "require"\n')
    srv = setup.start("--tls", "on", "--config", str(config))
    try:
        proc = run(peer("nbdinfo"), srv.uri(volid(setup.raw)), check=False)
        assert proc.returncode != 0
        r = Raw(srv.port)
        assert [t for t, _ in r.option(OPT_GO, Raw.go_data(volid(setup.raw)))] == [REP_ERR_TLS_REQD]
        listed = [b[4:].split(b"\0")[0] for t, b in r.option(OPT_LIST) if t == REP_SERVER]
        assert not any(volid(setup.raw).encode() in b for b in listed)
        assert any(volid(setup.qcow2).encode() in b for b in listed)
        r.close()
        out = run(peer("nbdinfo"), srv.uri(volid(setup.qcow2))).stdout.decode()
        assert "without TLS" in out
        out = run(peer("nbdinfo"), nbds(srv, volid(setup.raw), setup.anon_creds)).stdout.decode()
        assert "with TLS" in out
        run(peer("qemu-io"), *qemu_opts(srv, volid(setup.raw), setup.anon_creds), "-c", "read -P 0x5a 0 1M")
    finally:
        stop(srv)


def test_access_by_address(setup: Setup) -> None:
    config = setup.tmp / "access.toml"
    config.write_text(f'[server]\nallow = ["127.0.0.1/32", "127.0.0.3"]\n'
                      f'[[access]]\nexports = ["{volid(setup.qcow2)}"]\nallow = ["127.0.0.3/32"]\n')
    srv = setup.start("--tls", "on", "--config", str(config))
    try:
        # outside the server-wide list: closed before the greeting
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=5, source_address=("127.0.0.2", 0))
        assert s.recv(100) == b""
        s.close()
        # inside it, but not on the export's list: NBD_REP_ERR_POLICY for that export alone
        r = Raw(srv.port)
        assert [t for t, _ in r.option(OPT_GO, Raw.go_data(volid(setup.qcow2)))] == [REP_ERR_POLICY]
        assert r.go_flags(volid(setup.raw))
        r.close()
        r = Raw(srv.port, source="127.0.0.3")
        assert r.go_flags(volid(setup.qcow2))
        r.close()
    finally:
        log = stop(srv)
    assert "address not allowed" in log and "peer=127.0.0.2:" in log


# ================================================================================ reload, admin, shutdown

def test_reload_gives_new_connections_new_credentials_and_leaves_running_ones(setup: Setup) -> None:
    admin = setup.tmp / "admin.sock"
    creds = setup.tmp / "live-creds"
    shutil.copytree(setup.server_creds, creds)
    srv = start_server(setup.tmp / "srv", "--tls-creds", str(creds), "--tls-verify-peer", "--admin-socket",
                       str(admin), pool=setup.pool)
    name = volid(setup.raw)
    try:
        old = Raw(srv.port)
        old.starttls(setup.client_creds)
        old.go_flags(name)
        clients = admin_run(admin, "query-clients")
        assert [c["tls"] for c in clients] == [True]
        assert clients[0]["tls-client"] == CLIENT_DN
        # a new CA and new server credentials in the same directory, then reload
        ca2 = CA.make("CN=second CA")
        ca2.server_dir(creds)
        new_client = ca2.client_dir(setup.tmp / "creds" / "client2", "CN=second client")
        out = admin_run(admin, "reload-config")
        assert out["tls"] == {"mode": "require", "credentials": str(creds), "verify-peer": True}
        assert run(peer("nbdinfo"), nbds(srv, name, setup.client_creds), check=False).returncode != 0
        assert "with TLS" in run(peer("nbdinfo"), nbds(srv, name, new_client)).stdout.decode()
        # the running connection still reads
        old.s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 0, 9, 0, 512))
        assert struct.unpack(">IIQ", old.recv(16)) == (SIMPLE_REPLY_MAGIC, 0, 9)
        assert old.recv(512) == b"\x5a" * 512
        # SIGHUP does the same; broken credentials change nothing and are the error
        (creds / "server-key.pem").write_text("garbage\n")
        with pytest.raises(Exception, match="cannot load"):
            admin_run(admin, "reload-config")
        assert "with TLS" in run(peer("nbdinfo"), nbds(srv, name, new_client)).stdout.decode()
        old.close()
    finally:
        stop(srv)


def test_shutdown_does_not_wait_for_clients_in_the_handshake(setup: Setup) -> None:
    srv = setup.start()
    idle = Raw(srv.port)  # says nothing after its flags
    stalled = Raw(srv.port)
    stalled.s.sendall(Raw.opt(OPT_STARTTLS))  # acknowledged, then never starts the TLS handshake
    assert stalled.replies(OPT_STARTTLS) == [(REP_ACK, b"")]
    half = Raw(srv.port)
    half.s.sendall(Raw.opt(OPT_STARTTLS))
    half.replies(OPT_STARTTLS)
    half.s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc")  # a ClientHello that never ends
    time.sleep(0.2)
    t0 = time.monotonic()
    stop(srv)
    took = time.monotonic() - t0
    print(f"shutdown with 3 clients stalled in the handshake took {took:.3f} s")
    assert took < 2.0
    for r in (idle, stalled, half):
        r.close()


def test_bad_configurations_are_refused_at_start(setup: Setup, tmp_path: Path) -> None:
    def fails(*args: str) -> str:
        proc = subprocess.run([*_nbdsrv(), "serve", "--pool", f"local={setup.pool}", *args],
                              capture_output=True, timeout=30, env=_pyenv())
        assert proc.returncode == 1, proc
        return proc.stderr.decode()

    assert "is not a directory" in fails("--tls-creds", str(tmp_path / "nowhere" / "x"))
    (tmp_path / "empty").mkdir()
    assert "server-cert.pem' does not exist" in fails("--tls-creds", str(tmp_path / "empty"))
    assert "needs credentials" in fails("--tls", "require")
    assert "needs --tls-verify-peer" in fails("--tls-creds", str(setup.server_creds), "--tls-authz", "x.json")
    assert "invalid address range" in fails("--allow", "10.0.0.0/33")
    assert "PSK is not available" in fails("--tls-psk", str(tmp_path / "keys.psk"))
    expired = setup.ca.server_dir(tmp_path / "expired", expired=True)
    assert "has expired" in fails("--tls-creds", str(expired))


def _nbdsrv() -> list[str]:
    import sys

    return [sys.executable, "-m", "nbdsrv"]


def _pyenv() -> dict[str, str]:
    from tests.peers import REPO

    return dict(os.environ, PYTHONPATH=str(REPO))
