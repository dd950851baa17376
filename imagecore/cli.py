"""The `imagecore` command: qemu-img's verbs, flags, output and exit codes; convert runs on uvloop.

The verbs in ``imagecore.ops`` return results and never print; this module parses qemu-img's command
lines, runs a verb and renders its result (human text, qemu-style JSON, the progress meter and the exit
code) byte for byte as qemu-img 7.2 does.
"""

from __future__ import annotations

import asyncio
import contextlib
import getopt
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from . import hostio, progname
from .errors import BlockError, ImageFormatError, InvalidArgumentError
from .formats import register_all
from .ops.common import INT64_MAX, is_help_request, parse_size, qemu_json, snapshot_param, split_options

if TYPE_CHECKING:
    from .ops.map import MapEntry

# qemu's -t/-T cache modes (bdrv_parse_cache_mode)
CACHE_MODES = ("none", "off", "writeback", "unsafe", "directsync", "writethrough")

USAGE = """\
imagecore version {version}
usage: imagecore [standard options] command [command options]
Disk image utility, compatible with qemu-img

    '-h', '--help'       display this help and exit
    '-V', '--version'    output version information and exit

Command syntax:
  amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename
  bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] [-i aio] [-n] [--no-drain] \
[-o offset] [--pattern=pattern] [-q] [-s buffer_size] [-S step_size] [-t cache] [-w] [-U] filename
  bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b source_file \
[-F source_fmt]] [-g granularity] [-f fmt] filename bitmap
  check [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-U] filename
  commit [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p] filename
  compare [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2
  create [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]
  convert [-C] [-c] [-p] [-q] [-n] [-f fmt] [-t cache] [-T src_cache] [-O output_fmt] [-B backing_file \
[-F backing_fmt]] [-o options] [-l snapshot_param] [-S sparse_size] [-r rate_limit] [-m num_coroutines] \
[-W] [--salvage] [--target-is-zero] [--bitmaps [--skip-broken-bitmaps]] filename [filename2 [...]] \
output_filename
  dd [-U] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] [skip=blocks] if=input of=output
  info [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename
  map [--output=ofmt] [-f fmt] [--start-offset=offset] [--max-length=len] [-U] filename
  measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [-f fmt] [-l snapshot_param] \
filename]
  snapshot [-q] [-U] [-l | -a snapshot | -c snapshot | -d snapshot] filename
  rebase [--object objectdef] [--image-opts] [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] [-c] \
-b backing_file [-F backing_fmt] filename
  resize [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size

Supported formats: {formats}
"""


