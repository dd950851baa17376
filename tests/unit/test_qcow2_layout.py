"""The construct declaration of the qcow2 header and the struct decoder agree on real qemu-img headers."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagecore.formats.qcow2 import layout
from tests.peers import peer, run

VARIANTS = [
    ("compat=0.10",),
    ("compat=1.1",),
    ("compat=1.1,cluster_size=512,refcount_bits=1",),
    ("compat=1.1,cluster_size=2M,refcount_bits=64",),
    ("compression_type=zstd,lazy_refcounts=on",),
    ("extended_l2=on,cluster_size=128k",),
    ("backing",),
    ("data_file",),
]


def make(tmp: Path, opts: str) -> Path:
    img = tmp / "h.qcow2"
    qemu_img = peer("qemu-img")
    if opts == "backing":
        base = tmp / "base.raw"
        base.write_bytes(bytes(4096))
        run(qemu_img, "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "raw", img, "3M")
    elif opts == "data_file":
        run(qemu_img, "create", "-q", "-f", "qcow2", "-o", f"data_file={tmp / 'h.data'},data_file_raw=on",
            img, "3M")
    else:
        run(qemu_img, "create", "-q", "-f", "qcow2", "-o", opts, img, "3M")
    return img


@pytest.mark.parametrize("opts", [v[0] for v in VARIANTS])
def test_construct_and_struct_agree(tmp_path: Path, opts: str) -> None:
    img = make(tmp_path, opts)
    raw = img.read_bytes()
    fast = layout.parse_header_fields(raw)
    slow = layout.HEADER.parse(raw)
    for name in ("version", "backing_file_offset", "backing_file_size", "cluster_bits", "size",
                 "crypt_method", "l1_size", "l1_table_offset", "refcount_table_offset",
                 "refcount_table_clusters", "nb_snapshots", "snapshots_offset"):
        assert getattr(fast, name) == slow[name], name
    if fast.version >= 3:
        for name in ("incompatible_features", "compatible_features", "autoclear_features",
                     "refcount_order", "header_length"):
            assert getattr(fast, name) == slow.v3[name], name
    else:
        assert slow.v3 is None
    # the extensions the construct declaration walks are the ones parse_header finds
    full = layout.parse_header(raw[:fast.cluster_size], len(raw))
    off = full.header_length
    exts = []
    while True:
        e = layout.HEADER_EXTENSION.parse(raw[off:])
        if e.type == layout.EXT_END:
            break
        exts.append((e.type, bytes(e.data)))
        off += 8 + e.length + (-e.length) % 8
    assert exts == [(e.type, e.data) for e in full.extensions]


@pytest.mark.parametrize("opts", [v[0] for v in VARIANTS])
def test_encode_header_round_trips(tmp_path: Path, opts: str) -> None:
    img = make(tmp_path, opts)
    raw = img.read_bytes()
    h = layout.parse_header(raw[:65536], len(raw))
    again = layout.parse_header(layout.encode_header(h), len(raw))
    assert again == h
