"""Image names as qemu takes them besides plain file names: ``json:{...}`` pseudo-filenames, ``--image-opts``
option strings (QemuOpts: dotted keys, ``,,`` for a comma) and NBD URLs (``nbd://``, ``nbd+unix://``, the
legacy ``nbd:unix:PATH`` and ``nbd:HOST:PORT``); and ``--object`` definitions, with the client TLS
context a ``tls-creds-x509`` object gives (for the NBD driver and ``qemu-nbd -L``).

Each special name becomes one nested options tree (qemu's QDict after qdict_crumple), which
``ImageOpener.open`` turns into a format over a protocol: ``{"driver": "qcow2", "file": {"driver": "file",
"filename": "x.qcow2"}}``, or an NBD export. A name stays a ``str`` all the way through the verbs, so that
every message names it as it was given, as qemu-img's do.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidArgumentError, NotFoundError

NBD_DEFAULT_PORT = "10809"


class ImageOptsName(str):
    """A name given with ``--image-opts``: a QemuOpts string, kept as its own text for messages."""

    __slots__ = ()


def split_qemu_opts(text: str) -> list[tuple[str, str | None]]:
    """``a=1,b.c=x,,y,flag`` as pairs; ``,,`` is a literal comma and a bare key has no value."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if text[i + 1 : i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    out: list[tuple[str, str | None]] = []
    for part in parts:
        if part:
            key, sep, value = part.partition("=")
            out.append((key, value if sep else None))
    return out


def is_nbd_name(name: str) -> bool:
    return name.startswith("nbd:") or (name.startswith("nbd+") and ":" in name)


def protocol_of(name: str) -> str | None:
    """The protocol prefix of a name as qemu's path_has_protocol sees one: text before a ``:`` that comes
    before any ``/`` (so ``./a:b`` and ``/x/a:b`` are file names)."""
    head, sep, _rest = name.partition(":")
    if not sep or "/" in head or not head:
        return None
    return head


def is_special(name: str) -> bool:
    """True for a name that is not a host file's path (qemu does not look it up on the file system)."""
    return isinstance(name, ImageOptsName) or protocol_of(name) is not None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (qdict_flatten); a later spelling of a key wins."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def crumple(flat: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys as nested dicts (qdict_crumple); a key that is both a value and a prefix is refused."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *heads, last = key.split(".")
        for head in heads:
            child = node.setdefault(head, {})
            if not isinstance(child, dict):
                raise InvalidArgumentError(f"Cannot mix scalar and non-scalar keys for '{head}'")
            node = child
        if isinstance(node.get(last), dict):
            raise InvalidArgumentError(f"Cannot mix scalar and non-scalar keys for '{last}'")
        node[last] = value
    return tree


