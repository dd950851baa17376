"""The `nbdsrv` command: `nbdsrv serve` runs the NBD server, `nbdsrv qemu-nbd` is qemu-nbd's command line
over the same server (nbdsrv/qemunbd.py), `nbdsrv admin` talks to its admin socket, `nbdsrv health`
probes it (the container's HEALTHCHECK)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from imagecore.errors import BlockError

from .activation import InheritedSocket, listen_fds
from .config import (
    LOG_FORMATS,
    LOG_LEVELS,
    TLS_MODES,
    ImageConfig,
    ListenAddr,
    ServerConfig,
    TLSConfig,
    load_toml,
    parse_group,
    parse_listen,
    parse_pool_arg,
    parse_socket_mode,
)
from .formats import image_formats


class _VersionAction(argparse.Action):
    """`--version`: "nbdsrv X.Y.Z", as qemu-nbd's first line reads; the version is looked up only here."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        from imagecore.version import package_version

        print(f"nbdsrv {package_version()}")
        parser.exit()


# The log format of errors found before the configuration is read (set by main from --log-format or
# $NBDSRV_LOG_FORMAT): with json, an argument error is one JSON record too.
_error_format = "logfmt"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        if _error_format == "json":
            from .log import report_error

            report_error(f"{self.prog}: {message}", "json")
            self.exit(2)
        super().error(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nbdsrv", description="NBD server for directory pools of VM disks", allow_abbrev=False)
    p.add_argument("-V", "--version", action=_VersionAction)
    sub = p.add_subparsers(dest="command", required=True)
    # No abbreviations: --name/--format are paired with their --image by scanning argv for exact flags.
    s = sub.add_parser("serve", help="run the NBD server", allow_abbrev=False)
    s.add_argument("--listen", action="append", default=[], metavar="ADDR",
                   help="HOST:PORT, [V6]:PORT, :PORT (all addresses), HOST (port 10809) or unix:PATH; "
                        "repeatable; default $NBDSRV_LISTEN (addresses separated by commas), else "
                        "127.0.0.1:10809")
    s.add_argument("--pool", action="append", default=[], metavar="NAME=PATH",
                   help="a Proxmox-style directory pool; NAME is [A-Za-z][A-Za-z0-9_.-]*; repeatable. "
                        "NAME=PATH,shared: a directory several nodes serve at once (CephFS, NFS); "
                        "NAME=rbd:POOL[/NAMESPACE][,conf=FILE][,client=NAME]: a Ceph RBD pool; ,ro: "
                        "read-only")
    s.add_argument("--node", default=None, metavar="NAME",
                   help="this server's name in logs, metrics and query-status, when several serve one "
                        "pool (default $NBDSRV_NODE, else the host name)")
    s.add_argument("--config", metavar="FILE",
                   help="a TOML file (below); flags add to its lists and override its scalars")
    s.add_argument("--read-only", action="store_true", help="export everything read-only")
    s.add_argument("--pid-file", metavar="PATH", help="written once the server listens, removed on exit")
    s.add_argument("--stdio", action="store_true",
                   help="serve one client on the socket given as stdin/stdout and exit when it leaves "
                        "(libnbd's nbd_connect_command; nbdkit -s); nothing else is written to stdout")
    s.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="a single image outside any pool, as qemu-nbd serves it; --name, --format, "
                        "--snapshot and --cow after it apply to it; repeatable")
    s.add_argument("--name", action="append", default=[], metavar="NAME",
                   help="export name of the preceding --image (\"\" is always exported too)")
    s.add_argument("--format", action="append", default=[], choices=image_formats(),
                   help="format of the preceding --image (default: from its extension)")
    s.add_argument("--key-secret", action="append", default=[], metavar="ID",
                   help="the --object secret that unlocks the preceding encrypted --image (luks, or qcow2 "
                        "with LUKS encryption)")
    s.add_argument("--object", action="append", default=[], metavar="secret,id=ID,data=TEXT",
                   help="a QEMU secret object, as qemu-nbd and qemu-img take it (data= or file=, "
                        "format=raw or base64); repeatable")
    s.add_argument("--snapshot", action="append", default=[], metavar="ID_OR_NAME",
                   help="serve this internal snapshot of the preceding qcow2 --image, read-only "
                        "(qemu-nbd -l)")
    s.add_argument("--cow", action="count", default=0,
                   help="let clients of the preceding --image write to a temporary overlay that vanishes "
                        "when the export closes; the image is opened read-only and never changed "
                        "(qemu-nbd -s)")
    s.add_argument("--bitmap", action="append", default=[], metavar="NAME",
                   help="offer only this persistent dirty bitmap of the preceding qcow2 --image as the "
                        "qemu:dirty-bitmap:NAME context (repeatable; qemu-nbd -B; default: all of them)")
    s.add_argument("--log-level", choices=LOG_LEVELS, default=None,
                   help="default $NBDSRV_LOG_LEVEL, else info")
    s.add_argument("--log-format", choices=LOG_FORMATS, default=None,
                   help="one record per line on stderr; json: every line is a JSON object (default "
                        "$NBDSRV_LOG_FORMAT, else logfmt)")
    s.add_argument("--max-requests", type=int, default=None, metavar="N",
                   help="requests in flight per connection (default 64)")
    s.add_argument("--max-bytes", type=int, default=None, metavar="N",
                   help="payload bytes in flight per connection (default 64 MiB)")
    s.add_argument("--max-connections", type=int, default=None, metavar="N",
                   help="clients at once, in the handshake or past it (default 1024)")
    s.add_argument("--max-connections-per-address", type=int, default=None, metavar="N",
                   help="clients at once from one IP address (default 128)")
    s.add_argument("--max-handshakes", type=int, default=None, metavar="N",
                   help="clients at once that have not finished the handshake (default 128)")
    s.add_argument("--max-handshakes-per-address", type=int, default=None, metavar="N",
                   help="of those, from one IP address (default 16)")
    s.add_argument("--socket-mode", default=None, metavar="OCTAL",
                   help="mode of the unix: listening sockets, e.g. 0660 (default: 0777 less the umask)")
    s.add_argument("--socket-group", default=None, metavar="GROUP",
                   help="group of the unix: listening sockets, a name or a gid (e.g. kvm, for libvirt's "
                        "QEMU)")
    s.add_argument("--admin-socket", default=None, metavar="PATH",
                   help="serve the admin socket (QMP-shaped JSON, mode 0600) at PATH")
    s.add_argument("--metrics", default=None, metavar="HOST:PORT",
                   help="serve Prometheus metrics over HTTP at HOST:PORT/metrics")
    s.add_argument("--handshake-timeout", type=float, default=None, metavar="SECONDS",
                   help="a client in the handshake that has been answered nothing for this long (it "
                        "sent no whole option, or stalled in the TLS handshake) is closed (default 10; "
                        "0 = never)")
    s.add_argument("--allow", action="append", default=[], metavar="CIDR",
                   help="accept TCP clients only from this address range, e.g. 10.0.0.0/8 or ::1/128 "
                        "(repeatable; others are closed before the greeting; default: any)")
    s.add_argument("--tls", choices=TLS_MODES, default=None,
                   help="off: plaintext only; on: TLS offered, plaintext allowed; require: no option, "
                        "list or data without TLS (default: require with --tls-creds, else off)")
    s.add_argument("--tls-creds", default=None, metavar="DIR",
                   help="x509 credentials in QEMU's tls-creds-x509 layout: ca-cert.pem, server-cert.pem, "
                        "server-key.pem, optional dh-params.pem and ca-crl.pem")
    s.add_argument("--tls-verify-peer", action="store_true",
                   help="require a client certificate signed by the CA in ca-cert.pem")
    s.add_argument("--tls-authz", default=None, metavar="FILE",
                   help="allow only client certificates whose DN these rules allow (QEMU's "
                        "authz-list-file JSON; needs --tls-verify-peer)")
    s.add_argument("--tls-psk", default=None, metavar="FILE",
                   help="TLS-PSK keys (username:hexkey lines, QEMU's keys.psk); not available on this "
                        "Python: see docs/tls.md")
    # parsed by nbdsrv/qemunbd.py with qemu-nbd's own rules; listed here for --help
    sub.add_parser("qemu-nbd", help="serve one image with qemu-nbd 7.2's options (see nbdsrv qemu-nbd "
                                    "--help and docs/qemu-nbd.md)", add_help=False)
    a = sub.add_parser("admin", help="run one command on a running server's admin socket",
                       allow_abbrev=False,
                       description="Run COMMAND on the admin socket and print what it returns, as JSON "
                                   "(or a table with --human). Arguments are KEY=VALUE; a VALUE that "
                                   "parses as JSON (a number, true, [..]) is taken as JSON.")
    a.add_argument("--socket", default=None, metavar="PATH",
                   help="the admin socket (default $NBDSRV_ADMIN_SOCKET or /run/nbdsrv/admin.sock)")
    a.add_argument("--human", action="store_true", help="print a readable table instead of JSON")
    a.add_argument("--wait", action="store_true",
                   help="when COMMAND starts a job, wait for it to conclude (a progress bar on a terminal), "
                        "print its record, dismiss it, and exit 1 if it failed")
    a.add_argument("admin_command", metavar="COMMAND", help="e.g. query-pools, volume-list, query-commands")
    a.add_argument("arguments", nargs="*", metavar="KEY=VALUE")
    h = sub.add_parser("health", help="exit 0 if an NBD server answers at ADDR (the container's HEALTHCHECK)",
                       allow_abbrev=False,
                       description="Read the NBD greeting at ADDR and end the handshake at once: no export "
                                   "is opened and no image lock is taken. Exit 0 if it came, else print why "
                                   "and exit 1.")
    h.add_argument("address", nargs="?", default=None, metavar="ADDR",
                   help="HOST:PORT or unix:PATH (default: the first of $NBDSRV_LISTEN, else "
                        "127.0.0.1:10809; 0.0.0.0 and :: are probed on the loopback address)")
    h.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="default 5")
    return p


