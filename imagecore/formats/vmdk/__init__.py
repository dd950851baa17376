"""vmdk: descriptor, sparse extents and stream-optimized images; registers the format.

Only ``spec`` (with the descriptor probe) loads with the registry; the rest loads when first used.
"""

from __future__ import annotations

from ...driver import FormatSpec, lazy, register_format
from .spec import CREATE_OPTIONS, probe

register_format(FormatSpec(
    name="vmdk",
    open=lazy(f"{__name__}.driver", "open_vmdk"),
    probe=probe,
    create=lazy(f"{__name__}.create", "create_vmdk"),
    create_options=CREATE_OPTIONS,
    check=lazy(f"{__name__}.driver", "check_vmdk"),
    extensions=("vmdk",),
    open_options=("backing",),
))