def qemu_json_to_json(text: str) -> tuple[str, int | None]:
    """qemu's JSON dialect (qobject/json-lexer.c) as standard JSON: qemu also takes strings in single
    quotes, inside which ``"`` is an ordinary character, and ``\\'`` as an escape in either kind of string.

    Only the strings change; what is not a string passes through untouched, so a syntax error stays one.
    Also returns where a string that is never closed starts in ``text`` (qemu calls the rest "stray")."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch not in "'\"":
            out.append(ch)
            i += 1
            continue
        opened, quote = i, ch
        out.append('"')
        i += 1
        while i < n and text[i] != quote:
            c = text[i]
            if c == "\\" and i + 1 < n:
                nxt = text[i + 1]
                # \' is qemu's own escape; the rest are JSON's and stay as written
                out.append("'" if nxt == "'" else c + nxt)
                i += 2
                continue
            out.append('\\"' if c == '"' else c)
            i += 1
        if i >= n:
            return "".join(out), opened
        out.append('"')
        i += 1
    return "".join(out), None


def _json_options(text: str) -> dict[str, Any]:
    if not text.strip():
        raise InvalidArgumentError("Could not parse the JSON options: Expecting a JSON value")
    text = text.lstrip()
    if "'" in text or "\\" in text:
        converted, stray = qemu_json_to_json(text)
    else:
        converted, stray = text, None
    try:
        value, end = json.JSONDecoder().raw_decode(converted)
        if converted[end:].strip():
            raise InvalidArgumentError("Could not parse the JSON options: Expecting at most one JSON value")
    except json.JSONDecodeError as exc:
        why = f"stray '{text[stray:]}'" if stray is not None else _json_why(exc, converted)
        raise InvalidArgumentError(f"Could not parse the JSON options: JSON parse error, {why}") from None
    if not isinstance(value, dict):
        raise InvalidArgumentError("Invalid JSON object given")
    return crumple(flatten(value))


def _json_why(exc: json.JSONDecodeError, text: str) -> str:
    """Python's JSON error in the words of qemu's JSON parser (qobject/json-parser.c), as far as the two
    tell the same mistakes apart."""
    if exc.pos >= len(text.rstrip()):
        return "premature EOI"
    msg = exc.msg
    if msg.startswith("Unterminated string"):
        return f"stray '{text[exc.pos:]}'"
    if msg.startswith("Expecting ',' delimiter"):
        # which container the parser was in: the innermost bracket still open before the error
        depth: list[str] = []
        for ch in text[: exc.pos]:
            if ch in "{[":
                depth.append(ch)
            elif ch in "}]" and depth:
                depth.pop()
        return "expected separator in list" if depth and depth[-1] == "[" else "expected separator in dict"
    if msg.startswith("Expecting ':' delimiter"):
        return "missing : in object pair"
    if msg.startswith(("Expecting value", "Expecting property name")):
        # a bare word where a value or key belongs: qemu's lexer reads it as a keyword
        word = re.match(r"[A-Za-z_][A-Za-z0-9_]*", text[exc.pos :])
        if word:
            return f"invalid keyword '{word.group()}'"
        return "expecting value"
    if msg.startswith("Illegal trailing comma"):
        return "expecting value"
    return "invalid syntax"


def nbd_url_options(name: str) -> dict[str, Any]:
    """An NBD URL or legacy ``nbd:`` name as the nbd driver's options (qemu's nbd_parse_uri and
    nbd_parse_filename)."""
    scheme = name.partition(":")[0]
    if scheme == "nbd" and not name.startswith("nbd://"):
        return _nbd_legacy(name)
    if scheme not in ("nbd", "nbd+tcp", "nbd+unix"):
        raise InvalidArgumentError(f"Unknown protocol '{scheme}'")
    invalid = InvalidArgumentError("No valid URL specified")
    url = urllib.parse.urlsplit(name)
    if url.fragment or url.username or url.password:
        raise invalid
    export = urllib.parse.unquote(url.path).removeprefix("/")
    query = urllib.parse.parse_qsl(url.query, keep_blank_values=True) if url.query else []
    opts: dict[str, Any] = {"driver": "nbd"}
    if scheme == "nbd+unix":
        if url.netloc or len(query) != 1 or query[0][0] != "socket":
            raise invalid
        opts["server"] = {"type": "unix", "path": query[0][1]}
    else:
        if query or not url.hostname:
            raise invalid
        try:
            port = url.port
        except ValueError:
            raise invalid from None
        opts["server"] = {"type": "inet", "host": url.hostname,
                          "port": str(port) if port is not None else NBD_DEFAULT_PORT}
    if export:
        opts["export"] = export
    return opts


def _nbd_legacy(name: str) -> dict[str, Any]:
    """``nbd:unix:PATH[:exportname=NAME]`` and ``nbd:HOST:PORT[:exportname=NAME]``."""
    rest = name.removeprefix("nbd:")
    export: str | None = None
    head, sep, tail = rest.partition(":exportname=")
    if sep:
        rest, export = head, tail
    opts: dict[str, Any] = {"driver": "nbd"}
    if rest.startswith("unix:"):
        opts["server"] = {"type": "unix", "path": rest.removeprefix("unix:")}
    else:
        host, _, port = rest.rpartition(":")
        if not host:
            raise InvalidArgumentError(f"error parsing address '{rest}'")
        opts["server"] = {"type": "inet", "host": host, "port": port}
    if export is not None:
        opts["export"] = export
    return opts


def image_opts(text: str) -> dict[str, Any]:
    """An ``--image-opts`` string as an options tree; a bare key means ``on``, as QemuOpts has it."""
    return crumple({key: "on" if value is None else value for key, value in split_qemu_opts(text)})


def options_of(name: str) -> dict[str, Any] | None:
    """The options tree a special name stands for, or None for a plain file name."""
    if isinstance(name, ImageOptsName):
        return image_opts(str(name))
    if name.startswith("json:"):
        return _json_options(name[5:])
    proto = protocol_of(name)
    if proto is None:
        return None
    if is_nbd_name(name):
        return {"file": nbd_url_options(name)}
    if proto == "file":
        return {"file": {"driver": "file", "filename": name[5:]}}
    if proto in ("null-co", "null-aio"):
        return {"file": {"driver": proto}}  # qemu's null drivers take nothing from their name
    raise InvalidArgumentError(f"Unknown protocol '{proto}'")


def host_file_of(name: str) -> str | None:
    """The host file a special name's image lives in (its ``file`` child's filename), or None when it
    lives elsewhere (an NBD export): for the verbs that edit an image's file in place."""
    tree = options_of(name)
    if tree is None:
        return name
    if tree.get("driver") == "nbd":
        return None
    if tree.get("driver") == "file":
        child: Any = tree
    else:
        child = tree.get("file", {"filename": tree.get("filename")} if "filename" in tree else None)
    if not isinstance(child, dict):
        return None
    filename = child.get("filename")
    if child.get("driver", "file") != "file" or filename is None or is_nbd_name(str(filename)):
        return None
    return str(filename)


