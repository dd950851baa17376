"""What a client has negotiated, and which options are legal in which handshake state, as data.

Two things live here so that they can be read (and tested) in one place:

- ``Negotiated``: everything an option changes for the rest of the connection (structured replies,
  extended headers, the meta contexts and the export they were chosen for, the export chosen by GO).
  The core keeps exactly one of these and replaces it whole when TLS starts, so nothing a client said in
  plaintext survives the upgrade (the lesson of nbdkit's CVE-2021-3716, where a STRUCTURED_REPLY sent
  in plaintext was honoured after STARTTLS).
- ``OPTION_TABLE``: for each security state of the handshake, the verdict on each option: serve it,
  refuse it with ``NBD_REP_ERR_TLS_REQD`` / ``NBD_REP_ERR_POLICY`` / ``NBD_REP_ERR_INVALID``, upgrade the
  connection, or close it. It is the NBD specification's TLS section (FORCEDTLS, SELECTIVETLS) written as
  a table, in the manner of h11's state table: the core looks the verdict up before it looks at the
  option's payload, and ``UPGRADES`` says which state STARTTLS leads to.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from nbdproto import constants as c

from .events import ExportInfo


class Security(enum.Enum):
    """Where the handshake stands with respect to TLS."""

    PLAINTEXT = "plaintext"
    """TLS is not offered (``--tls off``): STARTTLS is refused by policy."""
    TLS_OFFERED = "tls-offered"
    """Plaintext, TLS available (``--tls on``); single exports may still require it (SELECTIVETLS)."""
    TLS_REQUIRED = "tls-required"
    """Plaintext, TLS required (``--tls require``, the spec's FORCEDTLS): only STARTTLS and ABORT."""
    TLS = "tls"
    """The connection runs over TLS."""


class Verdict(enum.Enum):
    """What the core does with an option in a given security state."""

    SERVE = "serve"            # handled as the option says (unknown options: NBD_REP_ERR_UNSUP)
    TLS_REQD = "tls-reqd"      # NBD_REP_ERR_TLS_REQD
    POLICY = "policy"          # NBD_REP_ERR_POLICY (STARTTLS where TLS is not offered)
    INVALID = "invalid"        # NBD_REP_ERR_INVALID (STARTTLS over TLS)
    UPGRADE = "upgrade"        # STARTTLS: NBD_REP_ACK, discard buffered plaintext, hand over to TLS
    CLOSE = "close"            # EXPORT_NAME cannot carry an error: the connection is closed


_S, _T, _P, _I, _U, _C = (Verdict.SERVE, Verdict.TLS_REQD, Verdict.POLICY, Verdict.INVALID, Verdict.UPGRADE,
                          Verdict.CLOSE)

# Columns: PLAINTEXT, TLS_OFFERED, TLS_REQUIRED, TLS.
_ROWS: dict[int | None, tuple[Verdict, Verdict, Verdict, Verdict]] = {
    c.OPT_EXPORT_NAME:       (_S, _S, _C, _S),
    c.OPT_ABORT:             (_S, _S, _S, _S),
    c.OPT_LIST:              (_S, _S, _T, _S),
    c.OPT_STARTTLS:          (_P, _U, _U, _I),
    c.OPT_INFO:              (_S, _S, _T, _S),
    c.OPT_GO:                (_S, _S, _T, _S),
    c.OPT_STRUCTURED_REPLY:  (_S, _S, _T, _S),
    c.OPT_LIST_META_CONTEXT: (_S, _S, _T, _S),
    c.OPT_SET_META_CONTEXT:  (_S, _S, _T, _S),
    c.OPT_EXTENDED_HEADERS:  (_S, _S, _T, _S),
    None:                    (_S, _S, _T, _S),  # any other option
}
_COLUMNS = (Security.PLAINTEXT, Security.TLS_OFFERED, Security.TLS_REQUIRED, Security.TLS)

OPTION_TABLE: dict[Security, dict[int | None, Verdict]] = {
    sec: {opt: row[i] for opt, row in _ROWS.items()} for i, sec in enumerate(_COLUMNS)
}
"""``OPTION_TABLE[security][option]``; the key None holds the verdict on options not listed."""

UPGRADES: dict[Security, Security] = {
    Security.TLS_OFFERED: Security.TLS,
    Security.TLS_REQUIRED: Security.TLS,
}
"""The security state a completed TLS handshake leads to, from each state where STARTTLS is accepted."""


def verdict(security: Security, option: int) -> Verdict:
    """The table's verdict on ``option`` in ``security``."""
    row = OPTION_TABLE[security]
    v = row.get(option)
    return row[None] if v is None else v


@dataclass(slots=True)
class Negotiated:
    """Everything the options of one handshake have settled. Replaced whole by STARTTLS."""

    structured: bool = False
    """Structured replies (also true with extended headers)."""
    extended: bool = False
    """Extended headers."""
    meta_contexts: dict[int, str] = field(default_factory=dict)
    """id -> name, as SET_META_CONTEXT chose them; block status replies go once per id, in order."""
    meta_export: str | None = None
    """The export the meta contexts were chosen for (GO to another export drops them)."""
    export: ExportInfo | None = None
    """The export chosen by GO / EXPORT_NAME (set when transmission starts)."""
