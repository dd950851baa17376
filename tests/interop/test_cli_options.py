"""The typed -o parser (imagecore.qemuopts) against qemu-img 7.2: the same Formatting line, or the same
refusal, for each type's edge cases (size, number, bool, string with ``,,``) in create, measure and amend."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.peers import imagecore_cmd, peer, run

Proc = subprocess.CompletedProcess[bytes]

CREATE_CASES = [
    ("qcow2", "lazy_refcounts=y"), ("qcow2", "lazy_refcounts=n"), ("qcow2", "lazy_refcounts=YES"),
    ("qcow2", "lazy_refcounts="), ("qcow2", "lazy_refcounts"), ("qcow2", "extended_l2=true"),
    ("qcow2", "refcount_bits=0x10"), ("qcow2", "refcount_bits=010"), ("qcow2", "refcount_bits=+16"),
    ("qcow2", "refcount_bits= 16"), ("qcow2", "refcount_bits=16 "), ("qcow2", "refcount_bits=16k"),
    ("qcow2", "refcount_bits="), ("qcow2", "refcount_bits=-1"), ("qcow2", "refcount_bits=08"),
    ("qcow2", "refcount_bits=18446744073709551615"), ("qcow2", "refcount_bits=99999999999999999999"),
    ("qcow2", "refcount_bits=-18446744073709551615"), ("qcow2", "cluster_size=1x"),
    ("qcow2", "cluster_size=0x10000"), ("qcow2", "cluster_size="),
    ("qcow2", "cluster_size=99999999999999999999"),
    ("qcow2", "cluster_size=64k,cluster_size=128k"), ("qcow2", "x=1"), ("qcow2", "cluster_size=64k,x"),
    ("qcow2", "compat=v9,x=1"), ("qcow2", "encrypt.iter-time=abc"), ("qcow2", "nocow=on"),
    ("qcow2", "backing_file=a,,b,backing_fmt=raw"),
    ("vmdk", "compat6=y"), ("vmdk", "compat6=maybe"), ("vmdk", "zeroed_grain=yes"),
    ("vmdk", "hwversion=4,toolsversion=a,,b"), ("vmdk", "adapter_type=lsilogic,extent_size_hint=1M"),
    ("raw", "nocow=on,extent_size_hint=1M"), ("raw", "nocow=x"), ("raw", "extent_size_hint=1q"),
    ("raw", "cluster_size=64k"), ("raw", "preallocation=full"),
]


def both(work: Path, *args: str) -> tuple[Proc, Proc]:
    (work / "q").mkdir(exist_ok=True)
    (work / "o").mkdir(exist_ok=True)
    q = subprocess.run([peer("qemu-img"), *args], capture_output=True, cwd=work / "q", timeout=120)
    o = subprocess.run([*imagecore_cmd(), *args], capture_output=True, cwd=work / "o", timeout=120)
    return q, o


def same(q: Proc, o: Proc) -> None:
    assert b"Traceback" not in o.stderr
    assert (o.returncode, o.stdout) == (q.returncode, q.stdout)
    assert o.stderr.replace(b"imagecore: ", b"qemu-img: ") == q.stderr


@pytest.mark.parametrize(("fmt", "opts"), CREATE_CASES)
def test_create_options_as_qemu(work: Path, fmt: str, opts: str) -> None:
    q, o = both(work, "create", "-f", fmt, "-o", opts, f"a.{fmt}", "1M")
    same(q, o)
    if q.returncode == 0 and fmt != "raw":
        run(peer("qemu-img"), "check", "-f", fmt, work / "o" / f"a.{fmt}")


@pytest.mark.parametrize("opts", ["lazy_refcounts=YES", "refcount_bits=0x10", "refcount_bits=16 ",
                                  "cluster_size=1x", "x=1", "refcount_bits=99999999999999999999"])
def test_measure_options_as_qemu(work: Path, opts: str) -> None:
    q, o = both(work, "measure", "-O", "qcow2", "-o", opts, "--size", "1M")
    same(q, o)


@pytest.mark.parametrize("opts", ["refcount_bits=99999999999999999999", "refcount_bits=16 ",
                                  "refcount_bits=4294967312", "lazy_refcounts=YES", "lazy_refcounts=y",
                                  "cluster_size=64k", "x=1"])
def test_amend_options_as_qemu(work: Path, opts: str) -> None:
    for side in ("q", "o"):
        (work / side).mkdir(exist_ok=True)
        run(peer("qemu-img"), "create", "-q", "-f", "qcow2", work / side / "a.qcow2", "1M")
    q, o = both(work, "amend", "-f", "qcow2", "-o", opts, "a.qcow2")
    same(q, o)
    qi = run(peer("qemu-img"), "info", "--output=json", work / "q" / "a.qcow2").stdout
    oi = run(peer("qemu-img"), "info", "--output=json", work / "o" / "a.qcow2").stdout
    assert qi.replace(b"/q/", b"/o/") == oi
