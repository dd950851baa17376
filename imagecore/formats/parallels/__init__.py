"""parallels: Parallels (ploop) disk images, both signatures; registers the format.

Only ``spec`` (layout, probe, create options) loads with the registry; the driver loads when first used.
"""

from __future__ import annotations

from ...driver import FormatSpec, lazy, register_format
from .spec import CREATE_OPTIONS, probe

register_format(FormatSpec(
    name="parallels",
    open=lazy(f"{__name__}.driver", "open_parallels"),
    probe=probe,
    create=lazy(f"{__name__}.driver", "create_parallels"),
    create_options=CREATE_OPTIONS,
    extensions=("parallels", "hds"),
    check=lazy(f"{__name__}.driver", "check_parallels"),
))
