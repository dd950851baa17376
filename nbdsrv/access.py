"""Who may use what: peer addresses (CIDR), TLS per export, and client certificate names (authz).

Three layers, checked in this order:

1. The server-wide allow list (``[server] allow``, ``--allow``) is checked when a TCP connection is
   accepted, before the greeting: a peer outside it is closed at once and costs nothing more. Unix-socket
   clients are not checked here (the socket's mode and group decide who reaches it).
2. ``[[access]]`` rules apply to the exports whose names match one of their globs. Every matching rule
   must be satisfied: ``tls = "require"`` (or an ``authz`` list, which needs a certificate) answers a
   plaintext client ``NBD_REP_ERR_TLS_REQD`` for that export alone, as the NBD spec's SELECTIVETLS mode
   describes; ``allow`` requires the peer address in one of its ranges; ``authz`` requires the client
   certificate's DN to match one entry, exactly or as a glob. A refused client gets
   ``NBD_REP_ERR_POLICY`` for that export and nothing else; NBD_OPT_LIST leaves out what it may not open.
3. The server-wide authz list (``--tls-authz FILE``, QEMU's ``authz-list-file`` JSON format) applies to
   every export in the same way.

``Policy`` is immutable: a reload builds a new one for the connections that start afterwards.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from imagecore.errors import InvalidArgumentError
from nbdproto.constants import REP_ERR_POLICY, REP_ERR_TLS_REQD

from .config import AccessRule, parse_cidr

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def glob_match(pattern: str, text: str) -> bool:
    """QEMU's (GLib's) simple glob: ``*`` is any run of characters, ``?`` one character, nothing else."""
    return _compile(pattern).fullmatch(text) is not None


_GLOB_CACHE: dict[str, re.Pattern[str]] = {}


def _compile(pattern: str) -> re.Pattern[str]:
    rx = _GLOB_CACHE.get(pattern)
    if rx is None:
        parts = [".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern]
        rx = _GLOB_CACHE[pattern] = re.compile("".join(parts), re.DOTALL)
    return rx


def _has_glob(s: str) -> bool:
    return "*" in s or "?" in s


_RDN_SEP = re.compile(r"(?<!\\),")


@functools.lru_cache(maxsize=1024)
def dn_forms(dn: str) -> tuple[str, ...]:
    """A client's DN as rules may name it: RFC 4514 order (most specific first, ``CN=client,O=Example,
    C=GB``: what nbdsrv logs and shows) and the certificate's own order (``C=GB,O=Example,CN=client``:
    what QEMU's x509 credentials, through GnuTLS's gnutls_x509_crt_get_dn, match authz rules against), so
    that a rule written for qemu-nbd works unchanged."""
    rdns = _RDN_SEP.split(dn)
    return (dn,) if len(rdns) < 2 else (dn, ",".join(reversed(rdns)))


def _dn_matches(pattern: str, dn: str) -> bool:
    glob = _has_glob(pattern)
    return any(glob_match(pattern, form) if glob else pattern == form for form in dn_forms(dn))


@dataclass(frozen=True, slots=True)
class AuthzRule:
    match: str
    allow: bool
    glob: bool

    def matches(self, dn: str) -> bool:
        return any(glob_match(self.match, form) if self.glob else form == self.match for form in dn_forms(dn))


@dataclass(frozen=True, slots=True)
class AuthzList:
    """QEMU's authz-list: the first rule that matches decides; ``default_allow`` if none does."""

    rules: tuple[AuthzRule, ...]
    default_allow: bool = False

    def allows(self, dn: str | None) -> bool:
        if dn is None:
            return False
        for rule in self.rules:
            if rule.matches(dn):
                return rule.allow
        return self.default_allow

    @classmethod
    def load(cls, path: str) -> AuthzList:
        """Read an authz-list-file: ``{"policy": "deny", "rules": [{"match": DN, "policy": "allow",
        "format": "exact" | "glob"}, ...]}`` (as QEMU's ``authz-list-file,filename=...``)."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as exc:
            raise InvalidArgumentError(f"cannot read authz file '{path}': {exc.strerror}") from None
        except ValueError as exc:
            raise InvalidArgumentError(f"authz file '{path}': {exc}") from None
        return cls.parse(data, path)

    @classmethod
    def parse(cls, data: Any, where: str = "authz") -> AuthzList:
        if not isinstance(data, dict) or set(data) - {"policy", "rules"}:
            raise InvalidArgumentError(f"{where}: expected an object with 'policy' and 'rules'")
        default = _policy(data.get("policy", "deny"), where)
        rules_in = data.get("rules", [])
        if not isinstance(rules_in, list):
            raise InvalidArgumentError(f"{where}: 'rules' must be a list")
        rules = []
        for i, r in enumerate(rules_in):
            w = f"{where}: rule #{i + 1}"
            if not isinstance(r, dict) or set(r) - {"match", "policy", "format"} or "match" not in r \
                    or "policy" not in r or not isinstance(r["match"], str):
                raise InvalidArgumentError(f"{w}: expected {{\"match\": DN, \"policy\": \"allow\"|\"deny\", "
                                           "\"format\": \"exact\"|\"glob\"}")
            fmt = r.get("format", "exact")
            if fmt not in ("exact", "glob"):
                raise InvalidArgumentError(f"{w}: format must be exact or glob")
            rules.append(AuthzRule(r["match"], _policy(r["policy"], w), fmt == "glob"))
        return cls(tuple(rules), default)


def _policy(value: Any, where: str) -> bool:
    if value not in ("allow", "deny"):
        raise InvalidArgumentError(f"{where}: policy must be allow or deny")
    return bool(value == "allow")


@dataclass(frozen=True, slots=True)
class _Rule:
    exports: tuple[str, ...]
    tls: bool
    allow: tuple[Network, ...]
    authz: tuple[str, ...]

    def applies(self, name: str) -> bool:
        return any(glob_match(p, name) if _has_glob(p) else p == name for p in self.exports)

    def dn_ok(self, dn: str | None) -> bool:
        return dn is not None and any(_dn_matches(p, dn) for p in self.authz)


def _in(addr: str | None, nets: Sequence[Network]) -> bool:
    if addr is None:
        return True  # a unix-socket peer: the socket's permissions decide
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in n for n in nets)


class Policy:
    """The access rules in force for the connections that start while it is current."""

    def __init__(self, allow: Sequence[str] = (), rules: Sequence[AccessRule] = (),
                 authz: AuthzList | None = None) -> None:
        self.allow = tuple(parse_cidr(a) for a in allow)
        self.rules = tuple(_Rule(r.exports, r.tls == "require" or bool(r.authz),
                                 tuple(parse_cidr(a) for a in r.allow), r.authz) for r in rules)
        self.authz = authz

    @property
    def trivial(self) -> bool:
        return not self.allow and not self.rules and self.authz is None

    def admits(self, addr: str | None) -> bool:
        """Whether a peer at ``addr`` (None: a unix-socket client) may connect at all."""
        return not self.allow or _in(addr, self.allow)

    def check(self, name: str, *, addr: str | None, tls: bool, dn: str | None) -> tuple[int, str] | None:
        """None if the client may use export ``name``, else the ``(NBD_REP_ERR_*, message)`` to answer."""
        if self.trivial:
            return None
        rules = [r for r in self.rules if r.applies(name)]
        if not tls and (self.authz is not None or any(r.tls for r in rules)):
            return REP_ERR_TLS_REQD, f"export '{name[:80]}' requires TLS"
        for r in rules:
            if r.allow and not _in(addr, r.allow):
                return REP_ERR_POLICY, f"access to export '{name[:80]}' is not allowed from this address"
            if r.authz and not r.dn_ok(dn):
                return REP_ERR_POLICY, f"client certificate is not authorized for export '{name[:80]}'"
        if self.authz is not None and not self.authz.allows(dn):
            return REP_ERR_POLICY, "client certificate is not authorized"
        return None