class UsageError(InvalidArgumentError):
    """Bad command-line syntax, as qemu-img's error_exit reports it: with its pointer to --help."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        if type(self).hint is not None:
            self.hint = f"Try '{progname.name()} --help' for more information"

    hint: str | None = "Try 'imagecore --help' for more information"


class ArgumentError(UsageError):
    """A bad option value that qemu-img reports with error_report: the message alone, no pointer."""

    hint = None


def out(text: str) -> None:
    sys.stdout.write(text)


def err(text: str) -> None:
    sys.stderr.write(f"{progname.name()}: {text}\n")


def _version_text() -> str:
    """`--version`, in qemu-img's shape ("qemu-img version 7.2.22 (Debian 1:7.2+dfsg-7)" and a second
    line): the program and its version, then the package it comes from in brackets, as a distribution
    names its package there."""
    from .version import package_version

    v = package_version()
    return f"{progname.name()} version {v} (nbdsrv {v})\nA drop-in for qemu-img 7.2; MIT License\n"


def _usage() -> str:
    from .driver import format_names
    from .version import package_version

    return USAGE.format(version=package_version(), formats=" ".join(format_names())).replace(
        "imagecore ", f"{progname.name()} ", 2)


def _getopt(argv: Sequence[str], short: str, long: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    try:
        return getopt.gnu_getopt(list(argv), short, long)
    except getopt.GetoptError as exc:
        # qemu-img's own texts (its missing_argument and unrecognized_option), not getopt's
        name = f"--{exc.opt}" if len(exc.opt) > 1 else f"-{exc.opt}"
        if "requires argument" in exc.msg:
            raise UsageError(f"missing argument for option '{name}'") from None
        if len(exc.opt) > 1:
            # qemu-img names the argument as given, with its value: '--output=json'
            name = next((a for a in argv if a.startswith(f"{name}=")), name)
        raise UsageError(f"unrecognized option '{name}'") from None


# How a flag's argument is read: a function that converts it (refusing it with qemu-img's message where the
# flag stands, as qemu-img's getopt loop does), or None for a switch, True when given.
Reader = Callable[[str], Any] | None
# A verb's flags as a table: each getopt flag name -> (the key it sets, its reader).
FlagTable = dict[str, tuple[str, Reader]]


def _text(value: str) -> str:
    return value


def _table(*rows: tuple[tuple[str, ...], str, Reader]) -> FlagTable:
    """A FlagTable from rows of (flag names, key, reader)."""
    return {name: (key, read) for names, key, read in rows for name in names}


def _flags(argv: Sequence[str], short: str, long: list[str], table: FlagTable,
           many: tuple[str, ...] = ()) -> tuple[dict[str, Any], list[str]] | None:
    """Read a verb's command line by its table, in order; None once -h/--help printed the usage. A flag in
    the getopt lists but not in the table is accepted and has no effect (--object, --image-opts, ...);
    the keys in ``many`` collect every value in a list, the others keep the last."""
    opts, args = _getopt(argv, short, long)
    got: dict[str, Any] = {}
    for k, v in opts:
        if k in ("-h", "--help"):
            out(_usage())
            return None
        row = table.get(k)
        if row is None:
            continue
        key, read = row
        value = True if read is None else read(v)
        if key in many:
            got.setdefault(key, []).append(value)
        else:
            got[key] = value
    return got, args


def _output(value: str) -> str:
    if value not in ("human", "json"):
        raise ArgumentError("--output must be used with human or json as argument.")
    return value


# rows several verbs share
_FMT: tuple[tuple[str, ...], str, Reader] = (("-f", "--format"), "fmt", _text)
_SHARE: tuple[tuple[str, ...], str, Reader] = (("-U", "--force-share"), "share", None)
_OUTPUT: tuple[tuple[str, ...], str, Reader] = (("--output",), "output", _output)


def _one_file(args: list[str]) -> str:
    if len(args) != 1:
        raise UsageError("Expecting one image file name")
    return _name(args[0])


# --image-opts was given: the verb's image names are QemuOpts strings (imagecore.filenames)
_image_opts = False
# the verbs that take --image-opts (all but create, which takes --object only)
_IMAGE_OPTS_VERBS = frozenset({"amend", "bench", "bitmap", "check", "commit", "compare", "convert", "dd",
                               "info", "map", "measure", "rebase", "resize", "snapshot"})


def _name(path: str) -> str:
    """An image name as the verb was given it: with --image-opts, an options string."""
    from .filenames import ImageOptsName

    return ImageOptsName(path) if _image_opts else path


def _global_options(verb: str, argv: list[str]) -> list[str]:
    """Take --object and --image-opts out of a verb's arguments, as every verb handles them alike:
    objects are created (in order, before the verb runs) and --image-opts marks the names."""
    from .filenames import add_object

    global _image_opts
    _image_opts = False
    rest: list[str] = []
    it = iter(range(len(argv)))
    for i in it:
        arg = argv[i]
        if arg == "--":
            rest += argv[i:]
            break
        if arg == "--image-opts" and verb in _IMAGE_OPTS_VERBS:
            _image_opts = True
        elif arg == "--object" and i + 1 < len(argv):
            add_object(argv[i + 1])
            next(it, None)
        elif arg.startswith("--object="):
            add_object(arg.removeprefix("--object="))
        else:
            rest.append(arg)
    if _image_opts and any(a in ("-f", "--format") or a.startswith("--format=") for a in rest):
        # qemu-img's img_open refuses it before it opens anything (convert's -f names its sources too)
        raise ArgumentError("--image-opts and --format are mutually exclusive")
    return rest


def _option_arg(value: str) -> str:
    """One -o argument, refused as qemu-img refuses it while it reads its options (before any other
    check of the command line): ``Invalid option list: ...``, exit code 1."""
    if not _valid_option_list(value):
        raise InvalidArgumentError(f"Invalid option list: {value}")
    return value


def _options(values: list[str]) -> tuple[dict[str, str], bool]:
    pairs = []
    for v in values:
        pairs += split_options(_option_arg(v))
    if is_help_request(pairs):
        return {}, True
    opts: dict[str, str] = {}
    for key, value in pairs:
        opts[key] = "on" if value is None else value
    return opts, False


Job = Callable[[], Coroutine[Any, Any, int]]


def _cmd_create(argv: Sequence[str]) -> Job | int:
    from .ops import create as op

    parsed = _flags(argv, "F:b:f:ho:qu", ["help", "object="], _table(
        _FMT, (("-b",), "backing", _text), (("-F",), "backing_fmt", _text), (("-u",), "unsafe", None),
        (("-q",), "quiet", None), (("-o",), "o", _option_arg)), many=("o",))
    if parsed is None:
        return 0
    f, args = parsed
    fmt: str = f.get("fmt", "raw")
    backing: str | None = f.get("backing")
    backing_fmt: str | None = f.get("backing_fmt")
    unsafe, quiet = bool(f.get("unsafe")), bool(f.get("quiet"))
    options, want_help = _options(f.get("o", []))
    if want_help:
        op.check_format(fmt)
        out(op.help_text(fmt, args[0] if args else None))
        return 0
    if not args:
        raise UsageError("Expecting image file name")
    if len(args) > 2:
        raise UsageError("Unexpected argument: " + args[2])
    size: int | None = None
    if len(args) == 2:
        size = _cvtnum("image size", args[1])
    path = args[0]

    def formatting(line: str) -> None:
        if not quiet:
            out(line + "\n")

    async def job() -> int:
        await op.create(path, fmt, size, options, backing=backing, backing_fmt=backing_fmt, unsafe=unsafe,
                        on_formatting=formatting)
        return 0
    return job


def _cmd_info(argv: Sequence[str]) -> Job | int:
    from .ops import info as op

    parsed = _flags(argv, "f:hU", ["help", "format=", "output=", "backing-chain", "force-share", "object=",
                                   "image-opts"],
                    _table(_FMT, _OUTPUT, _SHARE, (("--backing-chain",), "chain", None)))
    if parsed is None:
        return 0
    f, args = parsed
    fmt: str | None = f.get("fmt")
    output: str = f.get("output", "human")
    chain, share = bool(f.get("chain")), bool(f.get("share"))
    path = _one_file(args)

    async def job() -> int:
        res = await op.info(path, fmt, backing_chain=chain, force_share=share)
        if output == "json":
            out(qemu_json(res.to_json()) + "\n")
        else:
            out("\n".join(op.human_info(i) for i in res.images))
        return 0
    return job


def _cmd_check(argv: Sequence[str]) -> Job | int:
    from .ops import check as op

    parsed = _flags(argv, "hf:r:T:qU", ["help", "format=", "repair=", "output=", "force-share", "object=",
                                        "image-opts"],
                    _table(_FMT, _OUTPUT, _SHARE, (("-r", "--repair"), "repair", _repair),
                           (("-q",), "quiet", None)))
    if parsed is None:
        return 0
    f, args = parsed
    fmt: str | None = f.get("fmt")
    output: str = f.get("output", "human")
    repair: str | None = f.get("repair")
    quiet, share = bool(f.get("quiet")), bool(f.get("share"))
    path = _one_file(args)

    async def job() -> int:
        rep = await op.check(path, fmt, repair=repair, force_share=share)
        _check_lines(rep.messages[:rep.recheck_at])
        if rep.repaired and output == "human" and not quiet:
            out(op.REPAIRED_BANNER.format(leaks=rep.fixed[0], corruptions=rep.fixed[1]))
        _check_lines(rep.messages[rep.recheck_at:])
        if rep.result is not None and not quiet:
            if output == "json":
                out(qemu_json(rep.to_json()) + "\n")
            else:
                out(op.check_human(rep.result))
        if rep.error is not None:
            err(rep.error)
        return rep.exit_code
    return job


def _repair(value: str) -> str:
    if value not in ("leaks", "all"):
        raise UsageError(f"Unknown option value for -r (expecting 'leaks' or 'all'): {value}")
    return value


def _check_lines(lines: list[str]) -> None:
    for line in lines:
        sys.stderr.write(line + "\n")


def _cmd_map(argv: Sequence[str]) -> Job | int:
    from .ops import map as op

    parsed = _flags(argv, "f:hU", ["help", "format=", "output=", "force-share", "object=", "image-opts",
                                   "start-offset=", "max-length="],
                    _table(_FMT, _OUTPUT, _SHARE,
                           (("--start-offset",), "start", lambda v: _offset(v, "start offset")),
                           (("--max-length",), "max_length", lambda v: _offset(v, "max length"))))
    if parsed is None:
        return 0
    f, args = parsed
    fmt: str | None = f.get("fmt")
    output: str = f.get("output", "human")
    start: int = f.get("start", 0)
    max_length: int | None = f.get("max_length")
    share = bool(f.get("share"))
    path = _one_file(args)

    async def job() -> int:
        async with op.open_map(path, fmt, start=start, max_length=max_length, force_share=share) as entries:
            if output == "json":
                await _map_json(entries)
                return 0
            out(op.HUMAN_HEADER)
            lines: list[str] = []
            try:
                async for e in entries:
                    if e.data and e.offset is None:
                        raise ImageFormatError("File contains external, encrypted or compressed clusters.")
                    if e.data and not e.zero:
                        lines.append(op.human_line(e))
                        if len(lines) >= _MAP_BATCH:
                            out("".join(lines))
                            lines.clear()
            finally:
                out("".join(lines))  # what came before an error is printed, as qemu-img prints it
        return 0
    return job


# entries rendered per write: the output streams in pieces of about 100 KiB, whatever the map's length
_MAP_BATCH = 1024


async def _map_json(entries: AsyncIterator[MapEntry]) -> None:
    """qemu-img's ``map --output=json`` text, written as the entries come: ``[``, the entries one per line
    separated by ``,``, then ``]``. An error leaves the entries before it printed and no ``]``, as in
    qemu-img."""
    out("[")
    sep = ""
    parts: list[str] = []
    try:
        async for e in entries:
            parts.append(e.json())
            if len(parts) >= _MAP_BATCH:
                out(sep + ",\n".join(parts))
                sep = ",\n"
                parts.clear()
    except BaseException:
        # qemu-img prints each entry as the next one arrives, with the separator after it
        out(sep + "".join(p + ",\n" for p in parts))
        raise
    out((sep + ",\n".join(parts) if parts else "") + "]\n")


def _cmd_snapshot(argv: Sequence[str]) -> Job | int:
    from .ops import snapshot as op
    from .ops.info import snapshot_table

    opts, args = _getopt(argv, "la:c:d:hqU", ["help", "object=", "image-opts", "force-share"])
    action: op.Action | None = None
    name: str | None = None
    share = False
    for k, v in opts:
        if k in ("-h", "--help"):
            out(_usage())
            return 0
        if k in ("-l", "-a", "-c", "-d"):
            if action is not None:
                raise UsageError("Cannot mix '-l', '-a', '-c', '-d'")
            action = {"-l": "list", "-a": "apply", "-c": "create", "-d": "delete"}[k]  # type: ignore[assignment]
            name = None if k == "-l" else v
        elif k in ("-U", "--force-share"):
            share = True
        # -q is accepted: snapshot prints nothing it would hide (qemu-img's list ignores it too)
    path = _one_file(args)

    async def job() -> int:
        res = await op.snapshot(path, action, name, force_share=share)
        if action == "list" and res.snapshots:  # -q does not hide the list, as in qemu-img
            out("\n".join(snapshot_table(res.snapshots)) + "\n")
        return 0
    return job


def _cmd_bitmap(argv: Sequence[str]) -> Job | int:
    from .ops import bitmap as op

    opts, args = _getopt(argv, "b:f:F:g:h", [
        "help", "object=", "image-opts", "add", "remove", "clear", "enable", "disable", "merge=",
        "granularity=", "source-file=", "source-format="])
    actions: list[op.BitmapAction] = []
    fmt: str | None = None
    source: str | None = None
    source_fmt: str | None = None
    granularity = 0
    for k, v in opts:
        if k in ("-h", "--help"):
            out(_usage())
            return 0
        if k in ("-b", "--source-file"):
            source = v
        elif k == "-f":
            fmt = v
        elif k in ("-F", "--source-format"):
            source_fmt = v
        elif k in ("-g", "--granularity"):
            granularity = _granularity(v)  # qemu-img parses it on the spot, before any other check
        elif k == "--merge":
            actions.append(op.BitmapAction("merge", v))
        elif k in ("--add", "--remove", "--clear", "--enable", "--disable"):
            actions.append(op.BitmapAction(k[2:]))  # type: ignore[arg-type]
        # --object and --image-opts are accepted and have no effect here.
    try:
        op.check_arguments(actions, granularity=granularity, source_file=source, source_fmt=source_fmt)
    except InvalidArgumentError as exc:
        raise ArgumentError(str(exc)) from None
    if len(args) != 2:
        raise ArgumentError("Expecting filename and bitmap name")
    path, name = _name(args[0]), args[1]

    async def job() -> int:
        await op.bitmap(path, name, actions, fmt=fmt, granularity=granularity or None, source_file=source,
                        source_fmt=source_fmt)
        return 0
    return job


def _granularity(text: str) -> int:
    try:
        return parse_size(text)
    except InvalidArgumentError as exc:
        if "Must be between" in str(exc):
            raise ArgumentError(str(exc).replace("image size", "granularity")) from None
        raise ArgumentError("Invalid granularity specified. You may use k, M, G, T, P or E suffixes for\n"
                            "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.") from None


def _offset(text: str, what: str) -> int:
    try:
        return parse_size(text)
    except InvalidArgumentError:
        raise ArgumentError(f"Invalid {what} specified. You may use k, M, G, T, P or E suffixes for\n"
                            "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.") from None


def _cmd_convert(argv: Sequence[str]) -> Job | int:
    from .ops import convert as op
    from .ops.create import check_format, help_text

    opts, args = _getopt(argv, "hf:O:B:F:Cco:l:S:pt:T:qnm:WUr:", [
        "help", "object=", "image-opts", "target-image-opts", "salvage", "target-is-zero", "force-share",
        "bitmaps", "skip-broken-bitmaps"])
    o = op.ConvertOptions(sources=[], target="")
    target_opts = "--target-image-opts" in [k for k, _v in opts]
    ovals: list[str] = []
    src_cache = "writeback"
    for k, v in opts:
        if k in ("-h", "--help"):
            out(_usage())
            return 0
        if k == "-f":
            o.src_fmt = v
        elif k == "-O":
            o.out_fmt = v
        elif k == "-B":
            o.backing = v
        elif k == "-F":
            o.backing_fmt = v
        elif k == "-c":
            o.compress = True
        elif k == "-o":
            ovals.append(_option_arg(v))
        elif k == "-S":
            try:
                o.sparse_size = parse_size(v)
            except InvalidArgumentError:
                raise ArgumentError("Invalid buffer size for sparse output specified. You may use k, M, G, "
                                    "T, P or E suffixes for\nkilobytes, megabytes, gigabytes, terabytes, "
                                    "petabytes and exabytes.") from None
            o.sparse_explicit = True
            _convert_values(op, o)
        elif k == "-p":
            o.progress = True
        elif k == "-q":
            o.quiet = True
        elif k == "-n":
            o.skip_create = True
        elif k == "-m":
            if not v.isdigit():
                raise ArgumentError("Invalid number of coroutines. Allowed number of coroutines is between "
                                    f"1 and {op.MAX_COROUTINES}")
            o.parallel = int(v)
            _convert_values(op, o)
        elif k == "-W":
            o.out_of_order = True
        elif k == "-t":
            o.cache = v  # checked once the target is made, as qemu-img checks it
        elif k == "-T":
            src_cache = v
        elif k == "--target-is-zero":
            o.target_is_zero = True
        elif k in ("-U", "--force-share"):
            o.force_share = True  # the sources only, as in qemu-img
        elif k == "-l":
            try:
                o.snapshot = snapshot_param(v)
            except InvalidArgumentError as exc:
                raise ArgumentError(str(exc)) from None  # qemu's two error_report lines
        elif k == "-r":
            o.rate_limit = _cvtnum("rate limit", v)
        elif k == "-C":
            o.copy_range = True
        elif k == "--salvage":
            o.salvage = True
        elif k == "--bitmaps":
            o.bitmaps = True
        elif k == "--skip-broken-bitmaps":
            o.skip_broken_bitmaps = True
        # --image-opts is accepted and has no effect here.
    if o.skip_broken_bitmaps and not o.bitmaps:
        raise ArgumentError("Use of --skip-broken-bitmaps requires --bitmaps")
    options, want_help = _options(ovals)
    try:
        op.check_flags(o, options_given=bool(ovals))
    except InvalidArgumentError as exc:
        raise ArgumentError(str(exc)) from None
    if want_help:
        check_format(o.out_fmt)
        out(help_text(o.out_fmt, args[-1] if len(args) > 1 else None))
        return 0
    if len(args) < 2:
        raise ArgumentError("Must specify image file name")
    if src_cache not in CACHE_MODES:  # -T has no other effect here
        raise ArgumentError(f"Invalid source cache option: {src_cache}")
    o.options = options
    o.sources, o.target = [_name(a) for a in args[:-1]], args[-1]
    if target_opts:
        if not o.skip_create:
            raise ArgumentError("--target-image-opts requires use of -n flag")
        if any(k == "-O" for k, _v in opts):
            raise ArgumentError("--image-opts and --format are mutually exclusive")
        from .filenames import ImageOptsName, format_of

        o.target = ImageOptsName(o.target)
        o.out_fmt = format_of(o.target) or "raw"

    async def job() -> int:
        meter = _Meter(o.progress and not o.quiet)
        await op.convert(o, progress=meter, warn=lambda text: err(f"warning: {text}"))
        meter.end()
        return 0
    return job


def _convert_values(op: Any, o: Any) -> None:
    """-m and -S out of range are refused as qemu-img's getopt loop does, at the option."""
    try:
        op.check_values(o)
    except InvalidArgumentError as exc:
        raise ArgumentError(str(exc)) from None


