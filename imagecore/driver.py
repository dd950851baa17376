"""The block-driver interface shared by the NBD server and the offline tools, and the format registry."""

from __future__ import annotations

import abc
import asyncio
import copy
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import (
    BitmapNotFoundError,
    BlockError,
    ImageFormatError,
    InvalidArgumentError,
    OperationCancelledError,
    UnsupportedError,
    UnsupportedFormatError,
)
from .extent import Extent
from .hostio import HostFile
from .qemuopts import CreateOption as CreateOption

MAX_CHAIN_DEPTH = 64


@dataclass(slots=True)
class Capabilities:
    """What a driver instance can do; the NBD transmission flags and block sizes are derived from it."""

    writable: bool
    zero: bool = True
    fast_zero: bool = False
    trim: bool = False
    flush: bool = True
    fua: bool = True
    extents: bool = True
    multi_conn: bool = True
    cache: bool = True
    min_block: int = 1
    pref_block: int = 4096
    max_block: int = 32 * 1024 * 1024


class BlockDriver(abc.ABC):
    """An open image. All coroutines run on the event-loop thread; data I/O may hop to the I/O pool."""

    format_name: ClassVar[str] = ""
    # the format was guessed from the image's first bytes, not named (qemu's bs->probed); a reopen of
    # the image passes options={"probed": True} to keep what that implies (raw's sector 0 check)
    format_probed = False
    # False for a driver whose image has no dirty flag to report (qemu's bdrv_get_info fails): info
    # then has no ``dirty-flag`` member
    reports_dirty: ClassVar[bool] = True
    # False where finding a large read's holes costs more than sending them as zeroes (a round trip of
    # its own): the server then answers such reads as one data chunk
    sparse_reads: ClassVar[bool] = True

    size: int
    caps: Capabilities
    filename: str
    backing: BlockDriver | None = None
    # the secrets an options tree gave the open (flat: ``key-secret``, ``encrypt.key-secret``): qemu then
    # names the image by a json: name holding them
    secret_options: dict[str, str] | None = None

    @abc.abstractmethod
    async def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with guest data from ``offset``; the range is already validated."""

    def readinto_nowait(self, offset: int, buf: memoryview) -> bool:
        """Try to serve a read inline, without awaiting; False means call :meth:`readinto`."""
        return False

    def host_runs_nowait(self, offset: int, length: int) -> list[tuple[int, int, int]] | None:
        """Where a range's guest data lies, when that is known without blocking and every data run is in
        the page cache: ``(length, fd, host offset)`` runs covering the range in order, fd -1 for a run
        that reads as zeroes. For replies sent from the page cache (sendfile); None means read the range
        through :meth:`readinto`. The fds are valid until the next await."""
        return None

    @abc.abstractmethod
    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None: ...

    def write_started(self, offset: int, data: memoryview) -> asyncio.Future[None] | bool:
        """Start a write (without FUA) without a coroutine: True when it is done already, a future that
        completes with it, or False, which means call :meth:`write`. Filters do not pass it on unless they
        mean to (a read-only filter must refuse the write)."""
        return False

    @abc.abstractmethod
    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool,
                           fua: bool = False) -> None:
        """Zero a range. With ``fast``, raise UnsupportedError unless zeroing is cheap (NBD FAST_ZERO)."""

    @abc.abstractmethod
    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None: ...

    @abc.abstractmethod
    async def flush(self) -> None: ...

    def may_need_flush(self) -> bool:
        """False only when nothing written through this instance can still be waiting for a flush (then a
        server closing the image skips its flush). True unless a driver knows better."""
        return True

    @abc.abstractmethod
    def extents(self, offset: int, length: int) -> AsyncIterator[Extent]:
        """Runs covering ``[offset, offset+length)`` in order, clipped to the range."""

    def extents_lookahead(self) -> bool:
        """True where asking :meth:`extents` for a longer range costs only the extents the caller takes
        (runs looked up as they are asked for): a block-status reply's final extent may then run on past
        the request, as far as the run goes, which the NBD spec allows and which saves libnbd's clients a
        request at every run boundary of their own."""
        return False

    def extents_nowait(self, offset: int, length: int) -> Iterator[Extent] | None:
        """:meth:`extents` as a plain iterator, when every run it yields can be found without awaiting
        (each found as it is asked for); None means iterate :meth:`extents`. The iterator may stop short
        of the range where the rest would need an await. For block status answered on the spot, without
        a task."""
        return None

    async def cache(self, offset: int, length: int) -> None:
        """Prefetch a range into the host cache (NBD_CMD_CACHE); a no-op by default."""
        return None

    # -- persistent dirty bitmaps (qcow2's), for NBD's qemu:dirty-bitmap:NAME contexts ----------------
    def bitmap_names(self) -> list[str]:
        """The persistent dirty bitmaps that can be read (consistent ones), in the image's order."""
        return []

    async def bitmap_runs(self, name: str, offset: int, length: int) -> AsyncIterator[tuple[int, int, bool]]:
        """``(start, end, dirty)`` runs of bitmap ``name`` over the range, in order, including the writes
        made through this instance; BitmapNotFoundError for a bitmap the image does not have."""
        raise BitmapNotFoundError(f"Dirty bitmap '{name}' not found")
        yield  # an async generator, like the drivers' own

    async def make_empty(self) -> None:
        """Drop every allocation of the image so that it reads through to its backing file, as qemu's
        bdrv_make_empty does after a commit; UnsupportedError for a format that cannot (qemu's ENOTSUP)."""
        raise UnsupportedError(f"Driver '{self.format_name}' does not support emptying")

    @abc.abstractmethod
    async def close(self) -> None: ...

    # -- description, for `info` and the admin socket -----------------------------------------------
    def chain_length(self) -> int:
        """Number of backing layers below this image."""
        n, b = 0, self.backing
        while b is not None:
            n, b = n + 1, b.backing
        return n

    def format_specific(self) -> dict[str, Any] | None:
        """qemu-img info's ``format-specific`` object, or None."""
        return None

    def snapshot_info(self) -> list[dict[str, Any]]:
        """qemu-img info's ``snapshots`` list (QAPI SnapshotInfo objects); empty without snapshots."""
        return []

    def cluster_size(self) -> int | None:
        return None

    def has_zero_init(self) -> bool:
        """True when a freshly created image of this format reads as zeroes (qemu's
        bdrv_has_zero_init); False where a copy must write its zero runs too."""
        return True

    def is_encrypted(self) -> bool:
        """True for an image whose data is encrypted (info's ``encrypted``)."""
        return False

    def is_dirty(self) -> bool:
        return False

    def backing_filename(self) -> str | None:
        """The backing file name as stored in the image, unresolved."""
        return None

    def backing_format(self) -> str | None:
        return None

    def data_host_file(self) -> HostFile | None:
        """The HostFile holding this image, for actual-size and locking."""
        return None

    def host_files(self) -> list[HostFile]:
        """Every host file holding this image's own data; their allocation is qemu-img's actual-size."""
        hf = self.data_host_file()
        return [hf] if hf is not None else []

    def data_file_name(self, offset: int) -> str:
        """The name of the file that holds this layer's data at guest ``offset`` (``Extent.offset`` is
        an offset into it): the File column of ``qemu-img map``."""
        return self.filename


