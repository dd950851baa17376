"""`nbdsrv qemu-nbd` (also `nbdsrv-qemu-nbd`): qemu-nbd 7.2's command line over nbdsrv's own server.

The options are parsed as qemu-nbd parses them (GNU getopt, its messages and exit codes) and turned into
the same ServerConfig that `nbdsrv serve --image` builds, which app.serve() then runs: there is no second
server here. What qemu-nbd does around the server is done here too: --fork (the parent returns once the
child listens, relaying its start-up errors), -L (list another server's exports, printed as qemu-nbd
prints them, through the sans-IO client core), socket activation when LISTEN_PID/LISTEN_FDS are set, and
the end of a non-persistent server after its last client.

Options whose behaviour nbdsrv does not have are accepted when ignoring them cannot change what a client
reads or what reaches the disk (--aio, -T, --detect-zeroes, --discard, the cache modes that keep flushes
meaningful) and refused with one line otherwise; docs/qemu-nbd.md lists each.
"""

from __future__ import annotations

import getopt
import json
import os
import re
import socket
import ssl
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from imagecore.errors import BlockError

from .activation import InheritedSocket, listen_fds
from .config import AccessRule, ImageConfig, ListenAddr, ServerConfig, TLSConfig
from .formats import image_formats

PROG = "qemu-nbd"
SHORT = "hVb:o:p:rsnc:dvk:e:f:tl:x:T:D:AB:L"
LONG = ["help", "version", "bind=", "port=", "socket=", "offset=", "read-only", "snapshot",
        "load-snapshot=", "nocache", "cache=", "aio=", "discard=", "detect-zeroes=", "shared=",
        "format=", "persistent", "verbose", "connect=", "disconnect", "export-name=", "description=",
        "allocation-depth", "bitmap=", "list", "object=", "tls-creds=", "tls-authz=", "tls-hostname=",
        "image-opts", "trace=", "fork", "pid-file=", "selinux-label="]
# qemu's block drivers that nbdsrv does not serve: named so, rather than "Unknown driver"
QEMU_ONLY_FORMATS = ("bochs", "cloop", "dmg", "vvfat", "blkdebug", "nbd", "file", "host_device")
# qemu's null block drivers, served as raw over nothing (qemu-nbd -f raw null-co://)
NULL_DRIVERS = ("null-co", "null-aio")
CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")
# The cache modes nbdsrv can honour: a flush from the client still reaches the disk (none and writeback
# differ from what nbdsrv does only in the host page cache; unsafe may drop flushes, doing them is safe).
# writethrough and directsync promise every write durable without a flush, which nbdsrv does not do.
CACHE_ACCEPTED = ("none", "writeback", "unsafe")
_FLAG_NAMES = ("", "readonly", "flush", "fua", "rotational", "trim", "zeroes", "df", "multi", "resize",
               "cache", "fast-zero")
_MAX_STRING = 4096  # NBD_MAX_STRING_SIZE


class QemuNbdError(Exception):
    """A message to print as ``qemu-nbd: MESSAGE`` before exiting 1; ``hint`` adds the --help line."""

    def __init__(self, message: str, hint: str | None = None, prefix: str = PROG) -> None:
        super().__init__(message)
        self.hint = hint
        self.prefix = prefix


@dataclass
class Options:
    port: str | None = None
    bind: str | None = None
    sockpath: str | None = None
    shared: int = 1
    persistent: bool = False
    verbose: bool = False
    export_name: str | None = None
    description: str | None = None
    read_only: bool = False
    snapshot: bool = False
    load_snapshot: str | None = None
    fmt: str | None = None
    allocation_depth: bool = False
    bitmaps: list[str] = field(default_factory=list)
    list_mode: bool = False
    objects: dict[str, dict[str, str]] = field(default_factory=dict)
    tls_creds: str | None = None
    # --selinux-label: the context the unix socket is created with
    selinux_label: str | None = None
    tls_authz: str | None = None
    image_opts: bool = False
    key_secret: str | None = None  # --image-opts key-secret= or encrypt.key-secret=
    tls_hostname: str | None = None
    fork: bool = False
    pid_file: str | None = None
    detect_zeroes: str = "off"
    discard: str = "ignore"
    offset: int = 0
    files: list[str] = field(default_factory=list)


# argv[0] as invoked: glibc's getopt messages and qemu-nbd's "Try `ARGV0 --help'" use it as it is
_argv0 = PROG


def _usage_hint() -> str:
    return f"Try `{_argv0} --help' for more information."