def _cvtnum(what: str, text: str) -> int:
    """A size argument as qemu-img's cvtnum reads it, refused in its two messages."""
    try:
        return parse_size(text)
    except InvalidArgumentError as exc:
        if "Must be between" in str(exc):
            raise ArgumentError(f"Invalid {what} specified. Must be between 0 and {INT64_MAX}.") from None
        raise ArgumentError(f"Invalid {what} specified. You may use k, M, G, T, P or E suffixes for\n"
                            "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.") from None


def _cmd_measure(argv: Sequence[str]) -> Job | int:
    from .ops import measure as op

    parsed = _flags(argv, "hf:o:O:l:U", ["help", "image-opts", "object=", "output=", "size=", "force-share"],
                    _table(_FMT, _OUTPUT, _SHARE, (("-O",), "out_fmt", _text), (("-o",), "o", _option_arg),
                           (("-l",), "snapshot", _text), (("--size",), "size", _image_size)), many=("o",))
    if parsed is None:
        return 0
    f, args = parsed
    fmt: str | None = f.get("fmt")
    out_fmt: str = f.get("out_fmt", "raw")
    output: str = f.get("output", "human")
    snapshot: str | None = f.get("snapshot")
    size: int | None = f.get("size")
    share = bool(f.get("share"))
    ovals: list[str] = f.get("o", [])
    if len(args) > 1:
        raise InvalidArgumentError("At most one filename argument is allowed.")
    path = _name(args[0]) if args else None
    options = _option_list(ovals)

    async def job() -> int:
        try:
            res = await op.measure(out_fmt, options, size=size, path=path, fmt=fmt, snapshot=snapshot,
                                   force_share=share)
        except BlockError as exc:
            return _all_lines(exc)
        out(qemu_json(res.to_json()) + "\n" if output == "json" else op.human(res))
        return 0
    return job


