"""What the registry needs before a vhdx image is opened: the signature, the probe, the create options."""

from __future__ import annotations

from ...driver import CreateOption

FILE_SIGNATURE = b"vhdxfile"

# qemu 7.2's vhdx_create_opts, in its order (the Formatting line follows it), with its help texts
CREATE_OPTIONS: tuple[CreateOption, ...] = (
    CreateOption("size", "size", "Virtual disk size; max of 64TB."),
    CreateOption("log_size", "size", "Log size; min 1MB.", "1048576"),
    CreateOption("block_size", "size", "Block Size; min 1MB, max 256MB. 0 means auto-calculate based on "
                 "image size.", "0"),
    CreateOption("subformat", "string", "VHDX format type, can be either 'dynamic' or 'fixed'. Default is "
                 "'dynamic'."),
    CreateOption("block_state_zero", "bool", "Force use of payload blocks of type 'ZERO'. Non-standard, but "
                 "default.  Do not set to 'off' when using 'qemu-img convert' with subformat=dynamic."),
)

def probe(buf: bytes, filename: str) -> int:
    """qemu's score: 100 for the file type identifier's signature."""
    return 100 if buf[:8] == FILE_SIGNATURE else 0