def _getopt_error(e: getopt.GetoptError) -> QemuNbdError:
    """getopt's complaint in glibc's words, as qemu-nbd prints them."""
    opt, msg = e.opt, e.msg
    long = msg.startswith("option --")
    if "not recognized" in msg:
        text = f"unrecognized option '--{opt}'" if long else f"invalid option -- '{opt}'"
    elif "requires argument" in msg:
        text = f"option '--{opt}' requires an argument" if long else f"option requires an argument -- '{opt}'"
    elif "must not have an argument" in msg:
        text = f"option '--{opt}' doesn't allow an argument"
    elif "not a unique prefix" in msg:
        text = f"option '--{opt}' is ambiguous"
    else:
        text = msg
    return QemuNbdError(text, hint=f"{PROG}: {_usage_hint()}", prefix=_argv0)


def _keyvals(text: str) -> dict[str, str]:
    """QEMU's ``key=value,key=value`` (``,,`` is a literal comma); a bare first word is its ``type``."""
    out: dict[str, str] = {}
    parts: list[str] = []
    cur = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "," and text[i + 1:i + 2] == ",":
            cur += ","
            i += 2
            continue
        if ch == ",":
            parts.append(cur)
            cur = ""
        else:
            cur += ch
        i += 1
    parts.append(cur)
    for n, part in enumerate(parts):
        key, eq, val = part.partition("=")
        if not eq and n == 0:
            key, val = "qom-type", part
        out[key] = val
    return out


def _bool(value: str, what: str) -> bool:
    if value in ("on", "yes", "true", "y"):
        return True
    if value in ("off", "no", "false", "n"):
        return False
    raise QemuNbdError(f"Parameter '{what}' expects 'on' or 'off'")


def _object(opts: Options, text: str) -> None:
    kv = _keyvals(text)
    qom = kv.get("qom-type", "")
    known = ("tls-creds-x509", "authz-list-file", "tls-creds-psk", "tls-creds-anon", "secret", "authz-simple",
             "authz-list", "authz-pam", "iothread", "throttle-group")
    if qom not in known:
        raise QemuNbdError(f"Parameter 'qom-type' does not accept value '{qom}'")
    if "id" not in kv:
        raise QemuNbdError("Parameter 'id' is missing")
    if qom not in ("tls-creds-x509", "authz-list-file", "authz-simple", "secret"):
        raise QemuNbdError(f"object type '{qom}' is not supported by nbdsrv (tls-creds-x509, "
                           "authz-simple, authz-list-file and secret are)")
    if kv["id"] in opts.objects:
        raise QemuNbdError(f"attempt to add duplicate property '{kv['id']}' to object (type 'container')")
    if qom == "secret":
        # the passphrase of an encrypted image (key-secret=ID in --image-opts)
        from imagecore.filenames import add_object

        try:
            add_object(text)
        except BlockError as exc:
            raise QemuNbdError(str(exc)) from None
    opts.objects[kv["id"]] = kv


