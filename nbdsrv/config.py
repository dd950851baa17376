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
    handshake_timeout = 10.0    # seconds a client may take to reach transmission; 0 = no limit
    socket_mode = "0660"        # mode of the unix sockets in listen (or an integer: 0o660)
    socket_group = "kvm"        # their group: a name or a gid

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
IMAGE_FORMATS = ("raw", "qcow2", "vmdk")


@dataclass(frozen=True, slots=True)
class ListenAddr:
    """An address to listen on: TCP (host, port) or a unix socket path."""

    host: str | None = None
    port: int | None = None
    unix: str | None = None

    def __str__(self) -> str:
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

    def validate(self) -> None:
        if not self.listen:
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
    _check_keys(data, {"server", "pools", "images", "admin", "metrics"}, path)
    server = _expect(data.get("server", {}), dict, "[server]")
    _check_keys(server, {"listen", "read_only", "log_level", "log_format", "pid_file", "max_requests",
                         "max_bytes", "max_total_bytes", "handshake_timeout", "socket_mode", "socket_group",
                         *_SERVER_SCALARS}, "[server]")
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


def _bitmap_names(value: Any, where: str) -> tuple[str, ...]:
    names = _expect(value, list, f"{where} bitmaps")
    for n in names:
        _expect(n, str, f"{where} bitmaps")
    return tuple(names)