# -- opening: the policy for names, backing files and locks -------------------------------------------

@dataclass(slots=True)
class OpenContext:
    """What a format's open function is given besides the HostFile."""

    opener: ImageOpener
    read_only: bool
    path: str
    chain: tuple[tuple[int, int], ...] = ()
    options: dict[str, Any] = field(default_factory=dict)


def image_open_error(exc: BlockError, path: str) -> BlockError:
    """``exc`` worded as qemu-img's img_open words a failure to open the image ``path`` it was asked for:
    ``Could not open 'PATH': `` before the block layer's error (which, for a file that cannot be opened at
    all, names the file once more: ``Could not open 'x': Could not open 'x': Permission denied``).

    Idempotent: an error already worded so for ``path`` is left as it is (the lock and driver refusals
    are worded here when they happen, since the same open serves every caller).
    """
    if exc.image_prefix != path:
        exc.message = f"Could not open '{path}': {exc.message}"
        exc.image_prefix = path
    return exc


def block_layer_error(exc: BlockError, lead: str) -> BlockError:
    """``exc``, a failure to open an image that no verb named itself (a backing file, a new backing file),
    worded ``lead`` then the block layer's own error: without img_open's ``Could not open 'PATH': ``,
    which only the image a verb names gets."""
    if exc.image_prefix is not None:
        exc.message = exc.message.removeprefix(f"Could not open '{exc.image_prefix}': ")
        exc.image_prefix = None
    exc.message = lead + exc.message
    return exc


