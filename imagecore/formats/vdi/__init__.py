"""vdi: VirtualBox disk images, dynamic and static; registers the format.

Only ``spec`` (layout, probe, create options) loads with the registry; the driver loads when first used.
"""

from __future__ import annotations

from ...driver import FormatSpec, lazy, register_format
from .spec import CREATE_OPTIONS, probe

register_format(FormatSpec(
    name="vdi",
    open=lazy(f"{__name__}.driver", "open_vdi"),
    probe=probe,
    create=lazy(f"{__name__}.driver", "create_vdi"),
    create_options=CREATE_OPTIONS,
    extensions=("vdi",),
    check=lazy(f"{__name__}.driver", "check_vdi"),
))