def format_of(name: str) -> str | None:
    """The format a special name's options give (its top ``driver``), or None."""
    tree = options_of(name)
    if tree is None:
        return None
    driver = tree.get("driver")
    if driver == "file":
        return "raw"  # the protocol alone reads as raw does
    return None if driver is None else str(driver)


def nbd_display_name(opts: dict[str, Any]) -> str:
    """The name qemu gives an NBD node (nbd_refresh_filename): what ``info`` prints as ``image:``."""
    server = opts.get("server") or {}
    export = opts.get("export")
    if server.get("type") == "unix":
        sock = server.get("path", "")
        return f"nbd+unix:///{export}?socket={sock}" if export else f"nbd+unix://?socket={sock}"
    host, port = server.get("host", ""), server.get("port", NBD_DEFAULT_PORT)
    return f"nbd://{host}:{port}/{export}" if export else f"nbd://{host}:{port}"


# -- --object ----------------------------------------------------------------------------------------------

@dataclass(slots=True)
class Secret:
    """A ``secret`` object: its data, from ``data=`` or read from ``file=``."""

    id: str
    data: bytes
    format: str = "raw"


@dataclass(slots=True)
class TlsCreds:
    """A ``tls-creds-x509`` object: a directory in qemu's layout (``ca-cert.pem``, and for a client
    ``client-cert.pem`` and ``client-key.pem`` when it has a certificate of its own)."""

    id: str
    dir: str
    endpoint: str = "client"
    verify_peer: bool = True


@dataclass(slots=True)
class ObjectStore:
    """The objects a command line defined, by id (qemu's /objects container)."""

    secrets: dict[str, Secret] = field(default_factory=dict)
    tls: dict[str, TlsCreds] = field(default_factory=dict)

    def secret(self, ident: str) -> Secret:
        try:
            return self.secrets[ident]
        except KeyError:
            raise NotFoundError(f"No secret with id '{ident}'") from None


OBJECTS = ObjectStore()

# the object types qemu-img 7.2 can create; only secrets are used by imagecore (by encrypted formats)
_SECRET_KEYS = ("id", "qom-type", "data", "file", "format", "keyid", "iv", "loaded")


def add_object(text: str, store: ObjectStore = OBJECTS) -> None:
    """One ``--object`` definition, refused as qemu-img refuses it (``Parameter 'id' is missing``)."""
    pairs = split_qemu_opts(text)
    if pairs and pairs[0][1] is None:
        pairs[0] = ("qom-type", pairs[0][0])
    props = {key: "on" if value is None else value for key, value in pairs}
    kind = props.get("qom-type")
    if kind is None:
        raise InvalidArgumentError("Parameter 'qom-type' is missing")
    if kind == "tls-creds-x509":
        add_tls_creds(props, store)
        return
    if kind != "secret":
        raise InvalidArgumentError(f"Parameter 'qom-type' does not accept value '{kind}'")
    ident = props.get("id")
    if ident is None:
        raise InvalidArgumentError("Parameter 'id' is missing")
    for key in props:
        if key not in _SECRET_KEYS:
            raise InvalidArgumentError(f"Parameter '{key}' is unexpected")
    if ident in store.secrets:
        raise InvalidArgumentError(
            f"attempt to add duplicate property '{ident}' to object (type 'container')")
    if "data" in props and "file" in props:
        raise InvalidArgumentError("'data' and 'file' are mutually exclusive")
    if "file" in props:
        path = props["file"]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise InvalidArgumentError(
                f"Unable to read {path}: Failed to open file \u201c{path}\u201d: {exc.strerror}") from None
    elif "data" in props:
        data = props["data"].encode()
    else:
        raise InvalidArgumentError("Either 'data' or 'file' must be provided")
    fmt = props.get("format", "raw")
    if fmt == "base64":
        import base64
        import binascii

        try:
            data = base64.b64decode(data, validate=True)
        except binascii.Error:
            raise InvalidArgumentError("Unable to decode base64 data") from None
    elif fmt != "raw":
        raise InvalidArgumentError(f"Parameter 'format' does not accept value '{fmt}'")
    store.secrets[ident] = Secret(ident, data, fmt)