def _option_list(values: list[str]) -> dict[str, str]:
    """-o lists as measure takes them: accumulated, with no help request (it is just a bad name there)."""
    opts: dict[str, str] = {}
    for v in values:
        for key, value in split_options(_option_arg(v)):
            opts[key] = "on" if value is None else value
    return opts


def _image_size(text: str) -> int:
    return _cvtnum("image size", text)


def _all_lines(exc: BlockError) -> int:
    """Print an error as qemu-img does: each line of the message an error_report of its own (qemu-img's
    messages of two lines are two reports), except for the continuation lines of qemu's size hint, which
    it prints bare; then the error's hint, bare (qemu's error_append_hint)."""
    if exc.cli_silent:
        return exc.exit_code
    lines = str(exc).splitlines() or [type(exc).__name__]
    for line in lines:
        if line.startswith(("Optional suffix", "and exabytes")):
            sys.stderr.write(line + "\n")
        else:
            err(line)
    warning = getattr(exc, "warning", None)
    if warning:
        err(warning)
    if exc.hint:
        sys.stderr.write(exc.hint + ("\n" if exc.hint_newline else ""))
    return exc.exit_code


def _cmd_resize(argv: Sequence[str]) -> Job | int:
    from .ops import resize as op

    # qemu-img takes the size off the end before getopt, so that "-1G" is not read as an option
    if len(argv) < 2:
        raise UsageError("Not enough arguments")
    size_text = argv[-1]
    def preallocation(value: str) -> str:
        if value not in op.PREALLOC_MODES:
            raise InvalidArgumentError(f"Invalid preallocation mode '{value}'")
        return value

    parsed = _flags(argv[:-1], "f:hq", ["help", "object=", "image-opts", "preallocation=", "shrink"],
                    _table(_FMT, (("-q",), "quiet", None), (("--shrink",), "shrink", None),
                           (("--preallocation",), "prealloc", preallocation)))
    if parsed is None:
        return 0
    f, args = parsed
    fmt: str | None = f.get("fmt")
    quiet, shrink = bool(f.get("quiet")), bool(f.get("shrink"))
    prealloc: str = f.get("prealloc", "off")
    if len(args) != 1:
        raise UsageError("Expecting image file name and size")
    path = _name(args[0])
    relative = {"+": 1, "-": -1}.get(size_text[:1], 0)
    try:
        size = _resize_size(size_text[1:] if relative else size_text)
    except BlockError as exc:
        return _all_lines(exc)

    async def job() -> int:
        try:
            await op.resize(path, fmt, size, relative=relative, shrink=shrink, preallocation=prealloc)
        except BlockError as exc:
            return _all_lines(exc)
        if not quiet:
            out("Image resized.\n")
        return 0
    return job


