"""qcow2: layout, table math, caches, allocator, the driver, create and check; registers the format."""

from __future__ import annotations

from ...driver import FormatSpec, register_format
from .check import check_qcow2
from .create import CREATE_OPTIONS, create_qcow2
from .driver import open_qcow2, probe

register_format(FormatSpec(
    name="qcow2",
    open=open_qcow2,
    probe=probe,
    create=create_qcow2,
    create_options=CREATE_OPTIONS,
    check=check_qcow2,
))
