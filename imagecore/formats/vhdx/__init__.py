"""vhdx (Hyper-V's format, MS-VHDX 1.0): fixed and dynamic images, their metadata log; registers the format.

Only ``spec`` loads with the registry; the rest loads when first used.
"""

from __future__ import annotations

from ...driver import FormatSpec, lazy, register_format
from .spec import CREATE_OPTIONS, probe

register_format(FormatSpec(
    name="vhdx",
    open=lazy(f"{__name__}.driver", "open_vhdx"),
    probe=probe,
    create=lazy(f"{__name__}.create", "create_vhdx"),
    create_options=CREATE_OPTIONS,
    extensions=("vhdx",),
    check=lazy(f"{__name__}.driver", "check_vhdx"),
))