def _resize_size(text: str) -> int:
    from .units import parse_option_size as parse_opt_size

    return parse_opt_size("size", text)


# Set by SIGUSR1: print where convert is, once, as qemu-img does without -p.
_progress_requested = False


def request_progress() -> None:
    """Ask a running convert to report its progress on stderr at its next step; safe in a signal handler."""
    global _progress_requested
    _progress_requested = True


class _Meter:
    """qemu's progress meter, fed by convert's progress callback: with -p a line redrawn on stdout at every
    1 %; without, a line on stderr at the next 1 % step after each SIGUSR1 (qemu's progress_dummy_print)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.total = 1
        self.done = 0
        self.shown = -1.0

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, max(total, 1)
        self.show()

    def show(self, force: bool = False) -> None:
        global _progress_requested
        pct = self.done * 100.0 / self.total
        if not (force or pct - self.shown >= 1.0 or self.shown < 0 or pct == 100.0):
            return
        self.shown = pct
        if self.enabled:
            sys.stdout.write("    (%3.2f/100%%)\r" % pct)  # noqa: UP031
            sys.stdout.flush()
        elif _progress_requested:
            _progress_requested = False
            sys.stderr.write("    (%3.2f/100%%)\n" % pct)  # noqa: UP031
            sys.stderr.flush()

    def end(self) -> None:
        # qemu prints 100 % at each call that reaches it, the final one included; a meter that got there
        # has said so already
        if self.shown != 100.0:
            self.done = self.total
            self.show(force=True)
        if self.enabled:
            sys.stdout.write("\n")
            sys.stdout.flush()


def _cmd_commit(argv: Sequence[str]) -> Job | int:
    from .ops import commit as op

    opts, args = _getopt(argv, "f:ht:b:dpqr:", ["help", "object=", "image-opts"])
    fmt: str | None = None
    base: str | None = None
    cache, drop, progress, quiet, rate = "writeback", False, False, False, 0
    for k, v in opts:
        if k in ("-h", "--help"):
            out(_usage())
            return 0
        if k == "-f":
            fmt = v
        elif k == "-t":
            cache = v
        elif k == "-b":
            base, drop = v, True  # -b implies -d, as in qemu-img
        elif k == "-d":
            drop = True
        elif k == "-p":
            progress = True
        elif k == "-q":
            quiet = True
        elif k == "-r":
            n = _dd_number("rate limit", v, 0, INT64_MAX)
            if n is None:
                return 1
            rate = n
        # --object and --image-opts are accepted and have no effect here.
    path = _one_file(args)
    if cache not in op.CACHE_MODES:
        raise ArgumentError(f"Invalid cache option: {cache}")
    meter = _Meter(progress and not quiet)

    async def job() -> int:
        try:
            await op.commit(path, fmt, base=base, drop=drop, rate_limit=rate, cache=cache, progress=meter)
        except BlockError:
            if meter.enabled and meter.shown >= 0:
                out("\n")  # qemu ends the progress line it began, then reports the error
            raise
        meter.end()
        if not quiet:
            out("Image committed.\n")
        return 0
    return job


def _strtoul(text: str) -> int | None:
    """A number as qemu_strtoul reads it (base 0: hex, octal or decimal; the whole text; a minus sign
    wraps around as in C), or None where qemu-img would refuse it."""
    import re

    s = text.lstrip(" \t\n\v\f\r")
    negative = s[:1] == "-"
    if s[:1] in ("-", "+"):
        s = s[1:]
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", s):
        value = int(s, 16)
    elif re.fullmatch(r"0[0-7]*", s):
        value = int(s, 8)
    elif re.fullmatch(r"[1-9][0-9]*", s):
        value = int(s)
    else:
        return None
    if value >= 1 << 64:
        return None  # ERANGE
    return -value % (1 << 64) if negative else value


def _cmd_bench(argv: Sequence[str]) -> Job | int:
    from .ops import bench as op

    opts, args = _getopt(argv, "hc:d:f:ni:o:qs:S:t:wU", [
        "help", "flush-interval=", "image-opts", "pattern=", "no-drain", "force-share", "object="])
    o = op.BenchOptions()
    for k, v in opts:
        if k in ("-h", "--help"):
            out(_usage())
            return 0
        if k in ("-c", "-d", "--pattern", "--flush-interval"):
            what, high = {"-c": ("request count", op.INT_MAX), "-d": ("queue depth", op.INT_MAX),
                          "--pattern": ("pattern byte", 0xFF),
                          "--flush-interval": ("flush interval", op.INT_MAX)}[k]
            n = _strtoul(v)
            if n is None or n > high:
                raise ArgumentError(f"Invalid {what} specified")
            if k == "-d" and n == 0:
                # qemu-img 7.2 takes a depth of 0 and then waits forever; qemu 10 refuses it so
                raise ArgumentError(f"Invalid queue depth specified. Must be between 1 and {op.INT_MAX}.")
            if k == "-c":
                o.count = n
            elif k == "-d":
                o.depth = n
            elif k == "--pattern":
                o.pattern = n
            else:
                o.flush_interval = n
        elif k in ("-o", "-s", "-S"):
            name, high = {"-o": ("offset", INT64_MAX), "-s": ("buffer size", op.INT_MAX),
                          "-S": ("step_size", op.INT_MAX)}[k]
            n = _dd_number(name, v, 0, high)
            if n is None:
                return 1
            if k == "-o":
                o.offset = n
            elif k == "-s":
                o.bufsize = n
            else:
                o.step = n
        elif k == "-f":
            o.fmt = v
        elif k == "-n":
            o.aio = "native"
        elif k == "-i":
            if v not in op.AIO_MODES:
                raise ArgumentError(f"Invalid aio option: {v}")
            o.aio = v
        elif k == "-t":
            if v not in op.CACHE_MODES:
                raise ArgumentError("Invalid cache mode")
            o.cache = v
        elif k == "-w":
            o.write = True
        elif k == "--no-drain":
            o.drain = False
        elif k in ("-U", "--force-share"):
            o.force_share = True
        # -q: qemu-img bench prints its lines even so (they are printf, not qprintf); --object and
        # --image-opts are accepted and have no effect here.
    path = _one_file(args)

    def started(res: op.BenchResult) -> None:
        out("".join(line + "\n" for line in res.header()))
        sys.stdout.flush()

    async def job() -> int:
        res = await op.bench(path, o, on_start=started)
        out(res.footer() + "\n")
        return 0
    return job


def _cmd_compare(argv: Sequence[str]) -> Job | int:
    from .ops import compare as op

    parsed = _flags(argv, "hf:F:T:pqsU", ["help", "object=", "image-opts", "force-share"], _table(
        _SHARE, (("-f",), "fmt1", _text), (("-F",), "fmt2", _text), (("-T",), "cache", _text),
        (("-p",), "progress", None), (("-q",), "quiet", None), (("-s",), "strict", None)))
    if parsed is None:
        return 0
    f, args = parsed
    fmt1: str | None = f.get("fmt1")
    fmt2: str | None = f.get("fmt2")
    cache: str = f.get("cache", "writeback")
    progress, quiet, strict, share = (bool(f.get(k)) for k in ("progress", "quiet", "strict", "share"))
    if len(args) != 2:
        raise UsageError("Expecting two image file names")
    path1, path2 = _name(args[0]), _name(args[1])
    meter = _StepMeter(progress and not quiet, 2.0)

    async def job() -> int:
        try:
            if cache not in CACHE_MODES:
                err(f"Invalid source cache option: {cache}")
                return op.EXIT_OPEN
            res = await op.compare(path1, path2, fmt1, fmt2, strict=strict, force_share=share, progress=meter)
            if not quiet:
                out("".join(line + "\n" for line in res.lines()))
            return res.exit_code
        finally:
            meter.end()
    return job


class _StepMeter:
    """qemu's progress meter as compare drives it: single-precision percentages summed chunk by chunk, a
    line redrawn on stdout when they moved by more than ``min_skip`` (or hit 0 or 100)."""

    def __init__(self, enabled: bool, min_skip: float) -> None:
        self.enabled = enabled
        self.min_skip = min_skip
        self.done = 0
        self.current = 0.0
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        import struct

        def f32(x: float) -> float:
            value: float = struct.unpack("f", struct.pack("f", x))[0]
            return value

        chunk, self.done = done - self.done, done
        delta = f32(f32(f32(chunk) / f32(total)) * 100) if total else 0.0
        cur = min(f32(self.current + f32(f32(delta / 100) * 100)), 100.0)
        self.current = cur
        moved = cur > f32(self.last + self.min_skip) or cur < f32(self.last - self.min_skip)
        if moved or cur in (0.0, 100.0):
            self.last = cur
            sys.stdout.write("    (%3.2f/100%%)\r" % cur)  # noqa: UP031
            sys.stdout.flush()

    def end(self) -> None:
        if self.enabled:
            sys.stdout.write("\n")
            sys.stdout.flush()


def _cmd_dd(argv: Sequence[str]) -> Job | int:
    from .ops import dd as op

    parsed = _flags(argv, "hf:O:U", ["help", "object=", "image-opts", "force-share"],
                    _table(_FMT, _SHARE, (("-O",), "out_fmt", _text)))
    if parsed is None:
        return 0
    f, args = parsed
    o = op.DdOptions(input="", output="")
    if "fmt" in f:
        o.fmt = f["fmt"]
    if "out_fmt" in f:
        o.out_fmt = f["out_fmt"]
    o.force_share = bool(f.get("share"))
    given: set[str] = set()
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in ("bs", "count", "if", "of", "skip"):
            err(f"unrecognized operand {key if sep else arg}")
            return 1
        if key == "if":
            o.input = _name(value)
        elif key == "of":
            o.output = value
        else:
            n = _dd_number(key, value, 1 if key == "bs" else 0, op.INT_MAX if key == "bs" else op.INT64_MAX)
            if n is None:
                return 1
            if key == "bs":
                o.bs = n
            elif key == "count":
                o.count = n
            else:
                o.skip = n
        given.add(key)
    if not {"if", "of"} <= given:
        err("Must specify both input and output files")
        return 1

    async def job() -> int:
        res = await op.dd(o)
        if res.skip_beyond:
            err(f"{o.input}: cannot skip to specified offset")
        return 0
    return job


def _dd_number(name: str, text: str, low: int, high: int) -> int | None:
    """A dd operand's number as qemu-img's cvtnum_full reads it; None once its complaint is printed."""
    try:
        value = parse_size(text)
    except InvalidArgumentError as exc:
        if "Must be between" not in str(exc):
            err(f"Invalid {name} specified. You may use k, M, G, T, P or E suffixes for")
            err("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
            return None
        value = high + 1
    if value < low or value > high:
        err(f"Invalid {name} specified. Must be between {low} and {high}.")
        return None
    return value


def _f32(x: float) -> float:
    import struct

    value: float = struct.unpack("f", struct.pack("f", x))[0]
    return value


class _QemuMeter:
    """qemu's progress meter (util/qemu-progress.c) as rebase and amend drive it: ``print(delta, max)``
    adds ``delta`` percent of ``max`` (or sets ``delta`` when ``max`` is 0), in single precision, capped at
    100, and redraws the line on stdout when it moved by more than ``min_skip`` or is 0 or 100; ``end`` ends
    the line."""

    def __init__(self, enabled: bool, min_skip: float) -> None:
        self.enabled = enabled
        self.min_skip = min_skip
        self.current = 0.0
        self.last = 0.0

    def print(self, delta: float, max_: int) -> None:
        cur = _f32(delta) if max_ == 0 else _f32(self.current + _f32(_f32(_f32(delta) / 100) * max_))
        cur = min(cur, 100.0)
        self.current = cur
        if cur > _f32(self.last + self.min_skip) or cur < _f32(self.last - self.min_skip) \
                or cur in (0.0, 100.0):
            self.last = cur
            if self.enabled:
                sys.stdout.write("    (%3.2f/100%%)\r" % cur)  # noqa: UP031
                sys.stdout.flush()

    def end(self) -> None:
        if self.enabled:
            sys.stdout.write("\n")
            sys.stdout.flush()


def _valid_option_list(text: str) -> bool:
    """qemu-img's is_valid_option_list: not empty, no leading comma, a trailing one only escaped."""
    return bool(text) and not text.startswith(",") and (len(text) - len(text.rstrip(","))) % 2 == 0