def parse(argv: list[str]) -> Options:
    """qemu-nbd's command line; raises QemuNbdError with qemu-nbd's message, or SystemExit for -h/-V."""
    try:
        pairs, files = getopt.gnu_getopt(argv, SHORT, LONG)
    except getopt.GetoptError as e:
        raise _getopt_error(e) from None
    o = Options(files=files)
    seen: set[str] = set()  # --cache (or -n), --aio and --discard may each be given once
    for flag, val in pairs:
        once = {"-n": "cache", "--nocache": "cache", "--cache": "cache", "--aio": "aio",
                "--discard": "discard"}.get(flag)
        if once is not None:
            if once in seen:
                raise QemuNbdError("-n and --cache can only be specified once" if once == "cache"
                                   else f"--{once} can only be specified once")
            seen.add(once)
        if flag in ("-h", "--help"):
            print(HELP.replace("{formats}", ", ".join(image_formats())))
            raise SystemExit(0)
        if flag in ("-V", "--version"):
            from . import __version__

            print(f"{PROG} (nbdsrv {__version__})\nnbdsrv serves NBD in qemu-nbd 7.2's place.")
            raise SystemExit(0)
        if flag in ("-p", "--port"):
            o.port = val
        elif flag in ("-b", "--bind"):
            o.bind = val
        elif flag in ("-k", "--socket"):
            if not val.startswith("/"):
                raise QemuNbdError("socket path must be absolute")
            o.sockpath = val
        elif flag in ("-e", "--shared"):
            try:
                o.shared = int(val, 0)
            except ValueError:
                o.shared = -1
            if o.shared < 0:
                raise QemuNbdError(f"Invalid shared device number '{val}'")
        elif flag in ("-t", "--persistent"):
            o.persistent = True
        elif flag in ("-v", "--verbose"):
            o.verbose = True
        elif flag in ("-x", "--export-name"):
            if len(val.encode()) > _MAX_STRING:
                raise QemuNbdError(f"export name '{val}' too long")
            o.export_name = val
        elif flag in ("-D", "--description"):
            if len(val.encode()) > _MAX_STRING:
                raise QemuNbdError(f"export description '{val}' too long")
            o.description = val
        elif flag in ("-r", "--read-only"):
            o.read_only = True
        elif flag in ("-s", "--snapshot"):
            o.snapshot = True
        elif flag in ("-l", "--load-snapshot"):
            o.load_snapshot = _snapshot_param(val)
            o.read_only = True
        elif flag in ("-f", "--format"):
            o.fmt = val
        elif flag in ("-A", "--allocation-depth"):
            o.allocation_depth = True
        elif flag in ("-B", "--bitmap"):
            o.bitmaps.append(val)
        elif flag in ("-L", "--list"):
            o.list_mode = True
        elif flag == "--object":
            _object(o, val)
        elif flag == "--tls-creds":
            o.tls_creds = val
        elif flag == "--tls-authz":
            o.tls_authz = val
        elif flag == "--tls-hostname":
            o.tls_hostname = val
        elif flag == "--image-opts":
            o.image_opts = True
        elif flag == "--fork":
            o.fork = True
        elif flag == "--pid-file":
            o.pid_file = val
        elif flag in ("-n", "--nocache"):
            _cache(o, "none")
        elif flag == "--cache":
            _cache(o, val)
        elif flag == "--aio":
            if val not in ("threads", "native", "io_uring"):
                raise QemuNbdError(f"Invalid aio mode '{val}'")
        elif flag == "--discard":
            if val not in ("ignore", "off", "unmap", "on"):
                raise QemuNbdError(f"Invalid discard mode `{val}'")
            o.discard = val
        elif flag == "--detect-zeroes":
            if val not in ("off", "on", "unmap"):
                raise QemuNbdError(f"Failed to parse detect_zeroes mode: invalid parameter value: {val}")
            o.detect_zeroes = val
            # checked here, as qemu-nbd does: --discard=unmap must come first
            if val == "unmap" and o.discard not in ("unmap", "on"):
                raise QemuNbdError("setting detect-zeroes to unmap is not allowed without setting discard "
                                   "operation to unmap")
        elif flag in ("-T", "--trace"):
            pass  # nbdsrv has no trace points: its logging is -v
        elif flag in ("-o", "--offset"):
            o.offset = _strtou64(val, f"Invalid offset '{val}'")
        elif flag in ("-c", "--connect", "-d", "--disconnect"):
            raise QemuNbdError(f"{flag} needs the kernel's NBD client: nbdsrv does not attach /dev/nbd* "
                               "devices; connect with nbd-client or qemu-nbd instead")
        elif flag == "--selinux-label":
            if o.sockpath is None and "-k" not in argv and not any(a.startswith("--socket") for a in argv):
                raise QemuNbdError("--selinux-label is not permitted without --socket")
            o.selinux_label = val
    if o.tls_authz is not None and o.tls_creds is None:
        raise QemuNbdError("--tls-authz is not permitted without --tls-creds")
    if o.tls_hostname is not None:
        if o.tls_creds is None:
            raise QemuNbdError("--tls-hostname is not permitted without --tls-creds")
        if not o.list_mode:
            raise QemuNbdError("TLS hostname is only supported with export list")
    if o.list_mode:
        if files:
            raise QemuNbdError("List mode is incompatible with a file name")
        if o.export_name is not None or o.description is not None or o.bitmaps or o.allocation_depth \
                or o.offset or o.fmt is not None or o.load_snapshot is not None or seen:
            raise QemuNbdError("List mode is incompatible with per-device settings")
        if o.fork:
            raise QemuNbdError("List mode is incompatible with forking")
    elif len(files) != 1:
        raise QemuNbdError("Invalid number of arguments", hint=_usage_hint())
    return o


def _strtou64(text: str, message: str) -> int:
    """A number as qemu_strtou64 reads it with base 0 (decimal, 0x hex, 0 octal; no size suffix), seen
    as the signed 64-bit value qemu-nbd hands on: a negative number wraps, as strtoull wraps it."""
    t = text.strip()
    m = re.fullmatch(r"([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", t)
    if m is None:
        raise QemuNbdError(message)
    digits = m.group(2)
    if digits[:2].lower() == "0x":
        value = int(digits, 16)
    elif digits.startswith("0"):
        value = int(digits, 8)
    else:
        value = int(digits)
    if value >= 1 << 64:
        raise QemuNbdError(message)
    value = (-value if m.group(1) == "-" else value) % (1 << 64)
    return value - (1 << 64) if value >= 1 << 63 else value