def backing_open_error(exc: BlockError) -> BlockError:
    """``exc``, a failure to open a backing file, as qemu's bdrv_open_backing_file words it."""
    return block_layer_error(exc, "Could not open backing file: ")


class ImageOpener:
    """Resolves and opens images, their backing files and external data files.

    The CLI uses this default; the server's pools subclass it to confine every name to the pool root.
    """

    def __init__(self, *, lock: bool = False, allow_probe: bool = True, sync: bool = True,
                 force_share: bool = False, consistent_read: bool = True) -> None:
        self.lock = lock
        self.allow_probe = allow_probe
        self.sync = sync
        # -U: share every permission with others (read-only opens only, as qemu-img allows it)
        self.force_share = force_share
        # False for qemu-img info, which holds no permission on the image it describes
        self.consistent_read = consistent_read

    def sharing(self) -> ImageOpener:
        """This opener with force-share on: for reads that must not conflict with any holder.

        qemu-img create reads a backing file's size this way (``bdrv_img_create`` opens it force-share).
        """
        other = copy.copy(self)
        other.force_share = True
        return other

    def unsynced(self) -> ImageOpener:
        """This opener with syncs off: qemu's cache=unsafe (-t unsafe), where a flush never waits for the
        disk."""
        other = copy.copy(self)
        other.sync = False
        return other

    def unlocked(self) -> ImageOpener:
        """This opener taking no image locks: for an open whose caller takes the locks it needs itself
        (or, like qemu's for some operations, none)."""
        other = copy.copy(self)
        other.lock = False
        return other

    def resolve(self, name: str, relative_to: str | None) -> str:
        """Turn a name stored in an image into a host path (relative names against the image's folder)."""
        if "\0" in name:
            raise InvalidArgumentError("file name contains a NUL byte")
        from .filenames import is_nbd_name, protocol_of

        if protocol_of(name) is not None:
            # nbd://..., json:{...}: not a path, so not relative to the image (qemu's path_combine)
            return name
        if relative_to is not None and not os.path.isabs(name):
            if protocol_of(relative_to) is not None and is_nbd_name(relative_to):
                # an image in an NBD export has no folder (qemu's nbd driver has no bdrv_dirname)
                raise UnsupportedError("Cannot generate a base directory for NBD nodes")
            return os.path.join(os.path.dirname(relative_to), name)
        return name

    def open_file(self, path: str, *, read_only: bool) -> HostFile:
        from .filenames import host_file_of, is_special

        if is_special(path):
            # a verb that edits the file in place, given a json:/--image-opts name: the file it names
            # (the options are checked as an open checks them)
            inner = host_file_of(path)
            if inner is None:
                raise UnsupportedError("This operation is not supported for images that are not host files")
            path = inner
        if self.force_share and not read_only:
            raise image_open_error(
                InvalidArgumentError("force-share=on can only be used with read-only images"), path)
        hf = self.host_file(path, read_only=read_only)
        hf.sync_enabled = self.sync
        if self.lock:
            try:
                self.lock_file(hf.fd, path, write=not read_only)
            except BaseException:
                hf.close()
                raise
        return hf

    async def open_nbd_file(self, path: str, *, read_only: bool) -> HostFile:
        """The NBD export a special name reaches (an NBD URL, or a format over the nbd protocol), as the
        file a format lives in: for the verbs that work on a format's file (check, resize)."""
        return await open_nbd_file(path, read_only=read_only)

    def host_file(self, path: str, *, read_only: bool) -> HostFile:
        """The HostFile behind one open: the seam where test doubles (power loss, faults) come in."""
        return HostFile.open(path, read_only=read_only)

    def lock_file(self, fd: int, path: str, *, write: bool, prefix: str | None = None) -> None:
        """Take the lock bytes qemu-img takes for this open; errors read as qemu-img's, with its hint."""
        from .errors import ImageLockedError
        from .locking import ALL_PERMS, INFO_PERM, lock_image

        perm: int | None = None
        shared: int | None = None
        if not write and not self.consistent_read:
            perm = INFO_PERM
        if self.force_share and not write:
            shared = ALL_PERMS
        try:
            lock_image(fd, write=write, perm=perm, shared=shared)
        except ImageLockedError as exc:
            if prefix is None:
                image_open_error(exc, path)
            else:
                exc.message = prefix + exc.message
            exc.hint = f"Is another process using the image [{path}]?"
            raise

    async def open(self, path: str, fmt: str | None, *, read_only: bool,
                   chain: tuple[tuple[int, int], ...] = (), options: dict[str, Any] | None = None
                   ) -> BlockDriver:
        """Open ``path`` as ``fmt`` (probed when None and probing is allowed).

        ``path`` may be one of qemu's special names (``json:{...}``, an ``--image-opts`` string, an NBD
        URL: imagecore.filenames), which name a format over a protocol by options instead of a file.
        """
        from .filenames import options_of

        tree = options_of(path)
        if tree is not None:
            return await self.open_options(tree, fmt, read_only=read_only, chain=chain, options=options,
                                           display=path)
        if len(chain) >= MAX_CHAIN_DEPTH:
            raise ImageFormatError(f"backing chain of '{path}' is deeper than {MAX_CHAIN_DEPTH}")
        hf = self.open_file(path, read_only=read_only)
        try:
            st = os.fstat(hf.fd)
            key = (st.st_dev, st.st_ino)
            if key in chain:
                raise ImageFormatError(f"backing chain loop: '{path}' is its own backing file")
            if fmt is None and not self.allow_probe:
                raise InvalidArgumentError(f"format of '{path}' must be given")
            spec = self.image_format(hf, fmt, path, read_only=read_only)
            ctx = OpenContext(opener=self, read_only=read_only, path=path, chain=(*chain, key),
                              options=dict(options or {}))
            probed = self.probes(path, fmt) or bool(ctx.options.get("probed"))
            if probed:
                ctx.options["probed"] = True
            drv = await spec.open(hf, ctx)
            drv.format_probed = probed
            return drv
        except BaseException:
            hf.close()
            raise

    async def open_options(self, tree: dict[str, Any], fmt: str | None, *, read_only: bool,
                           chain: tuple[tuple[int, int], ...] = (), options: dict[str, Any] | None = None,
                           display: str | None = None) -> BlockDriver:
        """Open an image described by an options tree (qemu's blockdev options, nested): a format over
        the ``file`` protocol or over ``nbd``, or the ``nbd`` protocol itself. Refusals read as qemu's."""
        from .filenames import is_nbd_name, nbd_url_options

        tree = dict(tree)
        driver = tree.pop("driver", None)
        if driver in NULL_PROTOCOLS and fmt in (None, "raw", driver):
            # null-co named by its options; -f raw puts raw over it, which reads the same
            return _null_driver(dict(tree, driver=driver), read_only=read_only, raw=fmt == "raw")
        if fmt is not None:
            driver = fmt  # -f wins over the name's own driver, as in qemu-img
        child_proto = tree.get("file", {}).get("driver") if isinstance(tree.get("file"), dict) else None
        if child_proto in NULL_PROTOCOLS and driver in (None, "raw"):
            # raw over null-co is null-co itself (raw's offset and size aside)
            _check_keys({k: v for k, v in tree.items() if k not in ("offset", "size", "file")},
                        COMMON_OPTIONS, "Block format 'raw' does not support the option '{}'")
            return _null_driver(dict(tree["file"]), read_only=read_only, raw=True)
        if driver == "nbd":
            return await _open_nbd(dict(tree, driver="nbd"), read_only=read_only, format_name="nbd")
        if driver == "file":
            name = tree.pop("filename", None)
            if name is None:
                raise InvalidArgumentError("The 'file' block driver requires a file name")
            _check_keys(tree, FILE_OPTIONS, "Block protocol 'file' doesn't support the option '{}'")
            # the protocol alone: its guest bytes are the file's, as raw's are; info calls it "file"
            return await self.open(str(name), "raw", read_only=read_only, chain=chain,
                                   options=dict(options or {}, protocol_only=True))
        if driver is not None:
            get_format(str(driver))  # "Unknown driver 'foo'" before anything else, as qemu checks it
        child = tree.pop("file", None)
        if child is None and "filename" in tree:
            if driver is None:
                raise InvalidArgumentError("Must specify either driver or file")
            child = {"filename": tree.pop("filename")}
        if child is None:
            raise InvalidArgumentError('A block device must be specified for "file"')
        if not isinstance(child, dict):
            raise InvalidArgumentError(f"Cannot find device='{child}' nor node-name='{child}'")
        child = dict(child)
        proto = child.pop("driver", None)
        if proto is None and is_nbd_name(str(child.get("filename", ""))):
            child = nbd_url_options(str(child["filename"]))
            proto = child.pop("driver")
        if proto not in (None, "file", "nbd"):
            get_format(str(proto))
            raise UnsupportedError(f"imagecore cannot open images through the '{proto}' driver")
        allowed = (*COMMON_OPTIONS, *get_format(str(driver)).open_options) if driver is not None \
            else COMMON_OPTIONS
        opener: ImageOpener = self
        if "backing" in tree and (driver is None or "backing" in allowed or tree["backing"] is None):
            opener, options = self._backing_option(tree.pop("backing"), options, str(driver or "qcow2"))
        if driver is not None:
            _check_keys(tree, allowed, f"Block format '{driver}' does not support the option '{{}}'")
        if proto == "nbd":
            if driver in (None, "raw"):
                _check_keys({k: v for k, v in tree.items() if k not in ("offset", "size")}, COMMON_OPTIONS,
                            "Block format 'raw' does not support the option '{}'")
            return await _nbd_module().open_image(  # type: ignore[no-any-return]
                opener, dict(child, driver="nbd"), None if driver is None else str(driver),
                read_only=read_only, chain=chain, options=options, display=display)
        name = child.pop("filename", None)
        if name is None:
            raise InvalidArgumentError("The 'file' block driver requires a file name")
        _check_keys(child, FILE_OPTIONS, "Block protocol 'file' doesn't support the option '{}'")
        if driver is None:
            if tree:
                key = next(iter(tree))
                raise InvalidArgumentError(f"Block format 'raw' does not support the option '{key}'")
        passed = {k: tree[k] for k in PASSED_OPTIONS if k in tree}
        if passed:
            options = {**(options or {}), **passed}
        drv = await opener.open(str(name), None if driver is None else str(driver), read_only=read_only,
                                chain=chain, options=options)
        named = {k: str(v) for k, v in _flat(passed).items() if k.endswith("key-secret")}
        if named and drv.filename == str(name):
            drv.secret_options = named
        return drv

    def _backing_option(self, value: Any, options: dict[str, Any] | None, driver: str
                        ) -> tuple[ImageOpener, dict[str, Any] | None]:
        """A ``backing`` option: null opens the image without its backing file (unallocated runs read as
        zeroes, as qemu's ``"backing": null``); options open that image as the backing file instead of
        the one the image names. A verb that opens no backing file (info, qemu's BDRV_O_NO_BACKING)
        refuses options, as qemu 7.2 does."""
        no_backing_open = bool((options or {}).get("no_io"))
        if value is None:
            # info describes the image as it is stored, backing file included, whatever the option says
            return self, options if no_backing_open else dict(options or {}, no_backing=True)
        if no_backing_open:
            key = "backing" if not isinstance(value, dict) or not value else \
                "backing." + next(iter(_flat_keys(value)))
            raise InvalidArgumentError(f"Block format '{driver}' does not support the option '{key}'")
        if not isinstance(value, dict):
            raise backing_open_error(InvalidArgumentError(
                f"Cannot find device='{value}' nor node-name='{value}'"))
        tree = dict(value)
        other = copy.copy(self)

        async def open_backing(name: str, fmt: str | None, ctx: OpenContext) -> BlockDriver:
            try:
                return await self.open_options(tree, None, read_only=True, chain=ctx.chain)
            except OperationCancelledError:
                raise
            except BlockError as exc:
                raise backing_open_error(exc) from None

        setattr(other, "open_backing", open_backing)  # noqa: B010 - this copy only
        return other, options

    @staticmethod
    def probes(path: str, fmt: str | None) -> bool:
        """Whether opening ``path`` with ``fmt`` guesses the format (a special name's ``driver`` counts as
        given)."""
        from .filenames import format_of, is_special

        return fmt is None and (not is_special(path) or format_of(path) is None)

    def image_format(self, hf: HostFile, fmt: str | None, path: str, *, read_only: bool) -> FormatSpec:
        """The format to open ``hf`` as: ``fmt``, else probed; refusals read as qemu-img's open errors.
        A special name's own ``driver`` counts as given."""
        from .filenames import format_of, is_special

        if fmt is None and is_special(path):
            fmt = format_of(path)
        try:
            if fmt is None:
                fmt = probe_format(hf)
                if fmt == "raw" and not read_only:
                    self.warn(RAW_PROBE_WARNING.format(path=path))
            return get_format(fmt)
        except UnsupportedError as exc:
            image_open_error(exc, path)
            raise

    def warn(self, text: str) -> None:
        """Print a warning as qemu's block layer does (to stderr); a server may log it instead."""
        sys.stderr.write(text)

    async def open_backing(self, name: str, fmt: str | None, ctx: OpenContext) -> BlockDriver:
        """Open the backing file ``name`` of the image described by ``ctx``, always read-only.

        Every failure reads as qemu's bdrv_open_backing_file words it: ``Could not open backing file: ``
        before the backing file's own open error (``Could not open 'PATH': No such file or directory``,
        ``Image is not in qcow2 format``, ...), so that a failure deeper in the chain carries one prefix
        per level. Subclasses change how the file is opened in :meth:`open_backing_file`, not here.
        """
        from .filenames import is_nbd_name

        if is_nbd_name(ctx.path):
            self.resolve(name, ctx.path)  # a name relative to an NBD image: refused without the prefix
        try:
            return await self.open_backing_file(self.resolve(name, ctx.path), fmt, ctx)
        except OperationCancelledError:
            raise
        except BlockError as exc:
            raise backing_open_error(exc) from None

    async def open_backing_file(self, path: str, fmt: str | None, ctx: OpenContext) -> BlockDriver:
        """Open the resolved backing file ``path`` (read-only) as ``fmt``; errors as :meth:`open` raises
        them (open_backing words them)."""
        return await self.open(path, fmt, read_only=True, chain=ctx.chain)

    def open_data_file(self, name: str, ctx: OpenContext) -> HostFile:
        """Open an external data file named in an image header."""
        return self.open_file(self.resolve(name, ctx.path), read_only=ctx.read_only)


