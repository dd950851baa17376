"""`imagecore convert`'s flags beside qemu-img 7.2 in the same test: the refusals of flag combinations (exit
code, stdout, stderr, no target left behind), -r's pacing, --salvage over unreadable clusters, -C, -B, -n,
--target-is-zero, -W, -m, -S, -c onto subclustered images and across sources, and -o's qcow2 options.
Each converted target must read as qemu-img's (qemu-img compare), pass qemu-img check, and show qemu-img
info --output=json and (where allocation matters) qemu-img map --output=json as qemu-img's own twin does."""

from __future__ import annotations

import asyncio
import json
import os
import re
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.peers import imagecore_cmd, peer, run

MiB = 1 << 20


def both(work: Path, *args: str, target: str = "t.img") -> tuple[subprocess.CompletedProcess[bytes], ...]:
    """Run qemu-img and imagecore convert with the same arguments onto q.<target> and o.<target>."""
    res = []
    for name, cmd in (("q", [peer("qemu-img")]), ("o", imagecore_cmd())):
        res.append(subprocess.run([*cmd, "convert", *args, f"{name}.{target}"], capture_output=True,
                                  cwd=work, timeout=120))
    return tuple(res)


def same_result(q: subprocess.CompletedProcess[bytes], o: subprocess.CompletedProcess[bytes],
                target: str = "t.img") -> None:
    assert (o.returncode, o.stdout) == (q.returncode, q.stdout), (q, o)
    ours = o.stderr.replace(b"imagecore:", b"qemu-img:").replace(b"imagecore --help", b"qemu-img --help")
    assert ours.replace(f"o.{target}".encode(), f"q.{target}".encode()) == q.stderr


def qinfo(img: Path) -> dict[str, object]:
    info = json.loads(run(peer("qemu-img"), "info", "--output=json", img).stdout)
    for key in ("filename", "actual-size", "dirty-flag"):
        info.pop(key, None)
    data = info.get("format-specific", {}).get("data", {})
    data.pop("data-file", None)
    return dict(info)


def qmap(img: Path) -> list[tuple[int, int, bool, bool, int]]:
    """qemu-img map's runs without host offsets (two images lay their clusters out differently)."""
    runs = json.loads(run(peer("qemu-img"), "map", "--output=json", img).stdout)
    return [(r["start"], r["length"], r["data"], r["zero"], r["depth"]) for r in runs]


@pytest.fixture
def work(tmp_path: Path) -> Path:
    run(peer("qemu-img"), "create", "-q", "-f", "raw", tmp_path / "x.raw", "1M")
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", tmp_path / "b.qcow2", "1M")
    (tmp_path / "d.raw").write_bytes(os.urandom(MiB))
    run(peer("qemu-img"), "create", "-q", "-f", "raw", tmp_path / "small.raw", "512k")
    return tmp_path


REFUSED = [
    ["-r", "x"], ["-r", "-1"], ["-r", "8E"], ["-r", "1.5"],
    ["-C", "-c"], ["-C", "-S", "4k"], ["-C", "-S", "0"], ["-C", "--salvage"], ["-S", "3", "-C"],
    ["-n", "-o", "cluster_size=4k"], ["-n", "-o", "help"], ["--target-is-zero"],
    ["-B", "b.qcow2"], ["-B", "b.qcow2", "-F", "qcow2", "-O", "raw"],
    ["-O", "raw", "-o", "backing_file=b.qcow2"],
    ["-c", "-O", "raw"], ["-c", "-O", "qcow2", "-o", "preallocation=metadata"],
    ["-c", "-O", "qcow2", "-o", "encryption=on"],
    ["-c", "-O", "qcow2", "-o", "preallocation=falloc,encryption=on"],
    ["-c", "-O", "qcow2", "-o", "data_file=dz.raw"],
]


