"""STARTTLS in the sans-IO core: the option table per security state, the atomic reset of what was
negotiated, and plaintext that follows STARTTLS being thrown away (nbdkit CVE-2021-3716).

The core does no cryptography: a test "completes the TLS handshake" by calling ``tls_established()``
and then keeps talking to the core in the clear, which is what the transport does after the upgrade.
"""

from __future__ import annotations

import pytest

from nbdproto import constants as c
from nbdsrv.proto.connection import ServerConnection
from nbdsrv.proto.events import ExportInfoRequest, ProtocolError, Ready, StartTLS
from nbdsrv.proto.negotiation import OPTION_TABLE, UPGRADES, Negotiated, Security, Verdict, verdict
from tests.unit.test_proto_pair import BASE, Pair, replies

ALL_OPTIONS = [c.OPT_EXPORT_NAME, c.OPT_ABORT, c.OPT_LIST, c.OPT_STARTTLS, c.OPT_INFO, c.OPT_GO,
               c.OPT_STRUCTURED_REPLY, c.OPT_LIST_META_CONTEXT, c.OPT_SET_META_CONTEXT,
               c.OPT_EXTENDED_HEADERS, c.OPT_PEEK_EXPORT, 4242]


def pair(security: Security) -> Pair:
    p = Pair()
    p.server = ServerConnection(security=security)
    p.send(p.client.client_flags())
    return p


def upgrade(p: Pair, *, extra: bytes = b"") -> StartTLS:
    """STARTTLS (with ``extra`` plaintext in the same packet), then the handshake 'completes'."""
    before = len(p.events)
    evs = p.send(p.client.raw_option(c.OPT_STARTTLS) + extra)
    assert replies(evs, c.OPT_STARTTLS) == [(c.REP_ACK, b"")]
    started = [e for e in p.events[before:] if isinstance(e, StartTLS)]
    assert len(started) == 1
    p.server.tls_established()
    p.run()
    return started[0]


# ============================================================================================== the table


def test_table_covers_every_state_and_has_a_default() -> None:
    assert set(OPTION_TABLE) == set(Security)
    for row in OPTION_TABLE.values():
        assert None in row
        assert set(row) >= {c.OPT_EXPORT_NAME, c.OPT_ABORT, c.OPT_STARTTLS, c.OPT_GO, c.OPT_INFO, c.OPT_LIST}


def test_table_is_the_spec() -> None:
    # FORCEDTLS: before TLS only STARTTLS and ABORT are served; EXPORT_NAME cannot be refused politely.
    req = Security.TLS_REQUIRED
    assert verdict(req, c.OPT_STARTTLS) is Verdict.UPGRADE
    assert verdict(req, c.OPT_ABORT) is Verdict.SERVE
    assert verdict(req, c.OPT_EXPORT_NAME) is Verdict.CLOSE
    for opt in ALL_OPTIONS:
        if opt not in (c.OPT_STARTTLS, c.OPT_ABORT, c.OPT_EXPORT_NAME):
            assert verdict(req, opt) is Verdict.TLS_REQD, opt
    # No TLS offered: STARTTLS is refused by policy, everything else is served.
    assert verdict(Security.PLAINTEXT, c.OPT_STARTTLS) is Verdict.POLICY
    assert verdict(Security.TLS_OFFERED, c.OPT_STARTTLS) is Verdict.UPGRADE
    # Over TLS a second STARTTLS is invalid.
    assert verdict(Security.TLS, c.OPT_STARTTLS) is Verdict.INVALID
    for sec in (Security.PLAINTEXT, Security.TLS_OFFERED, Security.TLS):
        for opt in ALL_OPTIONS:
            if opt != c.OPT_STARTTLS:
                assert verdict(sec, opt) is Verdict.SERVE, (sec, opt)
    assert UPGRADES == {Security.TLS_OFFERED: Security.TLS, Security.TLS_REQUIRED: Security.TLS}


_WIRE = {Verdict.TLS_REQD: c.REP_ERR_TLS_REQD, Verdict.POLICY: c.REP_ERR_POLICY,
         Verdict.INVALID: c.REP_ERR_INVALID}


