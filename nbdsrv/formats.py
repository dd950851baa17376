"""The image formats the server knows: imagecore's format registry, registered here for the server's
processes, and Proxmox VE's rule for pool disks, stated once.

Pools take a format from a file's extension and never probe: a guest disk or template (``images/``) is
one of ``POOL_DISK_FORMATS`` (Proxmox VE's dir storage takes raw, qcow2 and vmdk images); a file in a
pool's ``import/`` directory (Proxmox VE 8's import content type) may be of any registered format, and is
only ever read. A single ``--image`` (``nbdsrv serve --image``, ``nbdsrv qemu-nbd``) may be of any
registered format, read-write, as qemu-nbd serves it.
"""

from __future__ import annotations

from typing import Literal, get_args

from imagecore.driver import format_of_extension, get_format
from imagecore.formats import register_all

# Proxmox VE's rule: the formats of a pool's guest disks and templates (and of the disks the admin
# socket creates in a pool). The admin commands' arguments take this type, so the rule is written once.
PoolDiskFormat = Literal["raw", "qcow2", "vmdk"]
POOL_DISK_FORMATS: tuple[str, ...] = get_args(PoolDiskFormat)


def image_formats() -> list[str]:
    """Every registered format, sorted: what ``--image``, ``--format`` and qemu-nbd's ``-f`` take."""
    return register_all()


def pool_disk_extensions() -> dict[str, str]:
    """Extension -> format for a pool's guest disks and templates (``vm-100-disk-0.qcow2``)."""
    register_all()
    return {ext: fmt for fmt in POOL_DISK_FORMATS for ext in get_format(fmt).extensions}


def format_of_file(name: str) -> str | None:
    """The registered format ``name``'s extension gives (any format, as import/ takes them), or None;
    the file is never read."""
    register_all()
    return format_of_extension(name)