@pytest.mark.parametrize("args", REFUSED, ids=[" ".join(a) for a in REFUSED])
def test_refusals_as_qemu_img(work: Path, args: list[str]) -> None:
    fmt = args[args.index("-O") + 1] if "-O" in args else "qcow2" if "-B" in args else "raw"
    a = args if "-O" in args else [*args, "-O", fmt]
    q, o = both(work, *a, "d.raw")
    assert q.returncode == 1
    same_result(q, o)
    assert os.path.exists(work / "q.t.img") == os.path.exists(work / "o.t.img")


@pytest.mark.parametrize("args", [
    ["-B", "b.qcow2", "-F", "qcow2", "-O", "qcow2", "x.raw", "x.raw"],
    ["-o", "backing_file=b.qcow2,backing_fmt=qcow2", "-O", "qcow2", "x.raw", "x.raw"],
    ["-n", "-O", "raw", "d.raw"],
])
def test_source_side_refusals_as_qemu_img(work: Path, args: list[str]) -> None:
    q, o = both(work, *args)
    assert q.returncode == 1
    same_result(q, o)


def test_smaller_existing_target_refused_as_qemu_img(work: Path) -> None:
    for name in ("q", "o"):
        run(peer("qemu-img"), "create", "-q", "-f", "raw", work / f"{name}.t.img", "512k")
    q, o = both(work, "-n", "-O", "raw", "d.raw")
    assert q.returncode == 1
    same_result(q, o)


def test_target_is_zero_with_a_backing_file(work: Path) -> None:
    # qemu-img prints the refusal and exits 0 having written nothing; imagecore refuses with exit 1
    for name in ("q", "o"):
        (work / f"{name}.t.img").write_bytes(b"\xee" * MiB)
    q, o = both(work, "-n", "--target-is-zero", "-B", "b.qcow2", "-O", "raw", "d.raw")
    assert q.returncode == 0 and o.returncode == 1
    assert o.stderr.replace(b"imagecore:", b"qemu-img:") == q.stderr
    assert (work / "o.t.img").read_bytes() == (work / "q.t.img").read_bytes() == b"\xee" * MiB


def test_rate_limit_paces_as_qemu_img(work: Path) -> None:
    """-r is qemu's write throttle: 4 MiB at 1 MiB/s go out in two 2 MiB requests, the second once the
    first has drained to a tenth of a second's worth: about 1.9 s, for both."""
    (work / "r4.raw").write_bytes(os.urandom(4 * MiB))
    took = []
    for name, cmd in (("q", [peer("qemu-img")]), ("o", imagecore_cmd())):
        t0 = time.monotonic()
        run(*cmd, "convert", "-r", "1M", "-O", "raw", work / "r4.raw", work / f"{name}.raw")
        took.append(time.monotonic() - t0)
        assert (work / f"{name}.raw").read_bytes() == (work / "r4.raw").read_bytes()
    assert 1.7 < took[0] < 4.0 and 1.7 < took[1] < 4.0, took
    assert abs(took[1] - took[0]) < 1.2, took


def _compressed_with_a_bad_cluster(work: Path, name: str) -> Path:
    data = work / "text.raw"
    data.write_bytes((b"hello world line\n" * 250000)[: 4 << 20])
    img = work / name
    run(peer("qemu-img"), "convert", "-c", "-O", "qcow2", data, img)
    with img.open("r+b") as f:
        (l1_offset,) = struct.unpack_from(">Q", f.read(72), 40)
        f.seek(l1_offset)
        l2_offset = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2_offset + 8 * 30)
        entry = struct.unpack(">Q", f.read(8))[0]
        f.seek(entry & ((1 << 54) - 1))
        f.write(b"\xff" * 64)  # cluster 30 no longer inflates: reading it is EIO
    return img


def _unaligned_l2_entry(work: Path, name: str) -> Path:
    img = work / name
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", img, "4M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 0x41 0 1M", img)
    with img.open("r+b") as f:
        (l1_offset,) = struct.unpack_from(">Q", f.read(72), 40)
        f.seek(l1_offset)
        l2_offset = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2_offset + 8 * 5)
        entry = struct.unpack(">Q", f.read(8))[0]
        f.seek(l2_offset + 8 * 5)
        f.write(struct.pack(">Q", entry + 0x200))  # block status fails there: the image is corrupt
    return img


