"""`create`: make a new image of a registered format; the result carries qemu-img's "Formatting ..." line."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass

from ..driver import CreateOption, ImageOpener, block_layer_error, format_names, get_format
from ..errors import BlockError, InvalidArgumentError, OperationCancelledError, UnsupportedError
from ..filenames import host_file_of, is_special
from ..formats.raw import PROTOCOL_OPTIONS
from ..units import parse_option_size
from .common import ProgressFn, check_cancelled, escape_option, option_line, parse_size, report


def all_options(fmt: str) -> list[CreateOption]:
    """The format's options followed by the file protocol's, as qemu merges them (the format wins)."""
    own = list(get_format(fmt).create_options)
    names = {o.name for o in own}
    return own + [o for o in PROTOCOL_OPTIONS if o.name not in names]


def help_text(fmt: str, filename: str | None) -> str:
    """What ``create -f FMT -o help [FILE]`` prints."""
    if filename is None:
        lines = [f"Supported {fmt} options:"]
        lines += [option_line(o) for o in sorted(get_format(fmt).create_options, key=lambda o: o.name)]
        lines += ["", "The protocol level may support further options.",
                  "Specify the target filename to include those options."]
    else:
        lines = ["Supported options:"]
        lines += [option_line(o) for o in sorted(all_options(fmt), key=lambda o: o.name)]
    return "\n".join(lines) + "\n"


# qemu 7.2's format drivers that cannot create images (qemu-img names them, not "Unknown file format")
QEMU_NO_CREATE = frozenset({"cloop", "dmg", "bochs", "vvfat", "blkdebug", "blkverify", "blklogwrites",
                            "null-co", "null-aio", "throttle", "compress", "copy-on-read", "preallocate",
                            "quorum", "replication", "raw-format", "snapshot-access", "ftp", "ftps", "http",
                            "https"})

# the drivers built into Debian's qemu 7.2 (qemu-img --help lists these and the modules), which qemu's
# bdrv_find_format finds by name: a backing format qemu-img accepts even where it never opens it
QEMU_DRIVERS = frozenset({"blkdebug", "blklogwrites", "blkverify", "bochs", "cloop", "compress",
                          "copy-before-write", "copy-on-read", "dmg", "file", "host_cdrom", "host_device",
                          "luks", "nbd", "null-aio", "null-co", "nvme", "parallels", "preallocate", "qcow",
                          "qcow2", "qed", "quorum", "raw", "replication", "snapshot-access", "throttle",
                          "vdi", "vhdx", "vmdk", "vpc", "vvfat"})


def check_format(fmt: str) -> None:
    if fmt in QEMU_NO_CREATE:
        raise UnsupportedError(f"Format driver '{fmt}' does not support image creation")
    if fmt not in format_names() or get_format(fmt).create is None:
        raise UnsupportedError(f"Unknown file format '{fmt}'")


# The order and defaults of qemu's create option lists, which its "Formatting ..." line follows; options a
# format declares beyond these are appended with their own defaults.
_CRYPTO = ("encrypt.format", "encrypt.key-secret", "encrypt.cipher-alg", "encrypt.cipher-mode",
           "encrypt.ivgen-alg", "encrypt.ivgen-hash-alg", "encrypt.hash-alg", "encrypt.iter-time")
QEMU_ORDER: dict[str, tuple[tuple[str, str | None], ...]] = {
    "qcow2": (("encryption", None), *((n, None) for n in _CRYPTO), ("cluster_size", "65536"),
              ("extended_l2", "off"), ("preallocation", None), ("compression_type", "zlib"), ("size", None),
              ("compat", None), ("backing_file", None), ("backing_fmt", None), ("data_file", None),
              ("data_file_raw", None), ("lazy_refcounts", "off"), ("refcount_bits", "16")),
    "parallels": (("size", None), ("cluster_size", "1048576")),
    "raw": (("size", None),),
    "vdi": (("size", None), ("static", "off")),
    "vpc": (("size", None), ("subformat", None), ("force_size", None)),
    "vmdk": (("size", None), ("adapter_type", None), ("backing_file", None), ("backing_fmt", None),
             ("compat6", "off"), ("hwversion", "undefined"), ("toolsversion", None), ("subformat", None),
             ("zeroed_grain", None)),
}
PROTOCOL_ORDER: tuple[tuple[str, str | None], ...] = (
    ("nocow", None), ("preallocation", None), ("extent_size_hint", None))


def formatting_line(path: str, fmt: str, size: int, options: dict[str, str]) -> str:
    types = {o.name: o for o in all_options(fmt)}
    order = list(QEMU_ORDER.get(fmt, ()))
    names = {n for n, _ in order}
    order += [(o.name, o.default) for o in get_format(fmt).create_options if o.name not in names]
    names = {n for n, _ in order}
    order += [(n, d) for n, d in PROTOCOL_ORDER if n not in names]
    parts = [f"Formatting '{path}', fmt={fmt}"]
    for name, default in order:
        if name == "size":
            parts.append(f"size={size}")
            continue
        value = options.get(name, default)
        if value is None:
            continue
        opt = types.get(name)
        kind = opt.type if opt is not None else "string"
        if kind in ("size", "number") and name in options:
            value = str(parse_size(value))
        elif kind == "string":
            value = escape_option(value)
        parts.append(f"{name}={value}")
    return " ".join(parts)


async def create_image(path: str, fmt: str, size: int, options: dict[str, str], *,
                       opener: ImageOpener, unsafe: bool = False) -> None:
    """Call the format's create; file-protocol options the format does not declare are not its business."""
    spec = get_format(fmt)
    assert spec.create is not None
    if is_special(path) and host_file_of(path) is None:
        await _create_over_nbd(path, fmt, size, opener)
        return
    own = {o.name for o in spec.create_options}
    if fmt != "raw":
        options = {k: v for k, v in options.items()
                   if k in own or k not in {o.name for o in PROTOCOL_OPTIONS}}
    # qemu-img create takes the write lock on an existing file before truncating it; holding a locked fd
    # for the whole create keeps anyone else out while the format writes through its own fds.
    held = _lock_existing(path, opener)
    try:
        await spec.create(path, size, options, opener=opener, unsafe=unsafe)
    finally:
        if held is not None:
            os.close(held)


