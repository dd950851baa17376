"""`check`: run a format's consistency check (and repair) and report it as qemu-img does, exit codes too."""

from __future__ import annotations

import copy
import os
import sys
from typing import Any

from ..driver import BlockDriver, CheckResult, ImageOpener, OpenContext
from ..errors import BlockError, CheckUnsupportedError, InvalidArgumentError, NotFoundError
from .common import err, out, qemu_json

EXIT_CLEAN = 0
EXIT_FAILED = 1
EXIT_CORRUPT = 2
EXIT_LEAKS = 3
EXIT_NO_CHECK = 63


def check_json(result: CheckResult, filename: str, fmt: str) -> dict[str, Any]:
    """QAPI ImageCheck: optional counters appear only when non-zero, as qemu-img fills them."""
    d: dict[str, Any] = {"filename": filename, "format": fmt, "check-errors": result.check_errors}
    optional = (
        ("image-end-offset", result.image_end_offset),
        ("corruptions", result.corruptions),
        ("leaks", result.leaks),
        ("corruptions-fixed", result.corruptions_fixed),
        ("leaks-fixed", result.leaks_fixed),
        ("total-clusters", result.total_clusters),
        ("allocated-clusters", result.allocated_clusters),
        ("fragmented-clusters", result.fragmented_clusters),
        ("compressed-clusters", result.compressed_clusters),
    )
    for key, value in optional:
        if value:
            d[key] = value
    return d


def check_human(r: CheckResult) -> str:
    lines: list[str] = []
    if not (r.corruptions or r.leaks or r.check_errors):
        lines.append("No errors were found on the image.")
    else:
        if r.corruptions:
            lines += ["", f"{r.corruptions} errors were found on the image.",
                      "Data may be corrupted, or further writes to the image may corrupt it."]
        if r.leaks:
            lines += ["", f"{r.leaks} leaked clusters were found on the image.",
                      "This means waste of disk space, but no harm to data."]
        if r.check_errors:
            lines += ["", f"{r.check_errors} internal errors have occurred during the check."]
    total, alloc = r.total_clusters or 0, r.allocated_clusters or 0
    if total and alloc:
        lines.append("%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters" % (  # noqa: UP031
            alloc, total, alloc * 100.0 / total, (r.fragmented_clusters or 0) * 100.0 / alloc,
            (r.compressed_clusters or 0) * 100.0 / alloc))
    if r.image_end_offset:
        lines.append(f"Image end offset: {r.image_end_offset}")
    return "\n".join(lines) + "\n"


def _messages(r: CheckResult) -> None:
    for m in r.messages:
        sys.stderr.write(m + "\n")


class _MissingBackingError(NotFoundError):
    """A file of the backing chain does not exist; its message is the chain of qemu's open errors."""


async def _open_backing_chain(path: str, fmt: str, opener: ImageOpener) -> None:
    """Open the image's whole backing chain first, as qemu-img check does; a missing file fails the check.

    The chain is opened through an unlocking copy of ``opener`` (the checked image's fd already holds its
    lock bytes). Only a missing backing file is reported here: any other failure to open is left to the
    format's check, which can look at images that do not open (corrupt ones, for example).
    """
    probe = copy.copy(opener)
    probe.lock = False
    plain = probe.open_backing

    async def open_backing(name: str, bfmt: str | None, ctx: OpenContext) -> BlockDriver:
        bpath = probe.resolve(name, ctx.path)
        if not os.path.exists(bpath):
            raise _MissingBackingError(
                f"Could not open backing file: Could not open '{bpath}': No such file or directory")
        try:
            return await plain(name, bfmt, ctx)
        except _MissingBackingError as exc:
            raise _MissingBackingError(f"Could not open backing file: {exc}") from None

    setattr(probe, "open_backing", open_backing)  # noqa: B010 - an instance override, classes stay untouched
    try:
        drv = await probe.open(path, fmt, read_only=True)
    except _MissingBackingError as exc:
        raise NotFoundError(f"Could not open '{path}': {exc}") from None
    except BlockError:
        return
    await drv.close()


async def check(path: str, fmt: str | None, *, output: str = "human", repair: str | None = None,
                quiet: bool = False, opener: ImageOpener | None = None, force_share: bool = False) -> int:
    opener = opener or ImageOpener(lock=True, force_share=force_share)
    if not os.path.lexists(path):
        raise NotFoundError(f"Could not open '{path}': No such file or directory")
    if os.path.isdir(path):
        raise InvalidArgumentError(f"Could not open '{path}': Is a directory")
    read_only = repair is None
    hf = opener.open_file(path, read_only=read_only)
    try:
        spec = opener.image_format(hf, fmt, path, read_only=read_only)
        fmt = spec.name
        if spec.check is None:
            err("This image format does not support checks")
            return EXIT_NO_CHECK
        await _open_backing_chain(path, fmt, opener)
        st = os.fstat(hf.fd)
        ctx = OpenContext(opener=opener, read_only=read_only, path=path,
                          chain=((st.st_dev, st.st_ino),))
        try:
            result = await spec.check(hf, ctx, repair)
        except CheckUnsupportedError as exc:
            err(str(exc))
            return exc.exit_code
        except BlockError as exc:
            partial: CheckResult | None = getattr(exc, "check_result", None)
            if partial is not None:
                _messages(partial)
            err(f"Check failed: {exc}")
            return EXIT_FAILED
        _messages(result)
        if result.corruptions_fixed or result.leaks_fixed:
            if output == "human" and not quiet:
                out("The following inconsistencies were found and repaired:\n\n"
                    f"    {result.leaks_fixed} leaked clusters\n"
                    f"    {result.corruptions_fixed} corruptions\n\n"
                    "Double checking the fixed image now...\n")
            fixed = (result.leaks_fixed, result.corruptions_fixed)
            try:
                result = await spec.check(hf, ctx, None)
            except BlockError as exc:
                err(f"Check failed: {exc}")
                return EXIT_FAILED
            _messages(result)
            result.leaks_fixed, result.corruptions_fixed = fixed
        if not quiet:
            if output == "json":
                out(qemu_json(check_json(result, path, fmt)) + "\n")
            else:
                out(check_human(result))
        if result.check_errors:
            err("Check failed")
            return EXIT_FAILED
        if result.corruptions:
            return EXIT_CORRUPT
        if result.leaks:
            return EXIT_LEAKS
        return EXIT_CLEAN
    finally:
        hf.close()
