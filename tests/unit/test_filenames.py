"""qemu's image names parsed into options trees: NBD URLs and the legacy nbd: syntax, json: (nested and
dotted keys alike), --image-opts strings with ',,', protocol prefixes, and --object secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagecore.errors import InvalidArgumentError
from imagecore.filenames import (
    ImageOptsName,
    ObjectStore,
    add_object,
    format_of,
    host_file_of,
    is_special,
    nbd_display_name,
    options_of,
    protocol_of,
    split_qemu_opts,
)


@pytest.mark.parametrize(("name", "server", "export", "shown"), [
    ("nbd://host:1234/disk", {"type": "inet", "host": "host", "port": "1234"}, "disk", "nbd://host:1234/disk"),
    ("nbd://host/", {"type": "inet", "host": "host", "port": "10809"}, None, "nbd://host:10809"),
    ("nbd+tcp://h:7/a%20b", {"type": "inet", "host": "h", "port": "7"}, "a b", "nbd://h:7/a b"),
    ("nbd+unix:///e?socket=/run/s.sock", {"type": "unix", "path": "/run/s.sock"}, "e",
     "nbd+unix:///e?socket=/run/s.sock"),
    ("nbd+unix://?socket=/s", {"type": "unix", "path": "/s"}, None, "nbd+unix://?socket=/s"),
    ("nbd:unix:/s:exportname=x", {"type": "unix", "path": "/s"}, "x", "nbd+unix:///x?socket=/s"),
    ("nbd:localhost:10810", {"type": "inet", "host": "localhost", "port": "10810"}, None,
     "nbd://localhost:10810"),
])
def test_nbd_names(name: str, server: dict[str, str], export: str | None, shown: str) -> None:
    tree = options_of(name)
    assert tree is not None and is_special(name)
    nbd = tree["file"]
    assert nbd["driver"] == "nbd" and nbd["server"] == server and nbd.get("export") == export
    assert nbd_display_name(nbd) == shown
    assert host_file_of(name) is None


@pytest.mark.parametrize(("name", "message"), [
    ("nbd://", "No valid URL specified"),
    ("nbd+unix:///e", "No valid URL specified"),
    ("nbd+unix:///e?socket=/s&x=1", "No valid URL specified"),
    ("nbd://h:port/", "No valid URL specified"),
    ("nbd+foo://x", "Unknown protocol 'nbd+foo'"),
    ("nbd:localhost", "error parsing address 'localhost'"),
    ("foo:bar", "Unknown protocol 'foo'"),
    ("json:", "Could not parse the JSON options: Expecting a JSON value"),
    ("json:{", "Could not parse the JSON options: JSON parse error, premature EOI"),
    ("json:[1]", "Invalid JSON object given"),
    ("json:{} {}", "Could not parse the JSON options: Expecting at most one JSON value"),
    ('json:{"a":[1 2]}', "Could not parse the JSON options: JSON parse error, expected separator in list"),
    ('json:{"a":nope}', "Could not parse the JSON options: JSON parse error, invalid keyword 'nope'"),
    ('json:{"a": "open}', "Could not parse the JSON options: JSON parse error, stray '\"open}'"),
    ("json:{'a': 'open}", "Could not parse the JSON options: JSON parse error, stray ''open}'"),
])
def test_bad_names(name: str, message: str) -> None:
    with pytest.raises(InvalidArgumentError) as exc:
        options_of(name)
    assert str(exc.value) == message


def test_plain_and_file_names() -> None:
    for name in ("x.qcow2", "./a:b", "/abs/a:b", "dir/x:y"):
        assert protocol_of(name) is None and options_of(name) is None and not is_special(name)
        assert host_file_of(name) == name
    assert options_of("file:x.qcow2") == {"file": {"driver": "file", "filename": "x.qcow2"}}


def test_json_in_qemus_dialect_single_quotes_and_escaped_quote() -> None:
    """qemu's JSON lexer takes 'single-quoted' strings (iotests write json: backing names that way), with
    " as an ordinary character inside them and \\' as an escape in both kinds of string."""
    double = options_of('json:{"driver":"qcow2","file":{"driver":"file","filename":"x.qcow2"}}')
    single = options_of("json:{'driver':'qcow2','file':{'driver':'file','filename':'x.qcow2'}}")
    assert single == double
    assert options_of("""json:{'file.filename': 'a"b\\'c', "driver": "it\\'s"}""") == {
        "file": {"filename": "a\"b'c"}, "driver": "it's"}
    assert options_of('json:{"file.filename": "\\u0041\\n"}') == {"file": {"filename": "A\n"}}