def _admin(args: argparse.Namespace) -> int:
    import asyncio

    from .admin.client import AdminError, JobFailedError, default_socket, run_command

    try:
        out = asyncio.run(run_command(args.socket or default_socket(), args.admin_command, args.arguments,
                                      human=args.human, wait=args.wait))
    except AdminError as e:
        print(f"nbdsrv admin: {e.error_class}: {e}", file=sys.stderr)
        return 1
    except JobFailedError as e:
        print(e.rendered)
        print(f"nbdsrv admin: {e}", file=sys.stderr)
        return 1
    except BlockError as e:
        print(f"nbdsrv admin: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


def _images(argv: list[str], args: argparse.Namespace) -> list[ImageConfig]:
    """Pair each --name/--format with the --image before it, in command-line order."""
    if not args.image:
        if args.name or args.format or args.snapshot or args.bitmap or args.cow:
            raise BlockError("--name, --format, --snapshot, --bitmap and --cow need an --image")
        if args.key_secret:
            raise BlockError("--key-secret needs an --image")
        return []
    images: list[dict[str, str]] = []
    bitmaps: list[list[str]] = []
    i = 0
    while i < len(argv):
        key, eq, val = argv[i].partition("=")
        i += 1
        if key not in ("--image", "--name", "--format", "--snapshot", "--bitmap", "--cow", "--key-secret"):
            continue
        if key == "--cow":
            val = "1"  # a flag: it takes no value
        elif not eq:
            val = argv[i] if i < len(argv) else ""
            i += 1
        field = key[2:]
        if field == "image":
            images.append({"path": val})
            bitmaps.append([])
        elif not images:
            raise BlockError(f"{key} must follow the --image it belongs to")
        elif field == "bitmap":
            bitmaps[-1].append(val)
        elif field in images[-1]:
            raise BlockError(f"{key} given twice for image '{images[-1]['path']}'")
        else:
            images[-1][field] = val
    return [ImageConfig(path=d["path"], name=d.get("name"), format=d.get("format"),
                        snapshot=d.get("snapshot"), cow="cow" in d, bitmaps=tuple(b) if b else None,
                        key_secret=d.get("key-secret"))
            for d, b in zip(images, bitmaps, strict=True)]


def _from_environment(cfg: ServerConfig) -> None:
    """$NBDSRV_LOG_FORMAT, $NBDSRV_LOG_LEVEL and $NBDSRV_NODE: defaults the configuration file and the
    flags override (the container image sets the first two; a container's host name is its id, so a node
    in a container is named with $NBDSRV_NODE or --node)."""
    import os

    if os.environ.get("NBDSRV_LOG_FORMAT"):
        cfg.log_format = os.environ["NBDSRV_LOG_FORMAT"]
    if os.environ.get("NBDSRV_LOG_LEVEL"):
        cfg.log_level = os.environ["NBDSRV_LOG_LEVEL"]
    if os.environ.get("NBDSRV_NODE"):
        cfg.node = os.environ["NBDSRV_NODE"]


def _listen_from_environment() -> list[str]:
    """$NBDSRV_LISTEN: the addresses to listen on when neither the file nor the flags give one."""
    import os

    return os.environ.get("NBDSRV_LISTEN", "").replace(",", " ").split()


def build_config(argv: list[str], args: argparse.Namespace,
                 inherited: Sequence[InheritedSocket] = ()) -> ServerConfig:
    """The configuration of `nbdsrv serve`: the environment's defaults, the file, then the flags, then the
    sockets passed by socket activation (one named "admin" is the admin socket; every other one an NBD
    listener); $NBDSRV_LISTEN when none of them gives a listener (and not with --stdio)."""
    cfg = ServerConfig()
    _from_environment(cfg)
    if args.config:
        load_toml(args.config, cfg)
    cfg.listen.extend(parse_listen(a) for a in args.listen)
    for s in inherited:
        if s.name == "admin":
            cfg.admin_fd = s.fd
        else:
            cfg.listen.append(ListenAddr(fd=s.fd, name=s.name))
    cfg.stdio = args.stdio
    if not cfg.listen and not cfg.stdio:
        cfg.listen.extend(parse_listen(a) for a in _listen_from_environment())
    cfg.pools.extend(parse_pool_arg(a) for a in args.pool)
    cfg.images.extend(_images(argv, args))
    if args.object:
        from imagecore.filenames import add_object

        for text in args.object:
            add_object(text)
    if args.read_only:
        cfg.read_only = True
    if args.pid_file:
        cfg.pid_file = args.pid_file
    if args.node is not None:
        cfg.node = args.node
    if args.log_level:
        cfg.log_level = args.log_level
    if args.log_format:
        cfg.log_format = args.log_format
    if args.max_requests is not None:
        cfg.max_requests = args.max_requests
    if args.max_bytes is not None:
        cfg.max_bytes = args.max_bytes
    if args.max_connections is not None:
        cfg.max_connections = args.max_connections
    if args.handshake_timeout is not None:
        cfg.handshake_timeout = args.handshake_timeout
    for key in ("max_connections_per_address", "max_handshakes", "max_handshakes_per_address"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    if args.admin_socket is not None:
        cfg.admin_socket = args.admin_socket
    if args.metrics is not None:
        cfg.metrics = parse_listen(args.metrics)
    if args.socket_mode is not None:
        cfg.socket_mode = parse_socket_mode(args.socket_mode)
    if args.socket_group is not None:
        cfg.socket_group = parse_group(args.socket_group)
    cfg.allow.extend(args.allow)
    t = cfg.tls
    cfg.tls = TLSConfig(mode=args.tls if args.tls is not None else t.mode,
                        creds=args.tls_creds if args.tls_creds is not None else t.creds,
                        verify_peer=args.tls_verify_peer or t.verify_peer,
                        authz=args.tls_authz if args.tls_authz is not None else t.authz,
                        psk_file=args.tls_psk if args.tls_psk is not None else t.psk_file)
    cfg.validate()
    return cfg


def main(argv: list[str] | None = None) -> int:
    global _error_format
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "qemu-nbd":
        from .qemunbd import main as qemu_nbd

        return qemu_nbd(argv[1:])
    from .log import early_format, report_error

    fmt = early_format(argv)
    # argument errors of the server's command line join its log; `admin` and `health` are commands a
    # person (or a probe) runs, whose errors stay plain lines even where the environment says json
    _error_format = "logfmt" if argv and argv[0] in ("admin", "health") else fmt
    args = _parser().parse_args(argv)
    if args.command == "admin":
        return _admin(args)
    if args.command == "health":
        from .health import main as health

        return health(args.address, args.timeout)
    from .app import run, serve
    from .log import setup_logging

    try:
        if fmt == "json":
            # until the configuration is read: an uncaught exception or a warning is a JSON record too
            setup_logging("info", fmt)
        inherited = listen_fds()
        cfg = build_config(argv, args, inherited)
        fmt = cfg.log_format
        setup_logging(cfg.log_level, cfg.log_format, node=cfg.node)
        rc = run(serve(cfg, reload=lambda: build_config(argv, args, inherited)))
    except BlockError as e:
        report_error(str(e), fmt)
        return 1
    except KeyboardInterrupt:
        return 1
    # serve has answered or refused every request, flushed and closed every image, removed its sockets
    # and pid file: nothing is left to save. Tearing the interpreter down (every module, every object)
    # still took 0.2 to 0.5 s on a loaded machine, on the clock of `docker stop` and `systemctl stop`;
    # leave at once instead, once the log is out.
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
