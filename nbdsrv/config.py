"""Server configuration: the TOML file and the command-line flags merged into one validated ServerConfig.

The TOML file looks like::

    [server]
    listen = ["127.0.0.1:10809", "unix:/run/nbdsrv.sock"]
    read_only = false
    log_level = "info"          # debug | info | warning | error
    log_format = "logfmt"       # logfmt | json
    pid_file = "/run/nbdsrv.pid"
    max_requests = 64           # per connection, in flight
    max_bytes = 67108864        # per connection, in flight
    max_total_bytes = 268435456 # all connections together, in flight
    max_connections = 1024      # clients at once, in the handshake or not
    max_connections_per_address = 128   # of those, from one peer IP address
    max_handshakes = 128        # clients at once that have not finished the handshake
    max_handshakes_per_address = 16     # of those, from one peer IP address
    handshake_timeout = 10.0    # seconds a client in the handshake may go unanswered; 0 = no limit
    socket_mode = "0660"        # mode of the unix sockets in listen (or an integer: 0o660)
    socket_group = "kvm"        # their group: a name or a gid
    allow = ["10.0.0.0/8"]      # peers (CIDR) that may connect over TCP; default: anyone

    [tls]
    mode = "require"            # off | on (TLS offered, plaintext allowed) | require; default: require
                                # when creds or psk_file is given, else off
    creds = "/etc/pki/qemu"     # a QEMU tls-creds-x509 directory: ca-cert.pem, server-cert.pem,
                                # server-key.pem, optional dh-params.pem and ca-crl.pem
    verify_peer = true          # clients must present a certificate signed by ca-cert.pem
    authz = "/etc/nbdsrv/authz.json"    # QEMU authz-list-file rules on the client certificate's DN
    psk_file = "/etc/nbdsrv/keys.psk"   # TLS-PSK (see docs/tls.md for whether it is available)

    [[access]]                  # rules for the exports whose names match one of `exports` (globs)
    exports = ["local:100/*", "disk"]
    tls = "require"             # these exports need TLS even when [tls] mode is "on"
    allow = ["10.1.0.0/16"]     # and a peer in one of these ranges
    authz = ["CN=backup.example.com,O=Example", "CN=*.vm.example.com"]  # and a client DN (exact or glob)

    [metrics]
    listen = "127.0.0.1:9109"   # serve Prometheus metrics at http://HOST:PORT/metrics

    [pools.local]
    path = "/var/lib/vz"
    read_only = false

    [[images]]
    path = "/srv/disk.qcow2"
    name = "disk"               # optional; "" (qemu-nbd's default) is always exported too
    format = "qcow2"            # optional; else from the extension, never probed
    bitmaps = ["b0"]            # optional; the dirty bitmaps offered (qemu-nbd -B); default: all
    cow = true                  # optional: clients write to a temporary overlay, never the image

Flags given on the command line are added to (lists) or override (scalars) what the file says.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from imagecore.errors import InvalidArgumentError

DEFAULT_PORT = 10809
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("logfmt", "json")
IMAGE_FORMATS = ("raw", "qcow2", "vmdk", "vdi", "vpc", "parallels")
TLS_MODES = ("off", "on", "require")


@dataclass(frozen=True, slots=True)
class ListenAddr:
    """An address to listen on: TCP (host, port), a unix socket path, or a listening socket inherited by
    socket activation (its descriptor and name)."""

    host: str | None = None
    port: int | None = None
    unix: str | None = None
    fd: int | None = None
    name: str | None = None

    def __str__(self) -> str:
        if self.fd is not None:
            return f"fd:{self.fd}({self.name})" if self.name else f"fd:{self.fd}"
        if self.unix is not None:
            return f"unix:{self.unix}"
        if self.host is not None and ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class PoolConfig:
    name: str
    path: str
    read_only: bool = False


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """A single image served outside any pool, as qemu-nbd does."""

    path: str
    name: str | None = None
    format: str | None = None
    snapshot: str | None = None  # export this internal snapshot, read-only (qemu-nbd -l)
    cow: bool = False  # writes go to a temporary overlay that vanishes with the export (qemu-nbd -s)
    # the persistent dirty bitmaps offered as qemu:dirty-bitmap:NAME contexts (qemu-nbd -B); None: all
    bitmaps: tuple[str, ...] | None = None
    # what LIST and INFO say about it (qemu-nbd -D); None: its format and kind
    description: str | None = None
    # offer qemu:allocation-depth (qemu-nbd offers it only with -A)
    allocation_depth: bool = True
    # the first image is also exported as "" (qemu-nbd's default name); qemu-nbd -x NAME exports NAME only
    default_name: bool = True
    # advertise NBD_FLAG_CAN_MULTI_CONN when the image can honour it (qemu-nbd -e 1 does not advertise it:
    # a client such as nbdcopy would open connections the server then refuses)
    multi_conn: bool = True
    # advertise as qemu-nbd 7.2 does: FUA on read-only exports too, and a preferred block size of 4096
    # (not the qcow2 cluster size); both are hints a client may ignore, kept equal for `qemu-nbd -L`
    qemu_blocks: bool = False


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """``[tls]`` and the --tls* flags. ``mode`` None means: require if credentials are given, else off."""

    mode: str | None = None
    creds: str | None = None
    verify_peer: bool = False
    authz: str | None = None
    psk_file: str | None = None

    @property
    def effective_mode(self) -> str:
        if self.mode is not None:
            return self.mode
        return "require" if self.creds is not None or self.psk_file is not None else "off"


@dataclass(frozen=True, slots=True)
class AccessRule:
    """One ``[[access]]`` table: what the exports matching ``exports`` (globs) demand of a client."""

    exports: tuple[str, ...]
    tls: str | None = None          # "require": TLS for these exports even when the server allows plaintext
    allow: tuple[str, ...] = ()     # CIDR ranges the peer must be in
    authz: tuple[str, ...] = ()     # client certificate DNs, exact or glob (* and ?)


@dataclass(slots=True)
class ServerConfig:
    listen: list[ListenAddr] = field(default_factory=list)
    pools: list[PoolConfig] = field(default_factory=list)
    images: list[ImageConfig] = field(default_factory=list)
    read_only: bool = False
    pid_file: str | None = None
    log_level: str = "info"
    log_format: str = "logfmt"
    max_requests: int = 64
    max_bytes: int = 64 * 1024 * 1024
    max_total_bytes: int = 256 * 1024 * 1024
    handshake_timeout: float = 10.0
    max_connections: int = 1024
    max_connections_per_address: int = 128
    max_handshakes: int = 128
    max_handshakes_per_address: int = 16
    socket_mode: int | None = None
    socket_group: int | None = None
    # the admin socket (QMP-shaped JSON); None serves none
    admin_socket: str | None = None
    # where to serve Prometheus metrics (HTTP GET /metrics); None serves none
    metrics: ListenAddr | None = None
    tls: TLSConfig = field(default_factory=TLSConfig)
    # CIDR ranges whose peers may connect over TCP; empty: any
    allow: list[str] = field(default_factory=list)
    access: list[AccessRule] = field(default_factory=list)
    # False: stop once the last client that reached transmission has gone (qemu-nbd without -t)
    persistent: bool = True
    # serve one connection on stdin/stdout (a socket) and stop when it closes (nbdkit -s)
    stdio: bool = False
    # an admin socket inherited by socket activation (a descriptor named "admin")
    admin_fd: int | None = None
    # open every --image before listening and keep it open until exit, as qemu-nbd does: one that cannot
    # be opened (a missing snapshot, a damaged header, a lock held) stops the start, its lock bytes are
    # held the whole time, and a --cow overlay lives from one client to the next
    hold_images: bool = False
    # over max_connections a client waits for a slot (qemu-nbd -e) instead of being closed at once
    queue_when_full: bool = False

    def validate(self) -> None:
        if self.stdio and self.listen:
            raise InvalidArgumentError("--stdio serves one connection on stdin/stdout: it takes no --listen "
                                       "and no inherited sockets")
        if not self.listen and not self.stdio:
            self.listen = [parse_listen(DEFAULT_LISTEN)]
        if not self.pools and not self.images:
            raise InvalidArgumentError("nothing to export: give --pool NAME=PATH, --image PATH or --config")
        if self.log_level not in LOG_LEVELS:
            raise InvalidArgumentError(f"invalid log level '{self.log_level}'")
        if self.log_format not in LOG_FORMATS:
            raise InvalidArgumentError(f"invalid log format '{self.log_format}'")
        if self.max_requests < 1 or self.max_bytes < 64 * 1024 or self.max_total_bytes < 64 * 1024:
            raise InvalidArgumentError("max_requests must be >= 1, max_bytes and max_total_bytes >= 65536")
        for key in ("max_connections", "max_connections_per_address", "max_handshakes",
                    "max_handshakes_per_address"):
            if getattr(self, key) < 1:
                raise InvalidArgumentError(f"{key} must be >= 1")
        if self.handshake_timeout < 0:
            raise InvalidArgumentError("handshake_timeout must not be negative")
        names = [p.name for p in self.pools]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise InvalidArgumentError(f"pool '{sorted(dup)[0]}' is defined twice")
        for img in self.images:
            if img.format is not None and img.format not in IMAGE_FORMATS:
                raise InvalidArgumentError(f"unknown image format '{img.format}'")
        self._validate_tls()

    def _validate_tls(self) -> None:
        tls = self.tls
        mode = tls.effective_mode
        if mode not in TLS_MODES:
            raise InvalidArgumentError(f"invalid TLS mode '{mode}': expected off, on or require")
        if mode != "off" and tls.creds is None and tls.psk_file is None:
            raise InvalidArgumentError(f"TLS mode '{mode}' needs credentials: give --tls-creds DIR")
        if mode == "off" and (tls.creds is not None or tls.psk_file is not None):
            raise InvalidArgumentError("TLS credentials were given but TLS is off")
        if tls.authz is not None and not tls.verify_peer:
            raise InvalidArgumentError("--tls-authz needs --tls-verify-peer: a DN is known only from a "
                                       "verified client certificate")
        for cidr in self.allow:
            parse_cidr(cidr)
        for i, rule in enumerate(self.access):
            where = f"[[access]] #{i + 1}"
            if not rule.exports:
                raise InvalidArgumentError(f"{where}: 'exports' must name at least one export (glob)")
            if rule.tls not in (None, "require"):
                raise InvalidArgumentError(f"{where}: tls must be \"require\"")
            if (rule.tls or rule.authz) and mode == "off":
                raise InvalidArgumentError(f"{where}: needs TLS, which is off")
            if rule.authz and not tls.verify_peer:
                raise InvalidArgumentError(f"{where}: authz needs verify_peer (client certificates)")
            for cidr in rule.allow:
                parse_cidr(cidr, where)


def parse_cidr(text: str, where: str = "allow") -> Any:
    """An IPv4 or IPv6 network such as ``10.0.0.0/8`` or ``::1/128`` (a bare address is one host)."""
    import ipaddress

    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise InvalidArgumentError(f"{where}: invalid address range '{text}'") from None


# [server] keys that are plain typed values, copied as they are onto ServerConfig.
_SERVER_SCALARS: dict[str, type] = {
    "read_only": bool, "log_level": str, "log_format": str, "pid_file": str, "max_requests": int,
    "max_bytes": int, "max_total_bytes": int, "max_connections": int, "max_connections_per_address": int,
    "max_handshakes": int, "max_handshakes_per_address": int,
}


def parse_socket_mode(value: str | int) -> int:
    """An octal mode such as ``0660`` or ``660`` (TOML may also give the integer ``0o660``)."""
    if isinstance(value, int):
        mode = value
    else:
        try:
            mode = int(value.removeprefix("0o"), 8)
        except ValueError:
            raise InvalidArgumentError(f"invalid socket mode '{value}': expected octal, e.g. 0660") from None
    if not 0 <= mode <= 0o7777:
        raise InvalidArgumentError(f"invalid socket mode '{value}'")
    return mode


def parse_group(value: str | int) -> int:
    """A group name or a numeric gid."""
    import grp

    if isinstance(value, int) or value.isdigit():
        gid = int(value)
        if gid < 0:
            raise InvalidArgumentError(f"invalid socket group '{value}'")
        return gid
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise InvalidArgumentError(f"unknown socket group '{value}'") from None


def parse_listen(text: str) -> ListenAddr:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT``, ``HOST`` or ``unix:PATH``."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path or "\0" in path:
            raise InvalidArgumentError(f"invalid unix socket path in '{text}'")
        return ListenAddr(unix=path)
    host, port_s = text, str(DEFAULT_PORT)
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise InvalidArgumentError(f"invalid listen address '{text}'")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise InvalidArgumentError(f"invalid listen address '{text}'")
            port_s = rest[1:]
    elif text.count(":") == 1:
        host, port_s = text.split(":")
    elif ":" in text:
        raise InvalidArgumentError(f"IPv6 address '{text}' must be written [ADDR]:PORT")
    try:
        port = int(port_s)
    except ValueError:
        raise InvalidArgumentError(f"invalid port in listen address '{text}'") from None
    if not 0 <= port <= 65535:
        raise InvalidArgumentError(f"invalid port in listen address '{text}'")
    return ListenAddr(host=host or "0.0.0.0", port=port)


def parse_pool_arg(text: str) -> PoolConfig:
    """``NAME=PATH``."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise InvalidArgumentError(f"invalid pool '{text}': expected NAME=PATH")
    return PoolConfig(name=name, path=path)