# -- options trees (json: names, --image-opts) --------------------------------------------------------

# the options every block node takes (qapi BlockdevOptionsBase), then each driver's own (7.2)
COMMON_OPTIONS = ("node-name", "discard", "cache", "read-only", "auto-read-only", "force-share",
                  "detect-zeroes")
FILE_OPTIONS = (*COMMON_OPTIONS, "filename", "aio", "aio-max-batch", "locking", "pr-manager", "drop-cache",
                "x-check-cache-dropped")
# the options of a format's node that its open reads from OpenContext.options (the secrets of encrypted
# images, vpc's size calculation), each checked against the format's own open_options first
PASSED_OPTIONS = ("key-secret", "encrypt", "force_size_calc")
# the file protocol's create options, which qemu merges after a format's own (`create -o help FILE`)
FILE_CREATE_OPTIONS: tuple[CreateOption, ...] = (
    CreateOption("nocow", "bool", "Turn off copy-on-write (valid only on btrfs)"),
    CreateOption("preallocation", "string", "Preallocation mode (allowed values: off, falloc, full)"),
    CreateOption("extent_size_hint", "size", "Extent size hint for the image file, 0 to disable"),
)


def _flat_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            keys += _flat_keys(value, f"{prefix}{key}.")
        else:
            keys.append(prefix + key)
    return keys


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _check_keys(tree: dict[str, Any], allowed: tuple[str, ...], message: str) -> None:
    for key in tree:
        if key not in allowed:
            raise InvalidArgumentError(message.format(key))


