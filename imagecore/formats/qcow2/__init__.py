"""qcow2: layout, table math, caches, allocator, the driver, create and check; registers the format.

Only ``spec`` loads with the registry; the driver, create and check modules load when first used.
"""

from __future__ import annotations

from ...driver import FormatSpec, lazy, register_format
from .spec import CREATE_OPTIONS, OPEN_OPTIONS, probe

register_format(FormatSpec(
    name="qcow2",
    open=lazy(f"{__name__}.driver", "open_qcow2"),
    probe=probe,
    create=lazy(f"{__name__}.create", "create_qcow2"),
    create_options=CREATE_OPTIONS,
    check=lazy(f"{__name__}.check", "check_qcow2"),
    extensions=("qcow2",),
    open_options=OPEN_OPTIONS,
))
