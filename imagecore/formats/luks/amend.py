"""`amend` of a LUKS volume: its key slots made active with a new passphrase or erased, as qemu 7.2's
``qemu-img amend`` does them (crypto/block-luks.c: the options, their refusals and their messages).

The volume is unlocked with the passphrase it was opened with (``key-secret``); the master key never
changes, only the slots that hold it. Write ordering, so that a crash leaves either the old or the new
slot, never a header naming key material that is not there:

- adding: the slot's encrypted key material is written and synced, then the header that enables it;
- erasing: the header that disables the slot is written and synced first, then its key material is
  overwritten with random bytes, several times as qemu does (a crash between leaves a disabled slot whose
  old material is still on disk, never an enabled slot without its material).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from ...crypto import luks
from ...crypto.ciphers import SECTOR_SIZE
from ...crypto.secrets import password
from ...errors import ImageFormatError, InvalidArgumentError
from ...hostio import HostFile, run_blocking
from ...qemuopts import parse_options

# qemu's amend options for luks: the key slot options as they are
AMEND_OPTIONS = luks.KEYSLOT_OPTIONS

WriteFn = Callable[[int, bytes], None]

# qemu's QCRYPTO_BLOCK_LUKS_ERASE_ITERATIONS: passes of random bytes over erased key material
ERASE_PASSES = 16
DEFAULT_ITER_TIME = 2000


def parse_amend_options(pairs: Sequence[tuple[str, str | None]]) -> dict[str, Any]:
    """The ``-o`` pairs against the luks amend options; ``state`` is required and one of its two values."""
    opts = dict(parse_options(pairs, AMEND_OPTIONS))
    state = opts.get("state")
    if state is None:
        raise InvalidArgumentError("Parameter 'state' is missing")
    if state not in ("active", "inactive"):
        raise InvalidArgumentError(f"Parameter 'state' does not accept value '{state}'")
    return opts


async def amend_luks(hf: HostFile, key_secret: str | None, opts: dict[str, Any], *, force: bool,
                     sync: bool = True, area: tuple[int, int] | None = None) -> None:
    """Apply the parsed options to the volume on ``hf`` (opened read-write, its lock held). ``area``:
    where the LUKS header and key material lie, (offset, length), inside a qcow2 image; else the file's
    start, as a ``luks`` image has them."""
    await run_blocking(_amend_sync, hf, key_secret, opts, force, sync, area)


def _amend_sync(hf: HostFile, key_secret: str | None, opts: dict[str, Any], force: bool, sync: bool,
                area: tuple[int, int] | None) -> None:
    base, limit = area if area is not None else (0, None)

    def inside(at: int, n: int) -> int:
        if limit is not None and at + n > limit:
            raise ImageFormatError("Request for data outside of extension header")
        return base + at

    def read(at: int, n: int) -> bytes:
        buf = bytearray(n)
        got = hf.readinto_sync(inside(at, n), memoryview(buf))
        return bytes(buf[:got])

    def write(at: int, data: bytes) -> None:
        hf.pwrite_sync(inside(at, len(data)), data)

    header, spec, hash_alg = luks.read_header(read(0, luks.HEADER_SIZE))

    def store_header() -> None:
        write(0, header.pack())
        if sync:
            os.fdatasync(hf.fd)

    if opts["state"] == "active":
        _add_slot(hf, header, spec, hash_alg, key_secret, opts, force, read, write, store_header, sync)
    else:
        _erase_slots(hf, header, spec, hash_alg, opts, force, read, write, store_header, sync)


def _slot_index(value: int) -> int:
    if not 0 <= value < luks.NUM_SLOTS:
        raise InvalidArgumentError(f"Invalid keyslot {value} specified, must be between 0 and "
                                   f"{luks.NUM_SLOTS - 1}")
    return value


def _add_slot(hf: HostFile, header: luks.LuksHeader, spec: Any, hash_alg: str, key_secret: str | None,
              opts: dict[str, Any], force: bool, read: luks.ReadFn, write: WriteFn, store_header: Any,
              sync: bool) -> None:
    if opts.get("new-secret") is None:
        raise InvalidArgumentError("'new-secret' is required to activate a keyslot")
    if opts.get("old-secret") is not None:
        raise InvalidArgumentError("'old-secret' must not be given when activating keyslots")
    if opts.get("keyslot") is not None:
        index = _slot_index(int(opts["keyslot"]))
    else:
        free = [i for i, s in enumerate(header.slots) if s.active != luks.SLOT_ENABLED]
        if not free:
            raise InvalidArgumentError("Can't add a keyslot - all keyslots are in use")
        index = free[0]
    if not force and header.slots[index].active == luks.SLOT_ENABLED:
        raise InvalidArgumentError(f"Refusing to overwrite active keyslot {index} - please erase it first")
    master = luks.unlock(header, spec, hash_alg, password(key_secret, ""), read)
    new = password(str(opts["new-secret"]), "")
    iter_time = int(opts.get("iter-time", DEFAULT_ITER_TIME))
    material = luks.new_slot(header, spec, hash_alg, index, new, master, iter_time)
    write(header.slots[index].key_material_offset * SECTOR_SIZE, material)
    if sync:
        os.fdatasync(hf.fd)
    store_header()


def _erase_slots(hf: HostFile, header: luks.LuksHeader, spec: Any, hash_alg: str, opts: dict[str, Any],
                 force: bool, read: luks.ReadFn, write: WriteFn, store_header: Any, sync: bool) -> None:
    if opts.get("new-secret") is not None:
        raise InvalidArgumentError("'new-secret' must not be given when erasing keyslots")
    if opts.get("iter-time") is not None:
        raise InvalidArgumentError("'iter-time' must not be given when erasing keyslots")
    old = password(str(opts["old-secret"]), "") if opts.get("old-secret") is not None else None
    active = sum(s.active == luks.SLOT_ENABLED for s in header.slots)
    if opts.get("keyslot") is not None:
        index = _slot_index(int(opts["keyslot"]))
        if old is not None and luks.slot_key_of(header, spec, hash_alg, old, read, index) is None:
            raise InvalidArgumentError(f"Given keyslot {index} doesn't contain the given old password for "
                                       "erase operation")
        if not force and header.slots[index].active != luks.SLOT_ENABLED:
            raise InvalidArgumentError(f"Given keyslot {index} is already erased (inactive) ")
        if not force and active == 1:
            raise InvalidArgumentError(f"Attempt to erase the only active keyslot {index} which will erase "
                                       "all the data in the image irreversibly - refusing operation")
        chosen = [index]
    elif old is not None:
        chosen = [i for i in range(luks.NUM_SLOTS)
                  if luks.slot_key_of(header, spec, hash_alg, old, read, i) is not None]
        if not chosen:
            raise InvalidArgumentError("No keyslots match given (old) password for erase operation")
        if not force and len(chosen) == active:
            raise InvalidArgumentError("All the active keyslots match the (old) password that was given and "
                                       "erasing them will erase all the data in the image irreversibly - "
                                       "refusing operation")
    else:
        raise InvalidArgumentError("To erase keyslot(s), either explicit keyslot index or the password "
                                   "currently contained in them must be given")
    for index in chosen:
        at, length = luks.erase_slot(header, index)
        store_header()
        for _ in range(ERASE_PASSES):
            write(at, os.urandom(length))
        if sync:
            os.fdatasync(hf.fd)