async def _create_over_nbd(path: str, fmt: str, size: int, opener: ImageOpener) -> None:
    """``create`` onto an NBD export, as qemu's bdrv_co_create_opts_simple does for a protocol that cannot
    create: open the export, refuse to grow it, zero its first sector."""
    try:
        drv = await opener.open(path, "raw", read_only=False)
    except BlockError as exc:
        exc.message = ("Protocol driver 'nbd' does not support image creation, and opening the image "
                       f"failed: {exc.message}")
        exc.image_prefix = None
        raise
    try:
        if drv.size < size:
            raise InvalidArgumentError("Cannot grow NBD nodes")
        if fmt != "raw":
            raise UnsupportedError(f"imagecore cannot create {fmt} images over NBD yet")
        head = min(drv.size, 512)
        if head:
            await drv.write_zeroes(0, head, may_trim=True, fast=False)
    finally:
        await drv.close()


def _lock_existing(path: str, opener: ImageOpener) -> int | None:
    if not opener.lock:
        return None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None  # absent (the format creates it) or unopenable (the format reports why)
    try:
        opener.lock_file(fd, path, write=True, prefix="")
    except BaseException:
        os.close(fd)
        raise
    return fd


def same_file(a: str, b: str) -> bool:
    """True when two names reach the same inode (hard links and symlinks included)."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def validate_options(fmt: str, options: dict[str, str]) -> None:
    known = {o.name: o for o in all_options(fmt)}
    for key, value in options.items():
        opt = known.get(key)
        if opt is None:
            raise InvalidArgumentError(f"Invalid parameter '{key}'")
        if opt.type == "size":
            parse_option_size(key, value)
        elif opt.type == "number" and not value.isdigit():
            raise InvalidArgumentError(f"Parameter '{key}' expects a number")
        elif opt.type == "bool" and value not in ("on", "off", "true", "false", "yes", "no"):
            raise InvalidArgumentError(f"Parameter '{key}' expects 'on' or 'off'")


class BackingFormatMissingError(InvalidArgumentError):
    """-b without -F: refused once the backing file is open, with the format qemu-img detected in a hint
    that, as 7.2 prints it, ends without a newline."""

    hint_newline = False


async def _backing_size(bpath: str, backing_fmt: str | None, size: int | None, opener: ImageOpener) -> int:
    """Open the backing file as qemu-img create does (force-share: only its size is read, and a VM may
    be running on it): a failure reads as the block layer's error, with qemu's hint line after it."""
    try:
        bdrv = await opener.sharing().open(bpath, backing_fmt, read_only=True)
    except OperationCancelledError:
        raise
    except BlockError as exc:
        block_layer_error(exc, "")
        # after any hint of the open's own (an NBD server's message), as qemu appends its hints
        exc.hint = (exc.hint + "\n" if exc.hint else "") + "Could not open backing image."
        raise
    try:
        if backing_fmt is None:
            missing = BackingFormatMissingError("Backing file specified without backing format")
            missing.hint = f"Detected format of {bdrv.format_name}."
            raise missing
        return bdrv.size if size is None else size
    finally:
        await bdrv.close()


@dataclass(slots=True)
class CreateResult:
    """The image ``create`` made; ``formatting`` is qemu-img's ``Formatting '...', fmt=...`` line."""

    path: str
    format: str
    size: int
    formatting: str