def _snapshot_param(val: str) -> str:
    if val.startswith("snapshot."):
        kv = _keyvals(val)
        return kv.get("snapshot.id") or kv.get("snapshot.name") or ""
    return val


def _cache(o: Options, mode: str) -> None:
    if mode not in CACHE_MODES:
        raise QemuNbdError(f"Invalid cache mode `{mode}'")
    if mode not in CACHE_ACCEPTED:
        raise QemuNbdError(f"cache mode '{mode}' is not supported by nbdsrv: writes are durable once the "
                           "client flushes (use writeback, none or unsafe)")


def _image(o: Options) -> tuple[str, str | None]:
    """The file and its format: FILE and -f, or --image-opts' driver= and file.filename=."""
    text = o.files[0]
    if not o.image_opts:
        return text, o.fmt
    kv = _keyvals(text)
    if kv.get("driver") in NULL_DRIVERS or (kv.get("driver", "raw") == "raw"
                                            and kv.get("file.driver") in NULL_DRIVERS):
        # qemu's null-co: nothing behind it, so no file; imagecore opens it by its options
        if "read-only" in kv and _bool(kv.pop("read-only"), "read-only"):
            o.read_only = True
        for key in ("discard", "detect-zeroes", "cache.direct", "cache.no-flush"):
            kv.pop(key, None)
        kv.pop("qom-type", None)
        return "json:" + json.dumps(kv), "raw"
    path = kv.pop("file.filename", None) or kv.pop("filename", None)
    fmt = kv.pop("driver", None)
    if kv.get("file.driver") == "file":
        del kv["file.driver"]  # the only protocol nbdsrv has
    if "read-only" in kv and _bool(kv.pop("read-only"), "read-only"):
        o.read_only = True
    # accepted for the same reasons as the options of the same names (file.locking=off: nbdsrv still
    # takes the lock bytes, the safer way)
    o.key_secret = kv.pop("key-secret", None) or kv.pop("encrypt.key-secret", None)
    for key in ("file.locking", "cache.direct", "cache.no-flush", "file.aio", "discard", "detect-zeroes"):
        kv.pop(key, None)
    if kv:
        raise QemuNbdError(f"--image-opts option '{sorted(kv)[0]}' is not supported by nbdsrv")
    if fmt is None or path is None:
        raise QemuNbdError("--image-opts needs driver=FORMAT and file.filename=PATH")
    return path, fmt


def _format(path: str, fmt: str | None) -> str:
    """-f as qemu-nbd takes it, or the format probed from the file's first bytes when it is absent."""
    from imagecore.driver import RAW_PROBE_WARNING

    if path.split(":", 1)[0] in NULL_DRIVERS and path.split(":", 1)[1:] == ["//"]:
        if fmt not in (None, "raw"):
            raise QemuNbdError(f"Failed to blk_new_open '{path}': imagecore opens null-co only as raw")
        if fmt is None:
            sys.stderr.write(RAW_PROBE_WARNING.format(path=path))
        return "raw"
    if fmt is not None:
        if fmt in image_formats():
            return fmt
        if fmt in QEMU_ONLY_FORMATS:
            raise QemuNbdError(f"Failed to blk_new_open '{path}': Driver '{fmt}' is not whitelisted")
        raise QemuNbdError(f"Failed to blk_new_open '{path}': Unknown driver '{fmt}'")
    from imagecore.driver import probe_format
    from imagecore.hostio import HostFile

    try:
        hf = HostFile.open(path, read_only=True)
    except OSError as e:
        raise QemuNbdError(f"Failed to blk_new_open '{path}': Could not open '{path}': "
                           f"{e.strerror}") from None
    except BlockError as e:
        raise QemuNbdError(f"Failed to blk_new_open '{path}': {e}") from None
    try:
        probed = probe_format(hf)
    finally:
        hf.close()
    if probed not in image_formats():
        raise QemuNbdError(f"Failed to blk_new_open '{path}': Could not open '{path}': Driver '{probed}' "
                           "is not whitelisted")
    return probed


