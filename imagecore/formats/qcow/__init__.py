"""qcow: QEMU's first copy-on-write format (version 1), with backing files and compressed clusters;
registers the format. qemu has no consistency check for it, so neither does imagecore (exit 63).

Only ``spec`` loads with the registry; the driver loads when first used.
"""

from __future__ import annotations

from ...driver import FormatSpec, lazy, register_format
from .spec import CREATE_OPTIONS, probe

register_format(FormatSpec(
    name="qcow",
    open=lazy(f"{__name__}.driver", "open_qcow"),
    probe=probe,
    create=lazy(f"{__name__}.driver", "create_qcow"),
    create_options=CREATE_OPTIONS,
    extensions=("qcow",),
    open_options=("backing", "encrypt"),
))