def test_json_nested_and_dotted_keys_are_one_tree() -> None:
    nested = options_of('json:{"driver":"qcow2","file":{"driver":"file","filename":"x.qcow2"}}')
    dotted = options_of('json:{"driver":"qcow2","file.driver":"file","file.filename":"x.qcow2"}')
    assert nested == dotted == {"driver": "qcow2", "file": {"driver": "file", "filename": "x.qcow2"}}
    assert format_of('json:{"driver":"qcow2","file.filename":"x"}') == "qcow2"
    assert host_file_of('json:{"driver":"qcow2","file.filename":"x"}') == "x"
    with pytest.raises(InvalidArgumentError):
        options_of('json:{"file":"x","file.filename":"y"}')  # a scalar and a subtree under one key


def test_image_opts_strings() -> None:
    assert split_qemu_opts("a=1,b=x,,y,,,c") == [("a", "1"), ("b", "x,y,"), ("c", None)]
    name = ImageOptsName("driver=raw,file.filename=a,,b.raw,file.locking=off")
    assert options_of(name) == {"driver": "raw", "file": {"filename": "a,b.raw", "locking": "off"}}
    assert str(name) == "driver=raw,file.filename=a,,b.raw,file.locking=off"
    assert host_file_of(name) == "a,b.raw"
    assert host_file_of(ImageOptsName("driver=nbd,server.type=unix,server.path=/s")) is None


def test_objects(tmp_path: Path) -> None:
    store = ObjectStore()
    add_object("secret,id=a,data=pw", store)
    (tmp_path / "key").write_bytes(b"from-file")
    add_object(f"secret,id=b,file={tmp_path / 'key'}", store)
    add_object("qom-type=secret,id=c,data=cHc=,format=base64", store)
    assert [store.secret(i).data for i in "abc"] == [b"pw", b"from-file", b"pw"]
    for text, message in [
        ("foo,id=x", "Parameter 'qom-type' does not accept value 'foo'"),
        ("secret,data=x", "Parameter 'id' is missing"),
        ("secret,id=d,data=1,bogus=2", "Parameter 'bogus' is unexpected"),
        ("secret,id=a,data=1", "attempt to add duplicate property 'a' to object (type 'container')"),
    ]:
        with pytest.raises(InvalidArgumentError) as exc:
            add_object(text, store)
        assert str(exc.value) == message


def test_a_pool_never_follows_a_protocol_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backing file name such as nbd://... or json:{...} stored in a pool's image never makes the server
    connect anywhere or open a file outside the pool: the pool's resolve turns it into a confined path
    (or refuses it), whatever the server's working directory."""
    from imagecore.errors import PermissionDeniedError
    from nbdsrv.pools import PoolOpener

    pool = tmp_path / "pool"
    pool.mkdir()
    opener = PoolOpener(str(pool))
    for cwd in (pool, tmp_path):
        monkeypatch.chdir(cwd)
        for name in ("nbd+unix:///b?socket=/run/x.sock", 'json:{"driver":"nbd"}', "nbd://h/x", "file:/etc/x"):
            try:
                resolved = opener.resolve(name, str(pool / "a.qcow2"))
            except PermissionDeniedError:
                continue
            assert resolved.startswith(str(pool) + "/") and not is_special(resolved), resolved