def _tls(o: Options) -> tuple[TLSConfig, list[AccessRule]]:
    """TLS settings from the --tls-creds object, and the access rule an authz-simple object makes."""
    if o.tls_creds is None:
        return TLSConfig(), []
    creds = o.objects.get(o.tls_creds)
    if creds is None or creds.get("qom-type") != "tls-creds-x509":
        raise QemuNbdError(f"Failed to get TLS creds: No TLS credentials with id '{o.tls_creds}'")
    if creds.get("endpoint", "client") != "server":
        raise QemuNbdError("Expecting TLS credentials with a server endpoint")
    if "dir" not in creds:
        raise QemuNbdError("Unable to access credentials: no 'dir' given")
    verify = _bool(creds.get("verify-peer", "on"), "verify-peer")  # QEMU's default is to verify
    authz: str | None = None
    rules: list[AccessRule] = []
    if o.tls_authz is not None:
        obj = o.objects.get(o.tls_authz)
        kind = obj.get("qom-type") if obj is not None else None
        if obj is None or kind not in ("authz-list-file", "authz-simple"):
            raise QemuNbdError(f"Failed to get authz object: No authz object with id '{o.tls_authz}'")
        if kind == "authz-list-file":
            if "filename" not in obj:
                raise QemuNbdError("Parameter 'filename' is missing")
            authz = obj["filename"]
        else:
            if "identity" not in obj:
                raise QemuNbdError("Parameter 'identity' is missing")
            # the one client DN allowed, for every export
            rules.append(AccessRule(exports=("*",), authz=(obj["identity"],)))
        if not verify:
            raise QemuNbdError("--tls-authz needs verify-peer=on: a DN is known only from a verified "
                               "client certificate")
    return TLSConfig(mode="require", creds=creds["dir"], verify_peer=verify, authz=authz), rules


def to_config(o: Options, inherited: list[InheritedSocket]) -> ServerConfig:
    """The ServerConfig `nbdsrv serve --image` would build for the same export."""
    path, fmt = _image(o)
    fmt = _format(path, fmt)
    if o.offset < 0:
        raise QemuNbdError("Parameter 'offset' expects a non-negative number below 2^64",
                           hint="Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
                                "and exabytes, respectively.")
    if o.offset and fmt == "raw":
        size = os.path.getsize(path)
        if o.offset > size:
            raise QemuNbdError(f"Offset ({o.offset}) cannot be greater than size of the containing file "
                               f"({size})")
    if inherited:
        if o.port is not None:
            raise QemuNbdError("TCP port number can't be set when using socket activation")
        if o.bind is not None:
            raise QemuNbdError("The interface can't be set when using socket activation")
        if o.sockpath is not None:
            raise QemuNbdError("Unix socket can't be set when using socket activation")
        if len(inherited) != 1:
            raise QemuNbdError(f"qemu-nbd only supports socket activation with LISTEN_FDS=1 (got "
                               f"LISTEN_FDS={len(inherited)})")
        listen = [ListenAddr(fd=inherited[0].fd, name=inherited[0].name)]
    elif o.sockpath is not None:
        listen = [ListenAddr(unix=o.sockpath)]
    else:
        listen = [_tcp(o.bind or "0.0.0.0", o.port or "10809")]
    img = ImageConfig(path=path, name=o.export_name or None, format=fmt, snapshot=o.load_snapshot,
                      cow=o.snapshot, bitmaps=tuple(o.bitmaps) if o.bitmaps else None,
                      description=o.description or "", allocation_depth=o.allocation_depth,
                      default_name=o.export_name is None or o.export_name == "",
                      multi_conn=o.shared != 1, qemu_blocks=True, key_secret=o.key_secret, offset=o.offset,
                      detect_zeroes=o.detect_zeroes, discard=o.discard)
    tls, access = _tls(o)
    cfg = ServerConfig(listen=listen, images=[img], read_only=o.read_only, pid_file=o.pid_file,
                       log_level="warning" if o.verbose else "error", persistent=o.persistent,
                       tls=tls, access=access, hold_images=True,
                       queue_when_full=True)
    # -e N: N clients at once (0: any number); qemu-nbd counts a client from accept to close
    limit = o.shared if o.shared > 0 else 1 << 20
    cfg.max_connections = limit
    # the clients over the limit wait as in qemu-nbd's listen backlog, which it sets to N for -e N
    # without -t (SOMAXCONN otherwise); a client past that is not served
    cfg.max_queued = socket.SOMAXCONN if o.persistent or o.shared == 0 else min(o.shared, socket.SOMAXCONN)
    cfg.max_connections_per_address = max(cfg.max_connections_per_address, min(limit, 1 << 16))
    return cfg


def _tcp(host: str, port: str) -> ListenAddr:
    if not port.isdigit() or int(port) > 65535:
        raise QemuNbdError(f"address resolution failed for {host}:{port}: Servname not supported for "
                           "ai_socktype")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return ListenAddr(host=host, port=int(port))


