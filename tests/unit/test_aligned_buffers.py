"""Buffers that bulk data is copied through start on a page boundary (imagecore.hostio.aligned_buffer):
the kernel's copies into and out of a buffer 16 bytes past a page, where glibc puts a bytearray's bytes,
run at about half speed. The NBD server receives WRITE payloads into such buffers."""

from __future__ import annotations

import ctypes

import pytest

from imagecore.hostio import aligned_buffer, aligned_bytearray
from nbdsrv.exports import ExportRegistry
from nbdsrv.pools import PoolSet
from nbdsrv.server import NBDServer

PAGE = 4096


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


@pytest.mark.parametrize("size", [1, 511, PAGE, PAGE + 1, 1 << 20, (2 << 20) + 123])
def test_unzeroed_buffer_is_page_aligned_and_writable(size: int) -> None:
    for buf in [aligned_buffer(size, zeroed=False) for _ in range(4)]:
        assert _address(buf) % PAGE == 0 and len(buf) == size
        buf[:] = b"\x5a" * size
        assert bytes(buf) == b"\x5a" * size


@pytest.mark.parametrize("size", [1, 511, PAGE, 65536, 1 << 20, (2 << 20) + 123])
def test_aligned_buffer_is_page_aligned_zeroed_and_writable(size: int) -> None:
    bufs = [aligned_buffer(size) for _ in range(4)]  # several, so that the heap's placement varies
    for buf in bufs:
        assert _address(buf) % PAGE == 0
        assert len(buf) == size and buf.nbytes == size
        assert not any(buf)
        buf[-1] = 0xA5
        assert buf[-1] == 0xA5


@pytest.mark.parametrize("size", [PAGE + 1, 1 << 20, (2 << 20) + 123])
def test_a_buffer_larger_than_a_page_is_a_whole_aligned_bytearray(size: int) -> None:
    """Code that takes the whole object under a view (librbd's binding takes a bytearray, and copies a
    view into bytes first) gets the aligned bytes too."""
    buf = aligned_buffer(size)
    assert isinstance(buf.obj, bytearray) and len(buf.obj) == size == buf.nbytes
    raw = aligned_bytearray(size)
    assert len(raw) == size
    assert _address(memoryview(raw)) % PAGE == 0


def test_aligned_bytearray_keeps_its_bytearray_methods() -> None:
    raw = aligned_bytearray(1 << 20)
    view = memoryview(raw)
    assert _address(view) % PAGE == 0
    view[0] = 7
    assert raw[0] == 7 and raw.startswith(b"\x07")


def test_plain_bytearray_is_not_page_aligned_which_is_why_the_helper_exists() -> None:
    # The premise: without the helper a large bytearray does not start on a page boundary.
    offsets = {_address(memoryview(bytearray(1 << 20))) % PAGE for _ in range(4)}
    assert offsets != {0}


def test_server_receives_write_payloads_into_aligned_buffers() -> None:
    server = NBDServer(ExportRegistry(PoolSet([])))
    payload = server.proto_config.payload_buffer(1 << 20)
    assert len(payload) == 1 << 20 and _address(payload) % PAGE == 0
