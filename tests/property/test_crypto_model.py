"""Randomised differential test: concurrent unaligned writes, zeroes, trims and flushes on encrypted images
(luks, qcow2 with LUKS) against a bytearray model, then qemu-img compare with the model and, for qcow2,
qemu-img check clean."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagecore.driver import ImageOpener
from imagecore.filenames import OBJECTS, add_object
from tests.peers import imagecore_cmd, in_ci, peer, run
from tests.property.model import Op, draw_batches, run_batches

SIZE = 256 * 1024
SECRET = "secret,id=model0,data=model passphrase"

_TEMPLATES: dict[str, Path] = {}
_TMP = tempfile.TemporaryDirectory()


def template(fmt: str) -> Path:
    """One image of each kind, made once by imagecore (PBKDF2 timing is the slow part), copied per case."""
    if fmt not in _TEMPLATES:
        path = Path(_TMP.name) / f"t.{fmt}"
        key = "key-secret" if fmt == "luks" else "encrypt.format=luks,encrypt.key-secret"
        o = f"{key}=model0,{'' if fmt == 'luks' else 'encrypt.'}iter-time=1"
        if fmt == "qcow2":
            o += ",cluster_size=4096"
        run(*imagecore_cmd(), "create", "-q", "--object", SECRET, "-f", fmt, "-o", o, path, str(SIZE))
        _TEMPLATES[fmt] = path
    return _TEMPLATES[fmt]


def anywhere(draw: st.DrawFn) -> tuple[int, int]:
    off = draw(st.integers(0, SIZE - 1))
    return off, draw(st.integers(1, min(20000, SIZE - off)))


def whole_sectors(off: int, n: int) -> tuple[int, int]:
    # writes and zeroes serialise per sector, but two of them must not share a sector for the model not
    # to depend on their order
    return off & ~511, (off + n + 511) & ~511


@st.composite
def batches(draw: st.DrawFn) -> list[list[Op]]:
    return draw_batches(draw, anywhere, per_batch=4, span=whole_sectors)


async def scenario(tmp: Path, fmt: str, plan: list[list[Op]]) -> None:
    if "model0" not in OBJECTS.secrets:
        add_object(SECRET)
    img = tmp / f"m.{fmt}"
    shutil.copyfile(template(fmt), img)
    options = {"key-secret": "model0"} if fmt == "luks" else {"encrypt": {"key-secret": "model0"}}
    d = await ImageOpener().open(str(img), fmt, read_only=False, options=options)
    try:
        model = bytearray(SIZE)
        await d.readinto(0, memoryview(model))  # a fresh luks payload reads as decrypted zero bytes
        def discarded(op: Op) -> None:
            # qcow2 discards whole clusters (they then read as zeroes); luks ignores discards
            kind, off, n, _arg = op
            a, b = -(-off // 4096) * 4096, (off + n) // 4096 * 4096
            if kind == "t" and fmt == "qcow2" and b > a:
                model[a:b] = bytes(b - a)

        await run_batches(d, model, plan, discarded)
    finally:
        await d.close()
    raw = tmp / "model.raw"
    raw.write_bytes(model)
    driver = "luks,key-secret=model0" if fmt == "luks" else "qcow2,encrypt.key-secret=model0"
    image = ["--object", SECRET, "--image-opts", f"driver={driver},file.filename={img}"]
    proc = run(peer("qemu-img"), "compare", *image, f"driver=raw,file.filename={raw}", check=False)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    if fmt == "qcow2":
        proc = run(peer("qemu-img"), "check", "--output=json", *image, check=False)
        assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
        rep = json.loads(proc.stdout)
        assert rep.get("corruptions", 0) == 0 and rep.get("leaks", 0) == 0


@settings(max_examples=12, deadline=None, derandomize=in_ci(), database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.sampled_from(["luks", "qcow2"]), batches())
def test_encrypted_images_match_model(fmt: str, plan: list[list[Op]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp), fmt, plan))