async def open_nbd_file(path: str, *, read_only: bool) -> HostFile:
    """The NBD export a special name reaches, as a file (imagecore.formats.nbd.NbdFile)."""
    from .filenames import is_nbd_name, nbd_url_options, options_of

    tree = options_of(path) or {}
    child: Any = tree if tree.get("driver") == "nbd" else tree.get("file")
    if isinstance(child, dict) and child.get("driver") is None and is_nbd_name(str(child.get("filename"))):
        child = nbd_url_options(str(child["filename"]))
    if not isinstance(child, dict) or child.get("driver") != "nbd":
        raise UnsupportedError("This operation is not supported for images that are not host files")
    hf: HostFile = await _nbd_module().open_file(dict(child), read_only=read_only)
    return hf


async def create_file(path: str) -> HostFile:
    """The file a format's create writes a new image into: the host file ``path`` (created if absent; the
    format truncates it), or the NBD export an NBD name reaches, which is written over as it is (qemu's
    create over a protocol that cannot create, once ``create`` has checked the export)."""
    from .filenames import host_file_of, is_special

    if is_special(path) and host_file_of(path) is None:
        return await open_nbd_file(path, read_only=False)
    return HostFile.open(path, read_only=False, create=True)


# qemu's null block drivers (imagecore.formats.null)
NULL_PROTOCOLS = ("null-co", "null-aio")


