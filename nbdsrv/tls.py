"""TLS credentials for the NBD listener: QEMU's tls-creds-x509 directory as an ``ssl.SSLContext``.

The directory layout is QEMU's (``crypto/tlscredsx509.c``), so a directory that works with
``qemu-nbd --object tls-creds-x509,dir=DIR,endpoint=server`` works here unchanged:

- ``ca-cert.pem``: the CA that signs client certificates (needed with verify-peer);
- ``server-cert.pem``, ``server-key.pem``: the server's certificate and its key (required);
- ``dh-params.pem``: Diffie-Hellman parameters (optional; ECDHE needs none);
- ``ca-crl.pem``: a certificate revocation list for client certificates (optional).

``load()`` reads them once into a context. The server keeps that context for the connections that start
from then on, so a reload (SIGHUP, ``reload-config``) builds a new one and running connections keep
theirs. TLS 1.2 is the oldest version offered, as GnuTLS's default priority string in QEMU and libnbd.

``peer_dn()`` gives a client certificate's distinguished name as GnuTLS prints it (RFC 4514 order: the
most specific attribute first, ``CN=client,O=Example,C=GB``), which is the string QEMU's authz objects
match, so an authz list written for qemu-nbd matches the same clients here.

TLS-PSK is not offered: Python's ``ssl`` has no PSK callbacks before 3.13; docs/tls.md says what was
tried.
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass
from typing import Any

from imagecore.errors import InvalidArgumentError

from .access import AuthzList, Policy
from .config import ServerConfig

log = logging.getLogger("nbdsrv.tls")

PSK_UNAVAILABLE = ("TLS-PSK is not available: Python's ssl module has no PSK support before Python 3.13 "
                   "(see docs/tls.md); use x509 credentials (--tls-creds DIR)")

CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
DH_PARAMS = "dh-params.pem"


@dataclass(frozen=True, slots=True)
class Credentials:
    """A loaded credentials directory: the context new connections handshake with."""

    directory: str
    verify_peer: bool
    context: ssl.SSLContext


def load(directory: str, *, verify_peer: bool) -> Credentials:
    """Read QEMU's x509 layout from ``directory``; a missing or unreadable file is an error naming it."""
    def path(name: str, *, required: bool) -> str | None:
        p = os.path.join(directory, name)
        if os.path.exists(p):
            return p
        if required:
            raise InvalidArgumentError(f"TLS credentials: '{p}' does not exist")
        return None

    if not os.path.isdir(directory):
        raise InvalidArgumentError(f"TLS credentials: '{directory}' is not a directory")
    cert = path(SERVER_CERT, required=True)
    key = path(SERVER_KEY, required=True)
    ca = path(CA_CERT, required=verify_peer)
    crl = path(CA_CRL, required=False)
    dh = path(DH_PARAMS, required=False)
    assert cert is not None and key is not None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # NBD clients never resume a session: TLS 1.3 tickets would only cost a write per connection.
    ctx.num_tickets = 0
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise InvalidArgumentError(f"TLS credentials: cannot load '{cert}' with '{key}': {_reason(exc)}"
                                   ) from None
    _check_not_expired(cert)
    if verify_peer:
        assert ca is not None
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cafile=ca)
            if crl is not None:
                ctx.load_verify_locations(cafile=crl)
                ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        except (ssl.SSLError, OSError) as exc:
            raise InvalidArgumentError(f"TLS credentials: cannot load '{ca}': {_reason(exc)}") from None
    if dh is not None:
        try:
            ctx.load_dh_params(dh)
        except (ssl.SSLError, OSError) as exc:
            raise InvalidArgumentError(f"TLS credentials: cannot load '{dh}': {_reason(exc)}") from None
    return Credentials(directory, verify_peer, ctx)


def _check_not_expired(cert: str) -> None:
    """Refuse a server certificate that is out of its validity period, as QEMU does when it loads one."""
    import time

    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return
    try:
        info = decode(cert)
    except (ssl.SSLError, OSError, ValueError):
        return
    now = time.time()
    if "notAfter" in info and ssl.cert_time_to_seconds(info["notAfter"]) < now:
        raise InvalidArgumentError(f"TLS credentials: the server certificate '{cert}' has expired "
                                   f"({info['notAfter']})")
    if "notBefore" in info and ssl.cert_time_to_seconds(info["notBefore"]) > now:
        raise InvalidArgumentError(f"TLS credentials: the server certificate '{cert}' is not valid yet "
                                   f"({info['notBefore']})")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or exc.strerror or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def handshake_failure(exc: BaseException) -> str:
    """Why a TLS handshake failed, in one line for the log (certificate verification says which check)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate rejected: {exc.verify_message} (verify code {exc.verify_code})"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, TimeoutError):
        return "TLS handshake timed out"
    if isinstance(exc, ConnectionError):
        return "peer closed the connection during the TLS handshake"
    return str(exc) or type(exc).__name__


# Attribute names as GnuTLS prints them in a DN (and so as QEMU's authz rules spell them).
_SHORT = {"commonName": "CN", "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
          "organizationName": "O", "organizationalUnitName": "OU", "domainComponent": "DC", "userId": "UID",
          "emailAddress": "EMAIL", "streetAddress": "STREET", "serialNumber": "serialNumber",
          "title": "title", "surname": "SN", "givenName": "GN", "initials": "initials",
          "pseudonym": "pseudonym", "generationQualifier": "generationQualifier",
          "dnQualifier": "dnQualifier", "name": "name", "postalCode": "postalCode"}


def _escape(value: str) -> str:
    out = []
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;' or (ch == "#" and i == 0) or (ch == " " and i in (0, len(value) - 1)):
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def dn_of(peercert: dict[str, Any]) -> str | None:
    """The subject DN of a verified peer certificate (``SSLObject.getpeercert()``), RFC 4514 order."""
    subject = peercert.get("subject")
    if not subject:
        return None
    rdns = []
    for rdn in reversed(subject):
        rdns.append("+".join(f"{_SHORT.get(k, k)}={_escape(v)}" for k, v in rdn))
    return ",".join(rdns)


def server_security(cfg: ServerConfig) -> tuple[str, Credentials | None, Policy]:
    """The TLS mode, the loaded credentials and the access policy that ``cfg`` asks for.

    Everything is read and checked here, so that a start or a reload with a bad certificate, key or
    authz file fails with the file's own complaint and changes nothing."""
    mode = cfg.tls.effective_mode
    creds = None
    if mode != "off" and cfg.tls.creds is not None:
        creds = load(cfg.tls.creds, verify_peer=cfg.tls.verify_peer)
    if mode != "off" and creds is None:
        raise InvalidArgumentError(PSK_UNAVAILABLE if cfg.tls.psk_file is not None
                                   else "TLS needs credentials: give --tls-creds DIR")
    authz = AuthzList.load(cfg.tls.authz) if cfg.tls.authz is not None else None
    return mode, creds, Policy(cfg.allow, cfg.access, authz)
