"""vpc: Virtual PC / Hyper-V VHD images, fixed and dynamic; registers the format.

Only ``spec`` (layout, probe, create options) loads with the registry; the driver loads when first used.
"""

from __future__ import annotations

from ...driver import FormatSpec, lazy, register_format
from .spec import CREATE_OPTIONS, probe

register_format(FormatSpec(
    name="vpc",
    open=lazy(f"{__name__}.driver", "open_vpc"),
    probe=probe,
    create=lazy(f"{__name__}.driver", "create_vpc"),
    create_options=CREATE_OPTIONS,
    extensions=("vpc", "vhd"),
    open_options=("force_size_calc",),
))