@pytest.mark.parametrize("security", list(Security))
@pytest.mark.parametrize("option", [o for o in ALL_OPTIONS if o != c.OPT_ABORT])
def test_the_core_answers_what_the_table_says(security: Security, option: int) -> None:
    p = pair(Security.TLS_OFFERED if security is Security.TLS else security)
    if security is Security.TLS:
        upgrade(p)
    assert p.server.security is security
    v = verdict(security, option)
    before = len(p.events)
    data = b"disk" if option == c.OPT_EXPORT_NAME else b""
    evs = p.send(p.client.raw_option(option, data))
    new = p.events[before:]
    if v in _WIRE:
        assert [r for r, _ in replies(evs, option)] == [_WIRE[v]]
        assert not new  # nothing reached the server application
    elif v is Verdict.CLOSE:
        assert isinstance(p.terminal, ProtocolError)
        assert replies(evs) == []
    elif v is Verdict.UPGRADE:
        assert isinstance(new[0], StartTLS)
    else:
        assert v is Verdict.SERVE
        assert not any(r == c.REP_ERR_TLS_REQD for r, _ in replies(evs))


def test_required_lists_nothing_and_serves_no_export_in_plaintext() -> None:
    p = pair(Security.TLS_REQUIRED)
    for msg in (p.client.raw_option(c.OPT_LIST), p.client.opt_info("disk"), p.client.opt_go("disk"),
                p.client.opt_meta(c.OPT_LIST_META_CONTEXT, "disk", [BASE])):
        evs = p.send(msg)
        assert [r for r, _ in replies(evs)] == [c.REP_ERR_TLS_REQD]
    assert not [e for e in p.events if isinstance(e, ExportInfoRequest | Ready)]
    # and the same client gets the export once it has upgraded
    upgrade(p)
    p.send(p.client.opt_go("disk"))
    assert isinstance(p.events[-1], Ready)


# ============================================================================================== the reset


def test_starttls_resets_everything_negotiated_at_once() -> None:
    p = pair(Security.TLS_OFFERED)
    p.send(p.client.raw_option(c.OPT_STRUCTURED_REPLY))
    p.send(p.client.opt_meta(c.OPT_SET_META_CONTEXT, "disk", [BASE]))
    old = p.server.negotiated
    assert old.structured and old.meta_contexts and old.meta_export == "disk"
    upgrade(p)
    assert p.server.negotiated == Negotiated()
    assert p.server.negotiated is not old
    assert not p.server.structured and not p.server.meta_contexts
    p.client.structured = False  # the client starts over too
    p.send(p.client.opt_go("disk"))
    assert isinstance(p.events[-1], Ready)
    assert not p.server.transmission_flags & c.FLAG_SEND_DF  # structured replies did not survive
    assert p.server.meta_contexts == {}


def test_plaintext_after_starttls_in_the_same_packet_has_no_effect() -> None:
    p = pair(Security.TLS_REQUIRED)
    injected = (p.client.raw_option(c.OPT_STRUCTURED_REPLY)
                + p.client.opt_meta(c.OPT_SET_META_CONTEXT, "disk", [BASE]) + p.client.opt_go("disk"))
    wire_before = len(p.wire)
    ev = upgrade(p, extra=injected)
    assert ev.discarded == len(injected)
    assert p.server.discarded == len(injected)
    # the only thing the server wrote is the STARTTLS ACK; no event beyond StartTLS
    assert len(p.wire) == wire_before + 1
    assert not [e for e in p.events if isinstance(e, ExportInfoRequest | Ready)]
    assert p.server.negotiated == Negotiated()
    assert p.server.next_event() is None


def test_plaintext_trickling_in_before_the_handshake_is_dropped() -> None:
    p = pair(Security.TLS_OFFERED)
    p.send(p.client.raw_option(c.OPT_STARTTLS))
    p.server.receive_data(p.client.opt_go("disk"))
    p.server.receive_data(b"\x00" * 100)
    assert p.server.next_event() is None
    assert p.server.discarded == len(p.client.opt_go("disk")) + 100
    p.server.tls_established()
    assert p.server.next_event() is None


def test_second_starttls_is_invalid_and_the_connection_survives() -> None:
    p = pair(Security.TLS_OFFERED)
    upgrade(p)
    evs = p.send(p.client.raw_option(c.OPT_STARTTLS))
    assert [r for r, _ in replies(evs)] == [c.REP_ERR_INVALID]
    p.send(p.client.opt_go("disk"))
    assert isinstance(p.events[-1], Ready)


def test_tls_established_out_of_turn_is_a_programming_error() -> None:
    p = pair(Security.TLS_OFFERED)
    with pytest.raises(RuntimeError):
        p.server.tls_established()


def test_eof_while_waiting_for_the_tls_handshake_closes() -> None:
    p = pair(Security.TLS_OFFERED)
    p.send(p.client.raw_option(c.OPT_STARTTLS))
    p.eof()
    assert p.terminal is not None
