"""What the registry needs before a vmdk image is opened: the magics, the probe, the create options."""

from __future__ import annotations

from ...driver import CreateOption

MAGIC = b"KDMV"
COWD_MAGIC = b"COWD"

# in qemu 7.2's order (vmdk_create_opts), with the defaults its "Formatting ..." line shows
CREATE_OPTIONS: tuple[CreateOption, ...] = (
    CreateOption("size", "size", "Virtual disk size"),
    CreateOption("adapter_type", "string",
                 "Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX"),
    CreateOption("backing_file", "string", "File name of a base image"),
    CreateOption("backing_fmt", "string", "Must be 'vmdk' if present"),
    CreateOption("compat6", "bool", "VMDK version 6 image", "off"),
    CreateOption("hwversion", "string", "VMDK hardware version", "undefined"),
    CreateOption("toolsversion", "string", "VMware guest tools version"),
    CreateOption("subformat", "string",
                 "VMDK flat extent format, can be one of {monolithicSparse (default) | monolithicFlat | "
                 "twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized} "),
    CreateOption("zeroed_grain", "bool", "Enable efficient zero writes using the zeroed-grain GTE feature"),
)


def probe(buf: bytes, filename: str) -> int:
    """qemu's score: 100 for a sparse magic or a text descriptor, else 0."""
    if buf[:4] in (MAGIC, COWD_MAGIC):
        return 100
    return 100 if probe_descriptor(buf) else 0


def probe_descriptor(buf: bytes) -> bool:
    """True when ``buf`` starts like a text descriptor: comments and blank lines, then ``version=1|2|3``."""
    for line in buf.splitlines(keepends=True):
        if line.startswith(b"#"):
            continue
        body = line.rstrip(b"\r\n")
        if not line.endswith(b"\n"):
            return False
        if body and not body.strip(b" "):
            continue
        return body in (b"version=1", b"version=2", b"version=3")
    return False