def _warnings(stderr: bytes) -> list[str]:
    # qemu's own corruption notice ("qcow2: Image is corrupt: ...") is the format driver's, worded apart
    return [line.replace("imagecore:", "qemu-img:") for line in stderr.decode().splitlines()
            if line.startswith(("qemu-img:", "imagecore:"))]


@pytest.mark.parametrize("make", [_compressed_with_a_bad_cluster, _unaligned_l2_entry])
def test_salvage_as_qemu_img(work: Path, make: object) -> None:
    assert callable(make)
    res = {}
    for name, cmd in (("q", [peer("qemu-img")]), ("o", imagecore_cmd())):
        src = make(work, f"{name}.src.qcow2")
        plain = subprocess.run([*cmd, "convert", "-O", "raw", src, work / f"{name}.fail.raw"],
                               capture_output=True, timeout=120)
        assert plain.returncode == 1
        assert re.search(rb"error while reading (block status at offset|at byte) \d+: Input/output error\n$",
                         plain.stderr), plain.stderr
        res[name] = subprocess.run([*cmd, "convert", "--salvage", "-O", "raw", src, work / f"{name}.raw"],
                                   capture_output=True, timeout=120)
        quiet = subprocess.run([*cmd, "convert", "--salvage", "-q", "-O", "raw", src, work / f"{name}.q.raw"],
                               capture_output=True, timeout=120)
        assert quiet.returncode == 0 and not _warnings(quiet.stderr)
    q, o = res["q"], res["o"]
    assert (o.returncode, o.stdout) == (q.returncode, q.stdout) == (0, b"")
    warnings = _warnings(q.stderr)
    assert len(warnings) >= 128
    assert all(w.startswith("qemu-img: warning: error while reading") for w in warnings)
    assert _warnings(o.stderr) == warnings
    assert (work / "o.raw").read_bytes() == (work / "q.raw").read_bytes()


def _mixed_source(work: Path) -> Path:
    src = work / "mix.qcow2"
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", src, "4M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "write -c -P 2 1M 64k",
        "-c", "write -P 3 2M 1M", "-c", "write -z 3M 64k", src)
    return src


@pytest.mark.parametrize(("src_name", "fmt"), [("d.raw", "raw"), ("mix", "raw"), ("mix", "qcow2")])
def test_copy_offload_as_qemu_img(work: Path, src_name: str, fmt: str) -> None:
    src = _mixed_source(work) if src_name == "mix" else work / src_name
    q, o = both(work, "-C", "-O", fmt, src.name)
    same_result(q, o)
    assert o.returncode == 0
    run(peer("qemu-img"), "compare", "-F", fmt, src, work / "o.t.img")
    run(peer("qemu-img"), "compare", "-f", fmt, "-F", fmt, work / "q.t.img", work / "o.t.img")
    if fmt == "qcow2":
        run(peer("qemu-img"), "check", work / "o.t.img")


def test_copy_offload_copies_host_to_host(work: Path) -> None:
    """The raw runs go through copy_file_range; the compressed cluster is read and written."""
    from imagecore.ops.convert import ConvertOptions, convert

    src = _mixed_source(work)
    o = ConvertOptions(sources=[str(src)], target=str(work / "c.raw"), copy_range=True)
    stats = asyncio.run(convert(o))
    assert stats.bytes_offloaded == 2 * MiB
    assert stats.bytes_written == 2 * MiB + 64 * 1024
    run(peer("qemu-img"), "compare", "-F", "raw", src, work / "c.raw")


def _chain(work: Path) -> Path:
    base = work / "base.qcow2"
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", base, "8M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 1 0 6M", base)
    top = work / "top.qcow2"
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 2 1M 1M", "-c", "write -z 3M 512k",
        "-c", "write -P 1 5M 64k", top)
    return top


