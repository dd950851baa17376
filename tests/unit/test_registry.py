"""The format registry as data: nothing registers behind a program's back, each spec carries what the
verbs and the server read from it, and the server takes its format lists from it."""

from __future__ import annotations

import subprocess
import sys

from imagecore.driver import FILE_CREATE_OPTIONS, format_of_extension, format_specs, get_format
from imagecore.formats import register_all
from imagecore.ops.create import all_options, formatting_line
from nbdsrv.formats import POOL_DISK_FORMATS, image_formats, pool_disk_extensions
from tests.peers import REPO


def test_the_registry_never_loads_the_formats_itself() -> None:
    # a fresh process that imports the registry and asks for a format: nothing is registered until a
    # program registers the formats (imagecore.formats.register_all)
    code = ("import imagecore.driver as d, sys\n"
            "assert d.format_names() == [], d.format_names()\n"
            "assert 'imagecore.formats' not in sys.modules\n"
            "try:\n    d.get_format('raw')\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={"PYTHONPATH": str(REPO)}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "UnsupportedError Unknown driver 'raw'\n"


def test_specs_carry_extensions_options_and_probes() -> None:
    names = register_all()
    assert {"qcow2", "raw", "vmdk", "qed", "qcow", "luks"} <= set(names) and names == sorted(names)
    for spec in format_specs():
        assert spec.extensions and spec.extensions[0] == spec.name
        assert format_of_extension(f"x.{spec.name.upper()}") == spec.name
        names = [o.name for o in spec.create_options]
        assert len(names) == len(set(names)) and "size" in names
    assert format_of_extension("x.iso") is None and format_of_extension("noext") is None
    assert get_format("raw").file_create and not get_format("qcow2").file_create
    assert "lazy-refcounts" in get_format("qcow2").open_options
    assert get_format("qcow2").probe is not None and get_format("raw").probe is None
    # qemu's order: the format's own options, then the file protocol's it does not declare
    assert [o.name for o in all_options("raw")] == ["size", *(o.name for o in FILE_CREATE_OPTIONS)]


def test_formatting_line_follows_the_spec_order_and_defaults() -> None:
    assert formatting_line("a.qcow2", "qcow2", 1 << 20, {"lazy_refcounts": "y", "refcount_bits": "-1"}) == (
        "Formatting 'a.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib "
        "size=1048576 lazy_refcounts=y refcount_bits=-1")
    assert formatting_line("a,b.vmdk", "vmdk", 512, {"toolsversion": "a,b"}) == (
        "Formatting 'a,b.vmdk', fmt=vmdk size=512 compat6=off hwversion=undefined toolsversion=a,,b")


def test_server_lists_come_from_the_registry() -> None:
    assert image_formats() == register_all()
    assert POOL_DISK_FORMATS == ("raw", "qcow2", "vmdk")
    assert pool_disk_extensions() == {"raw": "raw", "qcow2": "qcow2", "vmdk": "vmdk"}
