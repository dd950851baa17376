"""The vmdk text descriptor: parsing (bounded, hostile-safe), rendering for create, and CID rewriting."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ...errors import ImageFormatError

# A descriptor is a few hundred bytes; anything near this is garbage or hostile.
MAX_DESCRIPTOR_BYTES = 1 << 20
MAX_EXTENTS = 4096
NO_PARENT_CID = 0xFFFFFFFF

# createType values accepted in a stand-alone descriptor file (the monolithic ones live inside a sparse file).
DESCRIPTOR_CREATE_TYPES = frozenset({
    "monolithicFlat", "vmfs", "vmfsSparse", "seSparse", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
})

EXTENT_TYPES = frozenset({"FLAT", "SPARSE", "ZERO", "VMFS", "VMFSSPARSE", "SESPARSE", "VMFSRDM", "VMFSRAW"})
ACCESS_MODES = frozenset({"RW", "RDONLY", "NOACCESS"})

_EXTENT_RE = re.compile(
    r'^(?P<access>[A-Z]+)\s+(?P<sectors>\d+)\s+(?P<type>[A-Z]+)'
    r'(?:\s+"(?P<name>[^"\r\n]*)"(?:\s+(?P<offset>\d+))?)?\s*$')
_KV_RE = re.compile(r'^(?P<key>[A-Za-z0-9_.]+)\s*=\s*(?P<value>.*?)\s*$')


@dataclass(frozen=True, slots=True)
class ExtentLine:
    """One line of the extent description: ``RW 20480 FLAT "disk-flat.vmdk" 0``."""

    access: str
    sectors: int
    type: str
    filename: str | None
    offset: int  # in sectors, FLAT extents only


@dataclass(slots=True)
class Descriptor:
    """The parsed fields of a descriptor; unknown keys are kept in ``other``."""

    version: int = 1
    cid: int = 0
    parent_cid: int = NO_PARENT_CID
    create_type: str = ""
    parent_hint: str | None = None
    extents: list[ExtentLine] = field(default_factory=list)
    ddb: dict[str, str] = field(default_factory=dict)
    other: dict[str, str] = field(default_factory=dict)


def decode_text(raw: bytes) -> str:
    """The descriptor text of a raw area: up to the first NUL (embedded ones are zero padded)."""
    nul = raw.find(b"\0")
    if nul >= 0:
        raw = raw[:nul]
    # surrogateescape keeps non-UTF-8 file names byte-exact for the host's path functions.
    return raw.decode("utf-8", errors="surrogateescape")


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        return value[1:-1]
    return value


def _hex32(key: str, value: str) -> int:
    try:
        n = int(value, 16)
    except ValueError:
        raise ImageFormatError(
            f"invalid VMDK image descriptor: {key} '{value[:40]}' is not hexadecimal") from None
    if not 0 <= n <= 0xFFFFFFFF:
        raise ImageFormatError(f"invalid VMDK image descriptor: {key} is out of range")
    return n


def parse_descriptor(text: str) -> Descriptor:
    """Parse a descriptor; raise ImageFormatError with a one-line message on garbage."""
    if len(text) > MAX_DESCRIPTOR_BYTES:
        raise ImageFormatError("invalid VMDK image descriptor: larger than 1 MiB")
    desc = Descriptor()
    seen_cid = False
    seen_type = False
    for raw_line in text.split("\n"):
        line = raw_line.strip(" \t\r")
        if not line or line.startswith("#"):
            continue
        m = _EXTENT_RE.match(line)
        if m is not None and m.group("access") in ACCESS_MODES:
            desc.extents.append(_extent_line(m, line))
            if len(desc.extents) > MAX_EXTENTS:
                raise ImageFormatError(f"invalid VMDK image descriptor: more than {MAX_EXTENTS} extents")
            continue
        kv = _KV_RE.match(line)
        if kv is None:
            # VMware tools ignore lines they do not know; so does qemu. Garbage is caught by the checks below.
            continue
        key, value = kv.group("key"), _unquote(kv.group("value"))
        if key == "version":
            try:
                desc.version = int(value)
            except ValueError:
                raise ImageFormatError(f"invalid VMDK image descriptor: version '{value[:40]}'") from None
        elif key == "CID":
            desc.cid, seen_cid = _hex32("CID", value), True
        elif key == "parentCID":
            desc.parent_cid = _hex32("parentCID", value)
        elif key == "createType":
            desc.create_type, seen_type = value, True
        elif key == "parentFileNameHint":
            desc.parent_hint = value or None
        elif key.startswith("ddb."):
            desc.ddb[key[4:]] = value
        else:
            desc.other[key] = value
    if not seen_type:
        raise ImageFormatError("invalid VMDK image descriptor")
    if not seen_cid:
        raise ImageFormatError("invalid VMDK image descriptor: no CID")
    return desc


def _extent_line(m: re.Match[str], line: str) -> ExtentLine:
    kind = m.group("type")
    name = m.group("name")
    offset_text = m.group("offset")
    if kind not in EXTENT_TYPES:
        if offset_text is not None:
            # qemu takes a line of five fields for a FLAT (or invalid) one
            raise ImageFormatError(f"Invalid extent line: {line[:200]}")
        raise ImageFormatError(f"Unsupported extent type '{kind[:16]}'")
    sectors = int(m.group("sectors"))
    if sectors <= 0 or sectors > 1 << 40:
        raise ImageFormatError(f"Invalid extent line: {line[:200]}")
    if kind == "ZERO":
        if name is not None:
            raise ImageFormatError(f"Invalid extent line: {line[:200]}")
        return ExtentLine(m.group("access"), sectors, kind, None, 0)
    if name is None or not name:
        raise ImageFormatError(f"Invalid extent line: {line[:200]}")
    if kind == "FLAT":
        if offset_text is None:
            raise ImageFormatError(f"Invalid extent line: {line[:200]}")
        offset = int(offset_text)
        if offset > 1 << 40:
            raise ImageFormatError(f"Invalid extent line: {line[:200]}")
    else:
        if offset_text is not None and not (kind == "VMFS" and int(offset_text) == 0):
            raise ImageFormatError(f"Invalid extent line: {line[:200]}")
        offset = 0
    return ExtentLine(m.group("access"), sectors, kind, name, offset)


def replace_cid(text: str, cid: int) -> str:
    """The descriptor text with its CID line set to ``cid``."""
    new, n = re.subn(r"(?m)^([ \t]*CID[ \t]*=[ \t]*)[^\r\n]*", lambda m: f"{m.group(1)}{cid:08x}", text,
                     count=1)
    if n == 0:
        raise ImageFormatError("invalid VMDK image descriptor: no CID")
    return new


def render_descriptor(*, cid: int, parent_cid: int, create_type: str, parent_hint: str | None,
                      extent_lines: list[str], hw_version: str, cylinders: int, heads: int,
                      adapter_type: str, tools_version: str) -> str:
    """A descriptor in the layout VMware and qemu-img write."""
    parts = [
        "# Disk DescriptorFile\n",
        "version=1\n",
        f"CID={cid:08x}\n",
        f"parentCID={parent_cid:08x}\n",
        f'createType="{create_type}"\n',
    ]
    if parent_hint is not None:
        parts.append(f'parentFileNameHint="{parent_hint}"\n')
    parts += ["\n", "# Extent description\n", *extent_lines, "\n",
              "# The Disk Data Base\n", "#DDB\n", "\n",
              f'ddb.virtualHWVersion = "{hw_version}"\n',
              f'ddb.geometry.cylinders = "{cylinders}"\n',
              f'ddb.geometry.heads = "{heads}"\n',
              'ddb.geometry.sectors = "63"\n',
              f'ddb.adapterType = "{adapter_type}"\n',
              f'ddb.toolsVersion = "{tools_version}"\n']
    return "".join(parts)
