"""vmdk: descriptor, sparse extents and stream-optimized images; registers the format."""

from __future__ import annotations

from ...driver import FormatSpec, register_format
from .driver import CREATE_OPTIONS, check_vmdk, create_vmdk, open_vmdk, probe

register_format(FormatSpec(
    name="vmdk",
    open=open_vmdk,
    probe=probe,
    create=create_vmdk,
    create_options=CREATE_OPTIONS,
    check=check_vmdk,
))
