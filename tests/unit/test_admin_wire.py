"""The admin wire codec without sockets: QEMU's framing of JSON objects, and the generated command docs."""

from __future__ import annotations

from nbdsrv.admin.docgen import DOC, render
from nbdsrv.admin.wire import AdminConnection, Execute, Invalid, Negotiated


def feed(conn: AdminConnection, data: bytes) -> list[object]:
    conn.receive_data(data)
    out: list[object] = []
    while (ev := conn.next_event()) is not None:
        out.append(ev)
    return out


def test_framing_follows_braces_not_lines() -> None:
    c = AdminConnection({})
    # No newline after the object: the qemu.qmp client sends none.
    evs = feed(c, b'{"execute": "qmp_capabilities", "arguments": {}}')
    assert len(evs) == 1 and isinstance(evs[0], Negotiated)
    evs = feed(c, b'{"execute": "a", "arguments": {"s": "x}\\"{"}}{"execute": "b", "id": 2}\n')
    assert evs == [Execute("a", {"s": 'x}"{'}, evs[0].id), Execute("b", {}, 2)]  # type: ignore[attr-defined]
    assert feed(c, b'{"execute":\n') == []
    assert [e.name for e in feed(c, b' "c"}')] == ["c"]  # type: ignore[attr-defined]
    # An escape split across two reads.
    assert feed(c, b'{"execute": "q\\') == []
    assert [e.name for e in feed(c, b'"x"}')] == ['q"x']  # type: ignore[attr-defined]


def test_garbage_ends_at_its_line_and_the_next_message_parses() -> None:
    c = AdminConnection({})
    feed(c, b'{"execute": "qmp_capabilities"}')
    evs = feed(c, b'{not json\n[1, 2]\n"text"\n7\n' + b"x" * 10 + b'\n{"execute": "ok"}')
    assert [type(e) for e in evs] == [Invalid] * 5 + [Execute]
    assert all(e.error_class == "GenericError" for e in evs[:5])  # type: ignore[attr-defined]


def test_oversized_message_is_refused_and_skipped() -> None:
    c = AdminConnection({}, max_line=1000)
    feed(c, b'{"execute": "qmp_capabilities"}')
    evs = feed(c, b'{"execute": "' + b"a" * 3000)
    assert len(evs) == 1 and isinstance(evs[0], Invalid) and "longer than 1000" in evs[0].desc
    assert c.buffered <= 1000
    evs = feed(c, b"a" * 3000 + b'"}\n{"execute": "after"}\n')
    assert [e.name for e in evs if isinstance(e, Execute)] == ["after"]


def test_admin_md_command_table_is_current() -> None:
    text = DOC.read_text()
    assert render(text) == text, "run: python -m nbdsrv.admin.docgen"