def _null_driver(opts: dict[str, Any], *, read_only: bool, raw: bool = False) -> BlockDriver:
    import importlib

    drv: BlockDriver = importlib.import_module("imagecore.formats.null").NullDriver(opts, read_only=read_only,
                                                                                     raw=raw)
    return drv


def _nbd_module() -> Any:
    """The nbd protocol driver (imagecore.formats.nbd), imported on first use: the driver layer names
    no format module."""
    import importlib

    return importlib.import_module("imagecore.formats.nbd")


async def _open_nbd(opts: dict[str, Any], *, read_only: bool, format_name: str) -> BlockDriver:
    drv: BlockDriver = await _nbd_module().open_nbd(opts, read_only=read_only, format_name=format_name)
    return drv


# -- the format registry ------------------------------------------------------------------------------

@dataclass(slots=True)
class CheckResult:
    """What a consistency check found, in the terms of QAPI's ImageCheck.

    ``messages`` are the human lines qemu-img prints before its summary (``Leaked cluster 5 refcount=1
    reference=0``, ``ERROR cluster 7 refcount=0 reference=1``).
    """

    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int | None = None
    total_clusters: int | None = None
    allocated_clusters: int | None = None
    fragmented_clusters: int | None = None
    compressed_clusters: int | None = None
    messages: list[str] = field(default_factory=list)