def _cmd_rebase(argv: Sequence[str]) -> Job | int:
    from .ops import rebase as op

    parsed = _flags(argv, "hf:F:b:upt:T:qUc", ["help", "object=", "image-opts", "force-share", "compress"],
                    _table(_FMT, _SHARE, (("-F",), "backing_fmt", _text), (("-b",), "backing", _text),
                           (("-u",), "unsafe", None), (("-p",), "progress", None), (("-t",), "cache", _text),
                           (("-T",), "src_cache", _text), (("-q",), "quiet", None),
                           (("-c", "--compress"), "compress", None)))
    if parsed is None:
        return 0
    f, args = parsed
    fmt: str | None = f.get("fmt")
    backing: str | None = f.get("backing")
    backing_fmt: str | None = f.get("backing_fmt")
    cache: str = f.get("cache", "writeback")
    src_cache: str = f.get("src_cache", "writeback")
    unsafe, progress, quiet, share, compress = (
        bool(f.get(k)) for k in ("unsafe", "progress", "quiet", "share", "compress"))
    if len(args) != 1:
        raise UsageError("Expecting one image file name")
    if not unsafe and backing is None:
        raise UsageError("Must specify backing file (-b) or use unsafe mode (-u)")
    path = _name(args[0])
    meter = _QemuMeter(progress and not quiet, 2.0)
    meter.print(0, 100)

    def report(done: int, total: int) -> None:
        # one call per compared piece; qemu adds 100 / (its piece count) percent each time
        meter.print(_f32(100 / total) if total else 0.0, 100)

    async def job() -> int:
        try:
            try:
                await op.rebase(path, fmt, backing, backing_fmt, unsafe=unsafe, compress=compress,
                                force_share=share, cache=cache, src_cache=src_cache, progress=report)
            except op.BackingChangeError:
                meter.print(100, 0)  # the copy ran to its end before the header could not be changed
                raise
            meter.print(100, 0)
        except BlockError as exc:
            meter.end()
            return _all_lines(exc)
        meter.end()
        return 0
    return job


