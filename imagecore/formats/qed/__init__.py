"""qed: QEMU Enhanced Disk images (two-level tables, backing files); registers the format.

Only ``spec`` loads with the registry; the driver loads when first used.
"""

from __future__ import annotations

from ...driver import FormatSpec, lazy, register_format
from .spec import CREATE_OPTIONS, probe

register_format(FormatSpec(
    name="qed",
    open=lazy(f"{__name__}.driver", "open_qed"),
    probe=probe,
    create=lazy(f"{__name__}.driver", "create_qed"),
    create_options=CREATE_OPTIONS,
    extensions=("qed",),
    open_options=("backing",),
    check=lazy(f"{__name__}.driver", "check_qed"),
))