@pytest.mark.parametrize("extra", [[], ["-c"], ["-W", "-m", "1"], ["-m", "16", "-S", "64k"]])
def test_backing_target_as_qemu_img(work: Path, extra: list[str]) -> None:
    """-B: only what the source holds above its backing file is written; the rest shows the backing."""
    top = _chain(work)
    q, o = both(work, *extra, "-B", "base.qcow2", "-F", "qcow2", "-O", "qcow2", top.name)
    same_result(q, o)
    run(peer("qemu-img"), "check", work / "o.t.img")
    run(peer("qemu-img"), "compare", top, work / "o.t.img")
    assert qinfo(work / "o.t.img") == qinfo(work / "q.t.img")
    assert qmap(work / "o.t.img") == qmap(work / "q.t.img")


@pytest.mark.parametrize("extra", [[], ["--target-is-zero"], ["-B", "base.qcow2"], ["-W"], ["-S", "0"]])
def test_existing_target_as_qemu_img(work: Path, extra: list[str]) -> None:
    """-n over an existing qcow2 that holds data: with --target-is-zero qemu-img trusts the claim (and keeps
    the old data where the source has zeroes); with -B only the source's own layer is written."""
    top = _chain(work)
    for name in ("q", "o"):
        run(peer("qemu-img"), "create", "-q", "-f", "qcow2", work / f"{name}.t.img", "8M")
        run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 9 0 8M", work / f"{name}.t.img")
    q, o = both(work, "-n", *extra, "-O", "qcow2", top.name)
    same_result(q, o)
    assert o.returncode == 0
    run(peer("qemu-img"), "check", work / "o.t.img")
    run(peer("qemu-img"), "compare", work / "q.t.img", work / "o.t.img")
    assert qmap(work / "o.t.img") == qmap(work / "q.t.img")


@pytest.mark.parametrize("opts", ["extended_l2=on", "extended_l2=on,cluster_size=16k", "data_file=DF",
                                  "data_file=DF,data_file_raw=on", "preallocation=metadata",
                                  "preallocation=falloc", "preallocation=full", "compression_type=zstd"])