def _cmd_amend(argv: Sequence[str]) -> Job | int:
    from .ops import amend as op

    parsed = _flags(argv, "ho:f:t:pq", ["help", "object=", "image-opts", "force"], _table(
        _FMT, (("-o",), "o", _option_arg), (("-t",), "cache", _text), (("-p",), "progress", None),
        (("-q",), "quiet", None), (("--force",), "force", None)), many=("o",))
    if parsed is None:
        return 0
    f, args = parsed
    fmt: str | None = f.get("fmt")
    cache: str = f.get("cache", "writeback")
    options: str | None = ",".join(f["o"]) if "o" in f else None
    progress, quiet, force = (bool(f.get(k)) for k in ("progress", "quiet", "force"))
    if options is None:
        raise UsageError("Must specify options (-o)")
    meter = _QemuMeter(progress and not quiet, 1.0)
    try:
        if fmt is not None and op.wants_help(options):
            out(op.help_text(fmt))
            meter.end()
            return 0
        if len(args) != 1:
            raise ArgumentError("Expecting one image file name")
    except BlockError as exc:
        meter.end()
        return _all_lines(exc)
    path = _name(args[0])
    started = False

    def report(done: int, total: int) -> None:
        nonlocal started
        if total == 0:
            started = True
            meter.print(0, 0)
        else:
            meter.print(_f32(_f32(100 * _f32(done)) / _f32(total)), 0)

    async def job() -> int:
        try:
            try:
                res = await op.amend(path, fmt, options, force=force, cache=cache, progress=report)
            finally:
                if started:
                    meter.print(100, 0)
        except BlockError as exc:
            meter.end()
            return _all_lines(exc)
        if res.help is not None:
            out(res.help)
        meter.end()
        return 0
    return job