_TLS_KEYS = ("id", "qom-type", "dir", "endpoint", "verify-peer", "priority", "sanity-check", "passwordid",
             "loaded")
# the files qemu's tls-creds-x509 requires when it loads, per endpoint (client certificates are optional)
_TLS_REQUIRED = {"client": ("ca-cert.pem",), "server": ("ca-cert.pem", "server-cert.pem", "server-key.pem")}


def add_tls_creds(props: dict[str, str], store: ObjectStore) -> None:
    """A ``tls-creds-x509`` object, loaded (its files looked for) as qemu loads it on creation."""
    ident = props.get("id")
    if ident is None:
        raise InvalidArgumentError("Parameter 'id' is missing")
    for key in props:
        if key not in _TLS_KEYS:
            raise InvalidArgumentError(f"Property 'tls-creds-x509.{key}' not found")
    endpoint = props.get("endpoint", "client")
    if endpoint not in _TLS_REQUIRED:
        raise InvalidArgumentError(f"Parameter 'endpoint' does not accept value '{endpoint}'")
    verify = props.get("verify-peer", "on")
    if verify not in ("on", "off", "yes", "no", "true", "false"):
        raise InvalidArgumentError("Parameter 'verify-peer' expects 'on' or 'off'")
    if ident in store.tls or ident in store.secrets:
        raise InvalidArgumentError(
            f"attempt to add duplicate property '{ident}' to object (type 'container')")
    folder = props.get("dir")
    if folder is None:
        raise InvalidArgumentError("Missing 'dir' property value")
    for name in _TLS_REQUIRED[endpoint]:
        path = f"{folder}/{name}"
        try:
            os.stat(path)
        except OSError as exc:
            raise InvalidArgumentError(f"Unable to access credentials {path}: {exc.strerror}") from None
    store.tls[ident] = TlsCreds(ident, folder, endpoint, verify in ("on", "yes", "true"))


def tls_creds(ident: str, store: ObjectStore = OBJECTS) -> TlsCreds:
    """The client credentials ``tls-creds=ID`` names, refused as qemu's nbd driver refuses them."""
    creds = store.tls.get(ident)
    if creds is None:
        if ident in store.secrets:
            raise InvalidArgumentError(f"Object with id '{ident}' is not TLS credentials")
        raise InvalidArgumentError(f"No TLS credentials with id '{ident}'")
    if creds.endpoint != "client":
        raise InvalidArgumentError("Expected TLS credentials for a client endpoint")
    return creds


def verify_message(exc: ssl.SSLCertVerificationError, hostname: str | None) -> str:
    """The server's certificate refused, in GnuTLS's words as qemu passes them on."""
    code = exc.verify_code
    if code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH
        return f"Certificate does not match the hostname {hostname}"
    if code in (2, 18, 19, 20, 21):  # no issuer known (self-signed, unknown CA)
        return "The certificate hasn't got a known issuer"
    if code == 10:
        return "The certificate has expired"
    if code == 9:
        return "The certificate is not yet activated"
    if code == 23:
        return "The certificate has been revoked"
    return "The certificate is not trusted"


def tls_context(ident: str, hostname: str | None, store: ObjectStore | None = None) -> ssl.SSLContext:
    """A client TLS context from the tls-creds-x509 object ``ident`` (OBJECTS): its
    CA, its client certificate when the directory has one, the server's name checked against
    ``hostname``; as qemu, a verifying client needs a hostname (``tls-hostname`` over a Unix socket)."""
    creds = tls_creds(ident, store or OBJECTS)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if creds.verify_peer:
        if hostname is None:
            raise InvalidArgumentError("No hostname for certificate validation")
        ctx.load_verify_locations(os.path.join(creds.dir, "ca-cert.pem"))
        ctx.check_hostname = True
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    cert, key = os.path.join(creds.dir, "client-cert.pem"), os.path.join(creds.dir, "client-key.pem")
    if os.path.exists(cert) and os.path.exists(key):
        try:
            ctx.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise InvalidArgumentError(f"Cannot load certificate '{cert}' & key '{key}': {exc}") from None
    return ctx