def test_qcow2_options_as_qemu_img(work: Path, opts: str, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _mixed_source(work)
    res = []
    for name, cmd in (("q", [peer("qemu-img")]), ("o", imagecore_cmd())):
        res.append(subprocess.run([*cmd, "convert", "-O", "qcow2", "-o", opts.replace("DF", f"{name}.df"),
                                   src.name, f"{name}.t.img"], capture_output=True, cwd=work, timeout=120))
    same_result(*res)
    out = work / "o.t.img"
    monkeypatch.chdir(work)  # the data file's name is relative to the working directory, as qemu-img made it
    run(peer("qemu-img"), "check", out)
    run(peer("qemu-img"), "compare", src, out)
    assert qinfo(out) == qinfo(work / "q.t.img")
    # the same allocation of the image's first cluster and of the data file's first block as qemu-img's:
    # qemu's map tells metadata preallocation (and so the zeroes of a raw data file) by them
    assert qmap(out) == qmap(work / "q.t.img")


def _compressed_clusters(img: Path) -> int:
    data = json.loads(run(peer("qemu-img"), "check", "--output=json", img).stdout)
    assert data.get("corruptions", 0) == 0 and data.get("leaks", 0) == 0, data
    return int(data.get("compressed-clusters", 0))


@pytest.mark.parametrize("opts", ["extended_l2=on", "extended_l2=on,cluster_size=128k",
                                  "compression_type=zstd,cluster_size=4k", "cluster_size=64k"])
def test_compressed_across_sources_as_qemu_img(work: Path, opts: str) -> None:
    """-c with sources whose sizes are not cluster multiples (a cluster spans two of them), onto plain
    and subclustered images: the same compressed clusters and the same map as qemu-img's."""
    (work / "s1.raw").write_bytes((b"some text line\n" * 10000)[:100000])
    (work / "s2.raw").write_bytes((b"other words here\n" * 10000)[:150000])
    (work / "s3.raw").write_bytes(os.urandom(70000))
    q, o = both(work, "-c", "-O", "qcow2", "-o", opts, "s1.raw", "s2.raw", "s3.raw")
    same_result(q, o)
    assert o.returncode == 0
    run(peer("qemu-img"), "compare", work / "q.t.img", work / "o.t.img")
    assert _compressed_clusters(work / "o.t.img") == _compressed_clusters(work / "q.t.img") > 0
    assert qinfo(work / "o.t.img") == qinfo(work / "q.t.img")
    assert qmap(work / "o.t.img") == qmap(work / "q.t.img")


@pytest.mark.parametrize("sparse", ["0", "512", "4k", "64k", "1M"])
def test_sparse_sizes_allocate_as_qemu_img(work: Path, sparse: str) -> None:
    src = work / "s.raw"
    with src.open("wb") as f:
        f.truncate(8 * MiB)
        for at, n in ((0, 4096), (8192, 4096), (65536 * 3, 512), (MiB, 300 * 1024), (3 * MiB, 4096)):
            f.seek(at)
            f.write(b"\x5a" * n)
    q, o = both(work, "-S", sparse, "-O", "qcow2", "-o", "cluster_size=4k", src.name)
    same_result(q, o)
    run(peer("qemu-img"), "compare", src, work / "o.t.img")
    assert qmap(work / "o.t.img") == qmap(work / "q.t.img")


def test_compression_in_worker_processes(work: Path) -> None:
    """The process-pool compressor writes what the thread-pool one writes."""
    from imagecore.ops.convert import ConvertOptions, convert

    src = work / "mixed.raw"
    src.write_bytes((b"compressible text " * 60000)[: MiB] + os.urandom(MiB) + bytes(MiB) + b"\x01" * 4096)
    outs = []
    for workers in (0, 2):
        out = work / f"w{workers}.qcow2"
        asyncio.run(convert(ConvertOptions(sources=[str(src)], target=str(out), out_fmt="qcow2",
                                           compress=True, compress_workers=workers)))
        run(peer("qemu-img"), "compare", "-f", "raw", "-F", "qcow2", src, out)
        outs.append(_compressed_clusters(out))
    assert outs[0] == outs[1] > 0


@pytest.mark.parametrize("flags", [(), ("-S", "0"), ("-c",), ("-B", "base.qcow2", "-F", "qcow2")],
                         ids=["plain", "S0", "compressed", "backing"])
def test_progress_counts_what_the_copy_counts(work: Path, flags: tuple[str, ...]) -> None:
    """-p shows the share of the data copied, as qemu-img's counting pass finds it (data chunks; zero
    ones too with -S 0; a compressed copy counted a cluster at a time; what the backing file holds
    skipped), not of the guest size: 1 MiB runs at 0, 2, 4 and 32 MiB of a 128 MiB image print 25, 50,
    75 and 100 % (qemu's iotest 086)."""
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", work / "base.qcow2", "128M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -P 7 2M 1M", work / "base.qcow2")
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
        work / "p.qcow2", "128M")
    for off in ("0", "2M", "4M", "32M"):
        run(peer("qemu-io"), "-f", "qcow2", "-c", f"write {off} 1M", work / "p.qcow2")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write -z 8M 1M", work / "p.qcow2")
    out = "qcow2" if flags and flags[0] in ("-c", "-B") else "raw"
    q, o = both(work, "-p", *flags, "-O", out, "p.qcow2")
    same_result(q, o)
    assert q.stdout.count(b"/100%") >= 5


def test_progress_steps_follow_block_status_runs(work: Path) -> None:
    """A data run that does not start on a 2 MiB boundary is counted in 2 MiB steps from its start, as
    qemu-img takes its chunks, although the copy itself goes by the guest's 2 MiB boundaries."""
    run(peer("qemu-img"), "create", "-q", "-f", "qcow2", work / "u.qcow2", "16M")
    run(peer("qemu-io"), "-f", "qcow2", "-c", "write 1M 5M", "-c", "write 9M 64k", work / "u.qcow2")
    q, o = both(work, "-p", "-O", "raw", "u.qcow2")
    same_result(q, o)
