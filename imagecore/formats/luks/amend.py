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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ...crypto import luks
from ...crypto.ciphers import SECTOR_SIZE, CipherSpec
from ...crypto.secrets import password
from ...errors import ImageFormatError, InvalidArgumentError
from ...hostio import HostFile, run_blocking
from ...qemuopts import parse_options

# qemu's amend options for luks: the key slot options as they are
AMEND_OPTIONS = luks.KEYSLOT_OPTIONS

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
                     area: tuple[int, int] | None = None) -> None:
    """Apply the parsed options to the volume on ``hf`` (opened read-write, its lock held; its syncs as
    the cache mode says). ``area``: where the LUKS header and key material lie, (offset, length), inside
    a qcow2 image; else the file's start, as a ``luks`` image has them. The key derivations run on a
    worker thread; the writes and syncs are the HostFile's."""
    base, limit = area if area is not None else (0, None)
    vol = _Volume(hf, base, limit)
    vol.header, vol.spec, vol.hash_alg = luks.read_header(vol.read(0, luks.HEADER_SIZE))
    if opts["state"] == "active":
        await _add_slot(vol, key_secret, opts, force)
    else:
        await _erase_slots(vol, opts, force)


@dataclass(slots=True)
class _Volume:
    """The LUKS header being amended and the file access inside its area."""

    hf: HostFile
    base: int
    limit: int | None
    header: luks.LuksHeader = field(init=False)
    spec: CipherSpec = field(init=False)
    hash_alg: str = field(init=False)

    def _at(self, at: int, n: int) -> int:
        if self.limit is not None and at + n > self.limit:
            raise ImageFormatError("Request for data outside of extension header")
        return self.base + at

    def read(self, at: int, n: int) -> bytes:
        """Blocking (the key derivations call it on a worker thread; the header's read is 592 bytes)."""
        buf = bytearray(n)
        got = self.hf.readinto_sync(self._at(at, n), memoryview(buf))
        return bytes(buf[:got])

    async def write(self, at: int, data: bytes) -> None:
        await self.hf.pwrite(self._at(at, len(data)), data)

    async def store_header(self) -> None:
        await self.write(0, self.header.pack())
        await self.hf.fdatasync()


def _slot_index(value: int) -> int:
    if not 0 <= value < luks.NUM_SLOTS:
        raise InvalidArgumentError(f"Invalid keyslot {value} specified, must be between 0 and "
                                   f"{luks.NUM_SLOTS - 1}")
    return value


async def _add_slot(vol: _Volume, key_secret: str | None, opts: dict[str, Any], force: bool) -> None:
    header = vol.header
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
    master = await run_blocking(luks.unlock, header, vol.spec, vol.hash_alg, password(key_secret, ""),
                                vol.read)
    new = password(str(opts["new-secret"]), "")
    iter_time = int(opts.get("iter-time", DEFAULT_ITER_TIME))
    material = await run_blocking(luks.new_slot, header, vol.spec, vol.hash_alg, index, new, master,
                                  iter_time)
    await vol.write(header.slots[index].key_material_offset * SECTOR_SIZE, material)
    await vol.hf.fdatasync()
    await vol.store_header()


async def _erase_slots(vol: _Volume, opts: dict[str, Any], force: bool) -> None:
    header = vol.header

    async def opens(index: int, secret: bytes) -> bool:
        key = await run_blocking(luks.slot_key_of, header, vol.spec, vol.hash_alg, secret, vol.read, index)
        return key is not None

    if opts.get("new-secret") is not None:
        raise InvalidArgumentError("'new-secret' must not be given when erasing keyslots")
    if opts.get("iter-time") is not None:
        raise InvalidArgumentError("'iter-time' must not be given when erasing keyslots")
    old = password(str(opts["old-secret"]), "") if opts.get("old-secret") is not None else None
    active = sum(s.active == luks.SLOT_ENABLED for s in header.slots)
    if opts.get("keyslot") is not None:
        index = _slot_index(int(opts["keyslot"]))
        if old is not None and not await opens(index, old):
            raise InvalidArgumentError(f"Given keyslot {index} doesn't contain the given old password for "
                                       "erase operation")
        if not force and header.slots[index].active != luks.SLOT_ENABLED:
            raise InvalidArgumentError(f"Given keyslot {index} is already erased (inactive) ")
        if not force and active == 1:
            raise InvalidArgumentError(f"Attempt to erase the only active keyslot {index} which will erase "
                                       "all the data in the image irreversibly - refusing operation")
        chosen = [index]
    elif old is not None:
        chosen = [i for i in range(luks.NUM_SLOTS) if await opens(i, old)]
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
        await vol.store_header()
        for _ in range(ERASE_PASSES):
            await vol.write(at, os.urandom(length))
        await vol.hf.fdatasync()
