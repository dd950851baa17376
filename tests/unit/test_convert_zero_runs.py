"""convert's zero detection (``_zero_runs``) against the plain definition: every ``sparse``-byte block of
the range, zero or not, merged into runs. The fast version tests blocks in batches; this keeps it equal."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from imagecore.ops.convert import _zero_runs


def _reference(buf: bytearray, start: int, length: int, sparse: int) -> list[tuple[int, int, bool]]:
    runs: list[tuple[int, int, bool]] = []
    for pos in range(start, length, sparse):
        end = min(pos + sparse, length)
        zero = not any(buf[pos:end])
        if runs and runs[-1][2] == zero:
            runs[-1] = (runs[-1][0], end, zero)
        else:
            runs.append((pos, end, zero))
    return runs


# a buffer as pieces: zeroes, a non-zero byte at a chosen place, or data that starts with a zero byte
_piece = st.one_of(
    st.integers(1, 3000).map(lambda n: bytes(n)),
    st.binary(min_size=1, max_size=600),
    st.tuples(st.integers(0, 700), st.integers(1, 255)).map(lambda t: bytes(t[0]) + bytes([t[1]])),
)


@settings(max_examples=400, deadline=None)
@given(pieces=st.lists(_piece, max_size=12), sparse=st.sampled_from([1, 2, 7, 512, 1024, 4096]),
       data=st.data())
def test_zero_runs_match_the_block_by_block_definition(pieces: list[bytes], sparse: int,
                                                      data: st.DataObject) -> None:
    buf = bytearray(b"".join(pieces)) + bytearray(1)
    start = data.draw(st.integers(0, len(buf) - 1))
    length = data.draw(st.integers(start + 1, len(buf)))
    assert _zero_runs(buf, start, length, sparse) == _reference(buf, start, length, sparse)


def test_a_mixed_chunk_costs_few_runs() -> None:
    buf = bytearray(2 << 20)
    buf[:1 << 20] = bytes(range(1, 256)) * ((1 << 20) // 255) + b"\x01" * ((1 << 20) % 255)
    buf[(1 << 20) + 8192] = 7
    assert _zero_runs(buf, 0, len(buf), 4096) == [
        (0, (1 << 20), False), ((1 << 20), (1 << 20) + 8192, True),
        ((1 << 20) + 8192, (1 << 20) + 12288, False), ((1 << 20) + 12288, 2 << 20, True)]


def test_a_run_of_zero_first_bytes_with_data_past_its_first_page() -> None:
    # every block starts with a zero byte, so the whole range is one candidate run; the data lies in later
    # pages, where only the page-shifted comparison sees it
    buf = bytearray(64 << 10)
    buf[5 * 4096 + 9] = 1
    buf[len(buf) - 1] = 2
    assert _zero_runs(buf, 0, len(buf), 4096) == _reference(buf, 0, len(buf), 4096) == [
        (0, 5 * 4096, True), (5 * 4096, 6 * 4096, False), (6 * 4096, 15 * 4096, True),
        (15 * 4096, 16 * 4096, False)]
    assert _zero_runs(buf, 0, len(buf), 1 << 20) == [(0, len(buf), False)]