# -- -L ------------------------------------------------------------------------------------------------

def _recv_events(sock: socket.socket, cl: object, want: int) -> list[object]:
    """Read until ``want`` events, or until an option's final reply (ACK or an error)."""
    from nbdproto.client import ClientConnection

    assert isinstance(cl, ClientConnection)
    out: list[object] = []
    while True:
        ev = cl.next_event()
        while ev is not None:
            out.append(ev)
            if want and len(out) >= want:
                return out
            if not want and _final(ev):
                return out
            ev = cl.next_event()
        data = sock.recv(65536)
        if not data:
            raise OSError("Connection closed by the server")
        cl.receive_data(data)


def _final(ev: object) -> bool:
    from nbdproto import constants as c
    from nbdproto.client import OptionReply

    return isinstance(ev, OptionReply) and (ev.is_error or ev.reply_type == c.REP_ACK)


def _client_tls(o: Options) -> ssl.SSLContext:
    """The client TLS context -L takes from its --tls-creds object (loaded as qemu loads it: the CA's file
    must be there; a verifying client needs a host name: the TCP host, or --tls-hostname)."""
    from imagecore.errors import BlockError
    from imagecore.filenames import ObjectStore, add_tls_creds, tls_context

    assert o.tls_creds is not None
    props = o.objects.get(o.tls_creds)
    if props is None or props.get("qom-type") != "tls-creds-x509":
        raise QemuNbdError(f"Failed to get TLS creds: No TLS credentials with id '{o.tls_creds}'")
    store = ObjectStore()
    try:
        add_tls_creds({k: v for k, v in props.items() if k != "qom-type"}, store)
        if store.tls[o.tls_creds].endpoint != "client":
            raise QemuNbdError("Expecting TLS credentials with a client endpoint")
        hostname = o.tls_hostname or (None if o.sockpath is not None else (o.bind or "0.0.0.0"))
        return tls_context(o.tls_creds, hostname, store)
    except BlockError as e:
        raise QemuNbdError(str(e)) from None


def list_exports(o: Options) -> int:
    """qemu-nbd -L: the exports of the server at -k or -b/-p, with each one's size, flags, block sizes
    and meta contexts, in qemu-nbd's layout."""
    from imagecore.filenames import verify_message
    from nbdproto import constants as c
    from nbdproto.client import ClientConnection, OptionReply

    ctx = _client_tls(o) if o.tls_creds is not None else None
    host: str | None = None
    if o.sockpath is not None:
        where = o.sockpath
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: object = o.sockpath
    else:
        host, port = o.bind or "0.0.0.0", o.port or "10809"
        where = f"{host}:{port}"
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise QemuNbdError(f"address resolution failed for {where}: {e.strerror}") from None
        sock = socket.socket(infos[0][0], socket.SOCK_STREAM)
        target = infos[0][4]
    with sock:
        try:
            sock.connect(target)  # type: ignore[arg-type]
        except OSError as e:
            raise QemuNbdError(f"Failed to connect to '{where}': {e.strerror}") from None
        cl = ClientConnection()
        try:
            _recv_events(sock, cl, 1)  # the greeting
            sock.sendall(cl.client_flags())
            if ctx is not None:
                # STARTTLS, then the rest of the haggling over TLS, as qemu-nbd -L --tls-creds does
                sock.sendall(cl.raw_option(c.OPT_STARTTLS))
                rep = _recv_events(sock, cl, 0)[-1]
                assert isinstance(rep, OptionReply)
                if rep.is_error:
                    raise QemuNbdError("Server don't support STARTTLS option")
                hostname = o.tls_hostname or (None if o.sockpath is not None else host)
                try:
                    sock = ctx.wrap_socket(sock, server_hostname=hostname)
                except ssl.SSLCertVerificationError as e:
                    # qemu-nbd reports the TLS handshake's failure alone, in GnuTLS's words
                    raise QemuNbdError(verify_message(e, hostname)) from None
                except ssl.SSLError as e:
                    raise QemuNbdError(f"TLS handshake failed: {e.reason or e}") from None
            sock.sendall(cl.raw_option(c.OPT_STRUCTURED_REPLY))
            _recv_events(sock, cl, 0)
            sock.sendall(cl.raw_option(c.OPT_LIST))
            exports: list[tuple[str, str]] = []
            for ev in _recv_events(sock, cl, 0):
                assert isinstance(ev, OptionReply)
                if ev.is_error:
                    raise QemuNbdError("Server does not support export lists")
                if ev.reply_type == c.REP_SERVER:
                    (n,) = struct.unpack_from(">I", ev.payload)
                    exports.append((ev.payload[4:4 + n].decode(errors="replace"),
                                    ev.payload[4 + n:].decode(errors="replace")))
            lines = [f"exports available: {len(exports)}"]
            for name, desc in exports:
                lines += _describe(sock, cl, name, desc)
            sock.sendall(cl.raw_option(c.OPT_ABORT))
        except OSError as e:
            raise QemuNbdError(f"Unable to list exports of '{where}': {e.strerror or e}") from None
    print("\n".join(lines))
    return 0


