"""Power loss while `amend` changes a LUKS volume's key slots: a cut at any sync boundary, with any subset of
the writes since the last sync kept, leaves a volume that a passphrase which worked before and still should
unlocks, to the same master key. Adding a slot never loses the old one; erasing a slot never loses the slot
that stays. The volume is imagecore's own LUKS1 (as qemu-img reads it, see test_cli_luks.py); the cuts come
from the power-loss double (tests/doubles/powerloss.py)."""

from __future__ import annotations

from pathlib import Path

from imagecore.crypto import luks
from imagecore.filenames import OBJECTS, ImageOptsName, add_object
from imagecore.ops.amend import amend
from imagecore.ops.create import create
from tests.doubles.powerloss import CutPoint, PowerLossOpener, PowerLossPlan, keep_sets


def _secrets() -> None:
    for ident, data in (("pl0", "first passphrase"), ("pl1", "second passphrase")):
        if ident not in OBJECTS.secrets:
            add_object(f"secret,id={ident},data={data}")


PASSPHRASES = (b"first passphrase", b"second passphrase")


def _slot_keys(image: bytes, secret: bytes) -> dict[int, bytes]:
    """The master key each slot gives for ``secret`` (slots it does not open left out)."""
    header, spec, hash_alg = luks.read_header(image[:luks.HEADER_SIZE])

    def read(at: int, n: int) -> bytes:
        return image[at:at + n]

    keys = {}
    for index in range(luks.NUM_SLOTS):
        key = luks.slot_key_of(header, spec, hash_alg, secret, read, index)
        if key is not None:
            keys[index] = key
    return keys


def _master(image: bytes, secret: bytes) -> bytes | None:
    return next(iter(_slot_keys(image, secret).values()), None)


class _Checker:
    """At each cut, in every kept subset of the writes since the last sync: ``must`` still unlocks the
    volume to the original master key, and every enabled slot opens with one of the passphrases (a slot is
    never enabled before its key material is in, nor left enabled over erased material)."""

    def __init__(self, must: bytes, master: bytes) -> None:
        self.must, self.master = must, master
        self.cuts = self.states = 0
        self.bad: list[str] = []

    def __call__(self, point: CutPoint) -> None:
        self.cuts += 1
        for keep in keep_sets(len(point.pending), exhaustive=16, samples=4):
            self.states += 1
            image = point.materialise(keep)
            if _master(image, self.must) != self.master:
                self.bad.append(f"{point.label}: kept {keep}: the passphrase that must stay is lost")
            header, _spec, _hash = luks.read_header(image[:luks.HEADER_SIZE])
            opened: dict[int, bytes] = {}
            for secret in PASSPHRASES:
                opened.update(_slot_keys(image, secret))
            for index, slot in enumerate(header.slots):
                if slot.active == luks.SLOT_ENABLED and opened.get(index) != self.master:
                    self.bad.append(f"{point.label}: kept {keep}: slot {index} enabled, opens nothing")


async def _volume(work: Path) -> tuple[Path, bytes]:
    _secrets()
    img = work / "v.luks"
    await create(str(img), "luks", 1 << 20, {"key-secret": "pl0", "iter-time": "10"})
    master = _master(img.read_bytes(), b"first passphrase")
    assert master is not None
    return img, master


def _name(img: Path, secret: str) -> ImageOptsName:
    return ImageOptsName(f"driver=luks,file.filename={img},key-secret={secret}")


async def _amend_under_cuts(img: Path, secret: str, options: str, must: bytes, master: bytes) -> _Checker:
    """Amend through a power-loss opener; every sync boundary, and the end, checked for ``must``."""
    check = _Checker(must, master)
    plan = PowerLossPlan(check)
    await amend(_name(img, secret), None, options, opener=PowerLossOpener(plan, lock=True))
    plan.cut(str(img), "after the amend")
    return check


async def test_adding_a_slot_never_loses_the_old_one(work: Path) -> None:
    img, master = await _volume(work)
    check = await _amend_under_cuts(img, "pl0", "state=active,new-secret=pl1,keyslot=3,iter-time=10",
                                    b"first passphrase", master)
    assert check.cuts >= 3 and not check.bad, check.bad[:5]
    assert _master(img.read_bytes(), b"second passphrase") == master


async def test_erasing_a_slot_never_loses_the_one_that_stays(work: Path) -> None:
    img, master = await _volume(work)
    await amend(_name(img, "pl0"), None, "state=active,new-secret=pl1,iter-time=10")
    check = await _amend_under_cuts(img, "pl1", "state=inactive,old-secret=pl0", b"second passphrase",
                                    master)
    assert check.cuts >= 2 and not check.bad, check.bad[:5]
    assert _master(img.read_bytes(), b"first passphrase") is None