# create(path, size, options, opener=..., unsafe=...) makes a new image; options are the -o strings, already
# split; unsafe (-u) skips opening the backing file where the format allows.
CreateFn = Callable[..., Awaitable[None]]
# check(hostfile, ctx, repair) with repair None, "leaks" or "all".
CheckFn = Callable[[HostFile, OpenContext, "str | None"], Awaitable[CheckResult]]


@dataclass(frozen=True, slots=True)
class FormatSpec:
    """A format as data: what the registry, the verbs and the server need to know of it before its driver
    is loaded. A format package builds one and registers it (``register_format``) when it is imported;
    the programs import the formats they serve (``imagecore.formats.register_all``)."""

    name: str
    open: Callable[[HostFile, OpenContext], Awaitable[BlockDriver]]
    # the score qemu's probe gives the first PROBE_BYTES of a file (0: not this format, 100: certain)
    probe: Callable[[bytes, str], int] | None = None
    create: CreateFn | None = None
    # the create options in qemu's order (its "Formatting ..." line follows it; ``-o help`` sorts them),
    # each with its type and the default that line shows
    create_options: tuple[CreateOption, ...] = ()
    check: CheckFn | None = None
    # file name extensions that name this format (lower case, no dot), first the usual one: a pool's
    # import/ directory and backing files without a stored format take their format from these
    extensions: tuple[str, ...] = ()
    # the options of its node in json:{...} names and --image-opts, beyond every node's COMMON_OPTIONS
    open_options: tuple[str, ...] = ()
    # create also takes the file protocol's options (FILE_CREATE_OPTIONS) as its own: raw, which qemu
    # creates through the protocol alone
    file_create: bool = False