def _expect(value: object, typ: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise InvalidArgumentError(f"{where}: wrong type {type(value).__name__}")
    return value


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(table) - allowed
    if unknown:
        raise InvalidArgumentError(f"{where}: unknown key '{sorted(unknown)[0]}'")


def load_toml(path: str, into: ServerConfig | None = None) -> ServerConfig:
    """Read a TOML configuration file into ``into`` (or a new ServerConfig)."""
    cfg = into if into is not None else ServerConfig()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read config '{path}': {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgumentError(f"config '{path}': {exc}") from None
    base = os.path.dirname(os.path.abspath(path))
    _check_keys(data, {"server", "pools", "images", "admin", "metrics", "tls", "access"}, path)
    server = _expect(data.get("server", {}), dict, "[server]")
    _check_keys(server, {"listen", "read_only", "log_level", "log_format", "pid_file", "max_requests",
                         "max_bytes", "max_total_bytes", "handshake_timeout", "socket_mode", "socket_group",
                         "allow", *_SERVER_SCALARS}, "[server]")
    listen = server.get("listen", [])
    if isinstance(listen, str):
        listen = [listen]
    for item in _expect(listen, list, "server.listen"):
        cfg.listen.append(parse_listen(_expect(item, str, "server.listen")))
    for key, typ in _SERVER_SCALARS.items():
        if key in server:
            setattr(cfg, key, _expect(server[key], typ, f"server.{key}"))
    if "socket_mode" in server:
        cfg.socket_mode = parse_socket_mode(_expect(server["socket_mode"], (str, int), "server.socket_mode"))
    if "socket_group" in server:
        cfg.socket_group = parse_group(_expect(server["socket_group"], (str, int), "server.socket_group"))
    if "handshake_timeout" in server:
        cfg.handshake_timeout = float(_expect(server["handshake_timeout"], (int, float),
                                              "server.handshake_timeout"))
    if "allow" in server:
        cfg.allow.extend(_strings(server["allow"], "server.allow"))
    tls = _expect(data.get("tls", {}), dict, "[tls]")
    _check_keys(tls, {"mode", "creds", "verify_peer", "authz", "psk_file"}, "[tls]")
    cfg.tls = TLSConfig(
        mode=_expect(tls["mode"], str, "tls.mode") if "mode" in tls else None,
        creds=os.path.join(base, _expect(tls["creds"], str, "tls.creds")) if "creds" in tls else None,
        verify_peer=_expect(tls.get("verify_peer", False), bool, "tls.verify_peer"),
        authz=os.path.join(base, _expect(tls["authz"], str, "tls.authz")) if "authz" in tls else None,
        psk_file=os.path.join(base, _expect(tls["psk_file"], str, "tls.psk_file")) if "psk_file" in tls
        else None)
    for i, table in enumerate(_expect(data.get("access", []), list, "[[access]]")):
        where = f"[[access]] #{i + 1}"
        _expect(table, dict, where)
        _check_keys(table, {"exports", "tls", "allow", "authz"}, where)
        cfg.access.append(AccessRule(
            exports=tuple(_strings(table.get("exports", []), f"{where} exports")),
            tls=_expect(table["tls"], str, f"{where} tls") if "tls" in table else None,
            allow=tuple(_strings(table.get("allow", []), f"{where} allow")),
            authz=tuple(_strings(table.get("authz", []), f"{where} authz"))))
    admin = _expect(data.get("admin", {}), dict, "[admin]")
    _check_keys(admin, {"socket"}, "[admin]")
    if "socket" in admin:
        cfg.admin_socket = os.path.join(base, _expect(admin["socket"], str, "admin.socket"))
    metrics = _expect(data.get("metrics", {}), dict, "[metrics]")
    _check_keys(metrics, {"listen"}, "[metrics]")
    if "listen" in metrics:
        cfg.metrics = parse_listen(_expect(metrics["listen"], str, "metrics.listen"))
    pools = _expect(data.get("pools", {}), dict, "[pools]")
    for name, table in pools.items():
        where = f"[pools.{name}]"
        _expect(table, dict, where)
        _check_keys(table, {"path", "read_only"}, where)
        if "path" not in table:
            raise InvalidArgumentError(f"{where}: 'path' is required")
        ppath = os.path.join(base, _expect(table["path"], str, f"{where} path"))
        cfg.pools.append(PoolConfig(name, ppath, _expect(table.get("read_only", False), bool, where)))
    for i, table in enumerate(_expect(data.get("images", []), list, "[[images]]")):
        where = f"[[images]] #{i + 1}"
        _expect(table, dict, where)
        _check_keys(table, {"path", "name", "format", "snapshot", "cow", "bitmaps"}, where)
        if "path" not in table:
            raise InvalidArgumentError(f"{where}: 'path' is required")
        cfg.images.append(ImageConfig(
            path=os.path.join(base, _expect(table["path"], str, where)),
            name=_expect(table["name"], str, where) if "name" in table else None,
            format=_expect(table["format"], str, where) if "format" in table else None,
            snapshot=_expect(table["snapshot"], str, where) if "snapshot" in table else None,
            cow=_expect(table.get("cow", False), bool, where),
            bitmaps=_bitmap_names(table["bitmaps"], where) if "bitmaps" in table else None))
    return cfg


def _strings(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    for v in _expect(value, list, where):
        _expect(v, str, where)
    return list(value)


def _bitmap_names(value: Any, where: str) -> tuple[str, ...]:
    names = _expect(value, list, f"{where} bitmaps")
    for n in names:
        _expect(n, str, f"{where} bitmaps")
    return tuple(names)
