"""`check`: run a format's consistency check (and repair) and report it in qemu-img's terms, exit codes too.

The verb returns a CheckReport; ``check_json`` and ``check_human`` are its JSON and human forms. Failing
to open the image (or its backing chain) is raised; a check that runs and fails is part of the report.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import Any

from ..driver import PASSED_OPTIONS, CheckResult, ImageOpener, OpenContext, image_open_error
from ..errors import BlockError, CheckUnsupportedError
from ..filenames import format_of, host_file_of, is_special, options_of
from .common import ProgressFn, check_cancelled, check_image_path, open_backing_chain, open_image, report

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


REPAIRED_BANNER = ("The following inconsistencies were found and repaired:\n\n"
                   "    {leaks} leaked clusters\n"
                   "    {corruptions} corruptions\n\n"
                   "Double checking the fixed image now...\n")


@dataclass(slots=True)
class CheckReport:
    """What ``check`` found, with everything a front-end needs to say it as qemu-img does.

    ``result`` is None when the check itself failed (``error`` then says why: a format without checks,
    ``Check failed: ...``); after a repair it is the re-check's result, carrying the counts fixed.
    ``messages`` are the per-cluster lines (``Leaked cluster ...``) qemu-img writes to stderr, in order.
    ``error`` is also set, to ``Check failed``, when the check ran but met internal errors.
    """

    result: CheckResult | None
    filename: str
    format: str
    exit_code: int
    fixed: tuple[int, int] = (0, 0)  # (leaks_fixed, corruptions_fixed) by the repair, before the re-check
    messages: list[str] = field(default_factory=list)
    error: str | None = None
    recheck_at: int = 0  # after a repair: where the re-check's lines start in ``messages``

    @property
    def repaired(self) -> bool:
        """A repair changed the image (qemu-img then says so and checks it again)."""
        return self.fixed != (0, 0)

    def to_json(self) -> dict[str, Any]:
        """QAPI ImageCheck, as ``check --output=json`` prints it (empty when there is no result)."""
        if self.result is None:
            return {}
        return check_json(self.result, self.filename, self.format)


def exit_code(result: CheckResult) -> int:
    """qemu-img check's exit status for a check that ran."""
    if result.check_errors:
        return EXIT_FAILED
    if result.corruptions:
        return EXIT_CORRUPT
    if result.leaks:
        return EXIT_LEAKS
    return EXIT_CLEAN




def secret_options(path: str) -> dict[str, Any]:
    """The secrets an options-tree name gives its image (``key-secret``, ``encrypt.key-secret``), which
    the check of an encrypted image opens it with."""
    tree = options_of(path) or {}
    return {k: tree[k] for k in PASSED_OPTIONS if k in tree}


async def check(path: str, fmt: str | None, *, opener: ImageOpener | None = None, repair: str | None = None,
                force_share: bool = False, progress: ProgressFn | None = None,
                cancel: asyncio.Event | None = None) -> CheckReport:
    """Check ``path`` (and repair it with ``repair`` "leaks" or "all"); never prints.

    Progress counts the check passes: one, or two when a repair is checked again. Cancellation is
    honoured before the first pass only: a repair, once made, is always checked again.
    """
    opener = opener or ImageOpener(lock=True, force_share=force_share)
    read_only = repair is None
    check_image_path(path, read_only=read_only)
    check_cancelled(cancel)
    nbd = is_special(path) and host_file_of(path) is None
    if nbd and (fmt == "nbd" or format_of(path) == "nbd"):
        # the nbd protocol itself: opened to report its own errors, then refused as qemu-img refuses it
        drv = await open_image(path, fmt, read_only=read_only, opener=opener)
        name, fmt = drv.filename, drv.format_name
        await drv.close()
        return CheckReport(None, name, fmt, EXIT_NO_CHECK, error="This image format does not support checks")
    try:
        # an NBD export holds the image as a file holds it (imagecore.formats.nbd.NbdFile)
        hf = await opener.open_nbd_file(path, read_only=read_only) if nbd else \
            opener.open_file(path, read_only=read_only)
    except BlockError as exc:
        raise image_open_error(exc, path) from None
    try:
        spec = opener.image_format(hf, fmt, path, read_only=read_only)
        fmt = spec.name
        if spec.check is None:
            return CheckReport(None, hf.path if nbd else path, fmt, EXIT_NO_CHECK,
                               error="This image format does not support checks")
        await open_backing_chain(path, fmt, opener, hf=hf)
        check_cancelled(cancel)
        if hf.local:
            st = os.fstat(hf.fd)
            key = (st.st_dev, st.st_ino)
        else:
            key = (-1, hash(hf.path))
        ctx = OpenContext(opener=opener, read_only=read_only, path=path, chain=(key,),
                          options=secret_options(path))
        passes = 1
        report(progress, 0, passes)
        messages: list[str] = []
        try:
            result = await spec.check(hf, ctx, repair)
        except CheckUnsupportedError as exc:
            return CheckReport(None, path, fmt, exc.exit_code, error=str(exc))
        except BlockError as exc:
            partial: CheckResult | None = getattr(exc, "check_result", None)
            if partial is not None:
                messages += partial.messages
            if getattr(exc, "open_failure", False):
                text = str(image_open_error(exc, path))
                # the open's hint follows its error, bare, as qemu-img prints it
                return CheckReport(None, path, fmt, EXIT_FAILED,
                                   error=text + ("\n" + exc.hint if exc.hint else ""))
            return CheckReport(None, path, fmt, EXIT_FAILED, messages=messages, error=f"Check failed: {exc}")
        messages += result.messages
        fixed = (0, 0)
        recheck_at = len(messages)
        if result.corruptions_fixed or result.leaks_fixed:
            fixed = (result.leaks_fixed, result.corruptions_fixed)
            recheck_at = len(messages)
            passes = 2
            report(progress, 1, passes)
            try:
                result = await spec.check(hf, ctx, None)
            except BlockError as exc:
                return CheckReport(None, path, fmt, EXIT_FAILED, fixed=fixed, messages=messages,
                                   error=f"Check failed: {exc}", recheck_at=recheck_at)
            messages += result.messages
            result.leaks_fixed, result.corruptions_fixed = fixed
        report(progress, passes, passes)
        return CheckReport(result, path, fmt, exit_code(result), fixed=fixed, messages=messages,
                           error="Check failed" if result.check_errors else None, recheck_at=recheck_at)
    finally:
        hf.close()