def _describe(sock: socket.socket, cl: object, name: str, desc: str) -> list[str]:
    from nbdproto import constants as c
    from nbdproto.client import ClientConnection, OptionReply

    assert isinstance(cl, ClientConnection)
    lines = [f" export: '{name}'"]
    if desc:
        lines.append(f"  description: {desc}")
    sock.sendall(cl.opt_info(name, [c.INFO_BLOCK_SIZE]))
    size, flags, blocks = 0, 0, (1, 4096, 32 << 20)
    for ev in _recv_events(sock, cl, 0):
        assert isinstance(ev, OptionReply)
        if ev.reply_type != c.REP_INFO:
            continue
        (kind,) = struct.unpack_from(">H", ev.payload)
        if kind == c.INFO_EXPORT:
            size, flags = struct.unpack_from(">QH", ev.payload, 2)
        elif kind == c.INFO_BLOCK_SIZE:
            blocks = struct.unpack_from(">III", ev.payload, 2)
    names = " ".join(n for i, n in enumerate(_FLAG_NAMES) if n and flags & (1 << i))
    lines += [f"  size:  {size}", f"  flags: 0x{flags:x} ( {names + ' ' if names else ''})",
              f"  min block: {blocks[0]}", f"  opt block: {blocks[1]}", f"  max block: {blocks[2]}"]
    sock.sendall(cl.opt_meta(c.OPT_LIST_META_CONTEXT, name, []))
    contexts = []
    for ev in _recv_events(sock, cl, 0):
        assert isinstance(ev, OptionReply)
        if ev.reply_type == c.REP_META_CONTEXT:
            contexts.append(ev.payload[4:].decode(errors="replace"))
    lines.append(f"  available meta contexts: {len(contexts)}")
    lines += [f"   {ctx}" for ctx in contexts]
    return lines


# -- running -------------------------------------------------------------------------------------------

def _fork(run: Callable[[Callable[[], None] | None], int], verbose: bool) -> int:
    """--fork: the child serves; the parent relays what the child writes on stderr until it is ready
    (or has failed) and then exits: 0 once the child listens, else the child's status. The child keeps
    the parent's stderr only with -v, as qemu-nbd does: otherwise a caller that reads our stderr to its
    end (ssh, subprocess) would wait for the server to exit."""
    err_r, err_w = os.pipe()
    ok_r, ok_w = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(err_w)
        os.close(ok_w)
        while chunk := os.read(err_r, 4096):
            os.write(2, chunk)
        os.close(err_r)
        listening = os.read(ok_r, 1)
        os.close(ok_r)
        if listening:
            return 0
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status) or 1
    # the child: a session of its own, stdin and stdout on /dev/null, stderr on the pipe until ready
    os.close(err_r)
    os.close(ok_r)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    saved = os.dup(2)
    os.dup2(err_w, 2)
    os.close(err_w)

    def ready() -> None:
        os.write(ok_w, b"R")
        os.close(ok_w)
        if verbose:
            os.dup2(saved, 2)  # the parent's stderr again; the parent returns once the pipe is closed
        else:
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 2)
            os.close(null)
        os.close(saved)

    code = 1
    try:
        code = run(ready)
    finally:
        sys.stderr.flush()
        os._exit(code)