COMMANDS: dict[str, Callable[[Sequence[str]], Job | int]] = {
    "amend": _cmd_amend,
    "bench": _cmd_bench,
    "bitmap": _cmd_bitmap,
    "commit": _cmd_commit,
    "compare": _cmd_compare,
    "dd": _cmd_dd,
    "check": _cmd_check,
    "convert": _cmd_convert,
    "create": _cmd_create,
    "info": _cmd_info,
    "map": _cmd_map,
    "measure": _cmd_measure,
    "snapshot": _cmd_snapshot,
    "resize": _cmd_resize,
    "rebase": _cmd_rebase,
}


# Verbs that move data get uvloop; for the rest its import (10 ms) costs more than their loop work.
_UVLOOP_VERBS = frozenset({"convert", "commit", "bench"})


def _run(job: Job, verb: str) -> int:
    # One command on the loop: its I/O is done inline (hostio.inline_io), except bench's, whose queue
    # depth is the point of it.
    with contextlib.nullcontext() if verb == "bench" else hostio.inline_io():
        if verb in _UVLOOP_VERBS:
            try:
                import uvloop
            except ImportError:
                pass
            else:
                result: int = uvloop.run(job())
                return result
        return asyncio.run(job())


def _on_sigusr1(signum: int, frame: object) -> None:
    request_progress()


def _handle_sigusr1() -> None:
    """SIGUSR1 never kills us: qemu-img blocks it, except that convert without -p prints its progress."""
    try:
        signal.signal(signal.SIGUSR1, _on_sigusr1)
    except ValueError:
        pass  # not the main thread (main() called from a test's thread): leave the process's handler


def main(argv: Sequence[str] | None = None) -> int:
    _handle_sigusr1()
    register_all()
    if argv is None:
        progname.set_from_argv0(sys.argv[0] if sys.argv else None)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if not args:
            raise UsageError("Not enough arguments")
        verb = args[0]
        if verb in ("-h", "--help", "help"):
            out(_usage())
            return 0
        if verb in ("-V", "--version"):
            out(_version_text())
            return 0
        cmd = COMMANDS.get(verb)
        if cmd is None:
            raise UsageError(f"Command not found: {verb}")
        job = cmd(_global_options(verb, args[1:]))
        if isinstance(job, int):
            return job
        return _run(job, verb)
    except BlockError as exc:
        return _all_lines(exc)
    except KeyboardInterrupt:
        err("interrupted")
        return 130
    except BrokenPipeError:
        return 1
    except Exception as exc:  # the edge: no traceback ever reaches the user
        err(f"internal error: {type(exc).__name__}: {exc}")
        return 1
    finally:
        try:
            sys.stdout.flush()
        except (BrokenPipeError, ValueError):
            pass


if __name__ == "__main__":
    sys.exit(main())
