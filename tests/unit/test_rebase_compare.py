"""rebase's comparison of the old and new backing data: the fast paths (whole blocks compared in place,
sector heads picked out by struct, zero sectors found with find) give exactly the runs that a comparison
of every 512-byte sector gives, which is what decides the clusters a rebase writes."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagecore.ops.rebase import SECTOR, _differing


def reference(a: bytes, b: bytes | None, chunk: int) -> list[tuple[int, int]]:
    """qemu's compare_buffers, one piece at a time, merged into runs."""
    other = bytes(len(a)) if b is None else b
    out: list[tuple[int, int]] = []
    for s in range(0, len(a), chunk):
        e = min(s + chunk, len(a))
        if a[s:e] != other[s:e]:
            if out and out[-1][0] + out[-1][1] == s:
                out[-1] = (out[-1][0], e - out[-1][0])
            else:
                out.append((s, e - s))
    return out


@st.composite
def pieces(draw: st.DrawFn) -> tuple[bytearray, bytearray | None]:
    """Two buffers of up to 200 KiB (several 64 KiB blocks), mostly alike, with sectors that differ only
    past their first 8 bytes, zero sectors (aligned or not) and edits across sector edges."""
    n = draw(st.one_of(st.integers(0, 400).map(lambda k: k * SECTOR), st.integers(0, 200 << 10)))
    fill = draw(st.sampled_from([0, 0x11]))
    a = bytearray([fill]) * n
    b = bytearray(a)
    for _ in range(draw(st.integers(0, 12))):
        if not n:
            break
        start = draw(st.integers(0, n - 1))
        length = draw(st.integers(1, min(n - start, 3 * SECTOR)))
        value = draw(st.integers(0, 255))
        target = draw(st.sampled_from(["a", "b", "both"]))
        for buf, name in ((a, "a"), (b, "b")):
            if target in (name, "both"):
                buf[start:start + length] = bytes([value]) * length
    for _ in range(draw(st.integers(0, 3))):
        # a whole block of a different byte, the case the head comparison settles at once
        if n >= SECTOR:
            start = draw(st.integers(0, n - SECTOR))
            a[start:start + SECTOR * 4] = b"\x22" * len(a[start:start + SECTOR * 4])
    return a, (None if draw(st.booleans()) else b)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pieces(), st.sampled_from([SECTOR, SECTOR, 4096]))
def test_differing_runs_are_a_sector_by_sector_comparison(piece: tuple[bytearray, bytearray | None],
                                                          chunk: int) -> None:
    a, b = piece
    assert _differing(a, b, chunk) == reference(bytes(a), None if b is None else bytes(b), chunk)


def test_differing_examples() -> None:
    block = 64 << 10
    a = bytearray(b"\x11") * (3 * block)
    b = bytearray(a)
    assert _differing(a, b, SECTOR) == []
    b[block + 600] = 0  # a sector whose first 8 bytes are equal: found by the whole comparison
    assert _differing(a, b, SECTOR) == [(block + SECTOR, SECTOR)]
    b[:] = b"\x22" * len(b)
    b[5 * SECTOR:6 * SECTOR] = a[5 * SECTOR:6 * SECTOR]  # one equal sector inside a differing block
    assert _differing(a, b, SECTOR) == [(0, 5 * SECTOR), (6 * SECTOR, len(a) - 6 * SECTOR)]
    z = bytearray(a)
    z[1000:3000] = bytes(2000)  # zeroes covering the aligned sectors 1024..2560 and parts of two more
    assert _differing(z, None, SECTOR) == [(0, 1024), (2560, len(z) - 2560)]
    assert _differing(bytearray(len(a)), None, SECTOR) == []
    assert _differing(a, None, SECTOR) == [(0, len(a))]