async def create(path: str, fmt: str, size: int | None, options: dict[str, str], *,
                 backing: str | None = None, backing_fmt: str | None = None, unsafe: bool = False,
                 opener: ImageOpener | None = None, progress: ProgressFn | None = None,
                 cancel: asyncio.Event | None = None,
                 on_formatting: Callable[[str], None] | None = None) -> CreateResult:
    """Create ``path``; errors carry qemu-img's ``FILE: message`` form. Never prints.

    ``on_formatting`` is given the Formatting line just before the format writes anything: qemu-img
    prints it at that point, so a create that then fails still shows it. ``cancel`` is honoured until
    then. Progress is (0, size) before the format writes and (size, size) once the image is made.
    """
    opener = opener or ImageOpener(lock=True)
    try:
        check_cancelled(cancel)
        check_format(fmt)
        options = dict(options)
        # qemu's bdrv_img_create: the -o list first, then -b and -F, which a format without backing
        # files refuses in words of its own
        validate_options(fmt, options)
        own = {o.name for o in get_format(fmt).create_options}
        if backing is not None:
            if "backing_file" not in own:
                raise UnsupportedError(f"Backing file not supported for file format '{fmt}'")
            options["backing_file"] = backing
        if backing_fmt is not None:
            if "backing_fmt" not in own:
                raise UnsupportedError(f"Backing file format not supported for file format '{fmt}'")
            options["backing_fmt"] = backing_fmt
        if "size" in options:
            if size is not None:
                raise InvalidArgumentError("The image size must be specified only once")
            size = parse_size(options.pop("size"))
        backing = options.get("backing_file")
        backing_fmt = options.get("backing_fmt")
        if backing is not None:
            bpath = opener.resolve(backing, path)
            if same_file(bpath, path):
                raise InvalidArgumentError(
                    "Error: Trying to create an image with the same filename as the backing file")
            if not backing:
                raise InvalidArgumentError("Expected backing file name, got empty string")
            if not unsafe:
                size = await _backing_size(bpath, backing_fmt, size, opener)
            elif backing_fmt is None:
                raise InvalidArgumentError("Backing file specified without backing format")
        if size is None:
            raise InvalidArgumentError("Image creation needs a size parameter")
        check_cancelled(cancel)
        formatting = formatting_line(path, fmt, size, options)
        if on_formatting is not None:
            on_formatting(formatting)
        report(progress, 0, size)
        # the backing file was opened above unless -u: the format need not open it again
        await create_image(path, fmt, size, options, opener=opener, unsafe=True)
        report(progress, size, size)
    except OperationCancelledError:
        raise
    except BlockError as exc:
        text = str(exc)
        if not text.startswith(f"{path}:"):
            exc.message = f"{path}: {text}"
        raise
    return CreateResult(path, fmt, size, formatting)