def _serve(o: Options, inherited: list[InheritedSocket]) -> int:
    from .app import run, serve
    from .log import setup_logging

    cfg = to_config(o, inherited)
    try:
        cfg.validate()
    except BlockError as e:
        raise QemuNbdError(str(e)) from None

    def go(on_ready: Callable[[], None] | None = None) -> int:
        setup_logging(cfg.log_level, cfg.log_format)
        try:
            return run(serve(cfg, on_ready=on_ready))
        except BlockError as e:
            # qemu-nbd names the image as it was given: the whole --image-opts string
            print(f"{PROG}: {_qemu_message(e, cfg, o.files[0] if o.image_opts else None)}",
                  file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0

    if o.fork:
        return _fork(go, o.verbose)
    return go()


def _qemu_message(e: BlockError, cfg: ServerConfig, name: str | None = None) -> str:
    text = str(e)
    if text.startswith("cannot listen on "):
        # the system's reason, as strerror() words it (uvloop wraps it in a sentence of its own)
        reason = text.rsplit(": ", 1)[-1]
        reason = reason[:1].upper() + reason[1:]
        unix = cfg.listen[0].unix if cfg.listen else None
        return f"Failed to bind socket to {unix}: {reason}" if unix else f"Failed to bind socket: {reason}"
    if "Bitmap '" in text or text.startswith("Offset ("):
        return text
    if cfg.images[0].snapshot is not None and "snapshot" in text.lower():
        return f"Failed to load snapshot: {text}"
    img = name if name is not None else cfg.images[0].path
    return f"Failed to blk_new_open '{img}': {text}"


def _set_socket_label(label: str) -> None:
    """The SELinux context this thread's next sockets are created with (libselinux's setsockcreatecon_raw:
    a write to /proc/thread-self/attr/sockcreate), as qemu-nbd sets it before it makes its unix socket; a
    kernel without SELinux refuses the write (EINVAL), and so does qemu-nbd's call."""
    try:
        fd = os.open("/proc/thread-self/attr/sockcreate", os.O_WRONLY)
        try:
            os.write(fd, label.encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise QemuNbdError(f"Cannot set SELinux socket create context to {label}: {e.strerror}") from None


def main(argv: list[str] | None = None, argv0: str = PROG) -> int:
    """Run as qemu-nbd with ``argv`` (without the program name); ``argv0`` is the name as invoked."""
    global _argv0
    _argv0 = argv0
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        opts = parse(argv)
        if opts.list_mode:
            return list_exports(opts)
        if opts.selinux_label is not None:
            _set_socket_label(opts.selinux_label)
        return _serve(opts, listen_fds())
    except BrokenPipeError:
        # stdout closed early (qemu-nbd -h | head): no traceback, and none when Python flushes at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except QemuNbdError as e:
        print(f"{e.prefix}: {e}", file=sys.stderr)
        if e.hint:
            print(e.hint, file=sys.stderr)
        return 1


def console_main() -> None:
    """The `nbdsrv-qemu-nbd` console script (or a link to it named qemu-nbd)."""
    sys.exit(main(argv0=sys.argv[0]))


HELP = f"""Usage: {PROG} [OPTIONS] FILE
  or:  {PROG} -L [OPTIONS]
QEMU Disk Network Block Device Utility (nbdsrv)

  -h, --help                display this help and exit
  -V, --version             output version information and exit

Connection properties:
  -p, --port=PORT           port to listen on (default `10809')
  -b, --bind=IFACE          interface to bind to (default `0.0.0.0')
  -k, --socket=PATH         path to the unix socket
  -e, --shared=NUM          device can be shared by NUM clients (default '1')
  -t, --persistent          don't exit on the last connection
  -v, --verbose             display extra debugging information
  -x, --export-name=NAME    expose export by name (default is empty string)
  -D, --description=TEXT    export a human-readable description

Exposing part of the image:
  -o, --offset=OFFSET       offset into the image
  -A, --allocation-depth    expose the allocation depth
  -B, --bitmap=NAME         expose a persistent dirty bitmap

General purpose options:
  -L, --list                list exports available from another NBD server
  --object type,id=ID,...   define a tls-creds-x509 or authz-list-file object
  --tls-creds=ID            use id of an earlier --object to provide TLS
  --tls-authz=ID            use id of an earlier --object to provide
                            authorization
  -T, --trace [...]         accepted and ignored (use -v)
  --fork                    fork off the server process and exit the parent
                            once the server is running
  --pid-file=PATH           store the server's process ID in the given file
  --selinux-label=LABEL     set SELinux process label on listening socket

Block device options:
  -f, --format=FORMAT       set image format ({{formats}})
  -r, --read-only           export read-only
  -s, --snapshot            serve writes to a temporary overlay over FILE
  -l, --load-snapshot=SNAPSHOT_PARAM
                            export an internal snapshot inside FILE, read-only;
                            'snapshot.id=[ID],snapshot.name=[NAME]' or
                            '[ID_OR_NAME]'
  -n, --nocache             same as --cache=none
      --cache=MODE          none, writeback (default) or unsafe
      --aio=MODE            native, io_uring or threads (accepted)
      --discard=MODE        ignore (default) or unmap client discards
      --detect-zeroes=MODE  off, on or unmap: written zeroes become zero writes
      --image-opts          treat FILE as driver=FORMAT,file.filename=PATH

Not available in nbdsrv: -c/-d (kernel NBD devices).
See docs/qemu-nbd.md."""