@dataclass(frozen=True, slots=True)
class ForeignFormat:
    """A format recognised by its probe but without a driver here: probing it, or naming it, is refused.

    As qemu does for a driver that is built but not whitelisted, so that a foreign container is never read
    as raw by accident. The table lives in ``formats/foreign.py``.
    """

    name: str
    probe: Callable[[bytes, str], int]


_formats: dict[str, FormatSpec] = {}
_foreign: dict[str, ForeignFormat] = {}

# What qemu's raw driver prints when it was probed, not named, and is opened read-write (7.2's text).
RAW_PROBE_WARNING = (
    "WARNING: Image format was not specified for '{path}' and probing guessed raw.\n"
    "         Automatically detecting the format is dangerous for raw images, write operations on block 0 "
    "will be restricted.\n"
    "         Specify the 'raw' format explicitly to remove the restrictions.\n")

# qemu's BLOCK_PROBE_BUF_SIZE: every probe sees this many bytes, zero-filled past the end of the file.
PROBE_BYTES = 2048


def lazy(module: str, name: str) -> Callable[..., Any]:
    """``module.name``, imported on the first call: a command loads only the format code it uses."""
    target: Callable[..., Any] | None = None

    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal target
        if target is None:
            import importlib

            target = getattr(importlib.import_module(module), name)
        return target(*args, **kwargs)

    call.__qualname__ = call.__name__ = name
    return call


def register_format(spec: FormatSpec) -> None:
    _formats[spec.name] = spec
    _foreign.pop(spec.name, None)


def register_foreign_format(fmt: ForeignFormat) -> None:
    if fmt.name not in _formats:
        _foreign[fmt.name] = fmt


def get_format(name: str) -> FormatSpec:
    try:
        return _formats[name]
    except KeyError:
        pass
    if name in _foreign:
        exc = UnsupportedFormatError(f"Driver '{name}' is not whitelisted")
        exc.hint = f"imagecore recognises the {name} format but cannot open it yet"
        raise exc
    raise UnsupportedError(f"Unknown driver '{name}'")


def driver_known(name: str) -> bool:
    """Whether qemu would know a block driver of this name (bdrv_find_format): a format of ours, one we
    only recognise, or a protocol."""
    return name in _formats or name in _foreign or name in ("file", "nbd", *NULL_PROTOCOLS)


def format_names() -> list[str]:
    """The registered formats, sorted. Empty until a program registers its formats: the registry never
    imports them itself (imagecore.formats.register_all)."""
    return sorted(_formats)


def format_specs() -> list[FormatSpec]:
    """The registered formats' specs, sorted by name."""
    return [_formats[n] for n in sorted(_formats)]


def format_of_extension(filename: str) -> str | None:
    """The registered format whose extensions include ``filename``'s (case-insensitive), or None. Never
    reads the file: for pools, which take a format from the name and never probe."""
    ext = os.path.splitext(filename)[1].lstrip(".").lower()
    if not ext:
        return None
    for spec in format_specs():
        if ext in spec.extensions:
            return spec.name
    return None


def probe_format(hf: HostFile) -> str:
    """Guess a format from the first bytes, as qemu-img does; only the CLI may call this.

    The answer may name a foreign format, which :func:`get_format` then refuses.
    """
    buf = bytearray(PROBE_BYTES)
    if hf.readinto_sync(0, memoryview(buf)) == 0:
        return "raw"  # qemu does not probe an empty image (so an empty ``x.dmg`` is raw)
    return probe_bytes(bytes(buf), hf.path)


def probe_bytes(head: bytes, path: str) -> str:
    """The format the first PROBE_BYTES of an image (zero-filled past its end) look like."""
    # raw's own probe scores 1, so that any positive score above it (dmg's and cloop's 2) wins.
    best, score = "raw", 1
    probes = [(spec.name, spec.probe) for spec in _formats.values() if spec.probe is not None]
    probes += [(f.name, f.probe) for f in _foreign.values()]
    for name, probe in probes:
        s = probe(head, path)
        if s > score:
            best, score = name, s
    return best
