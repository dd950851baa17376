"""vmdk: descriptor, sparse extents and stream-optimized images; registers the format."""

from __future__ import annotations

from ...driver import FormatSpec, register_format
from . import driver as _driver

register_format(FormatSpec(
    name="vmdk",
    open=_driver.open_vmdk,
    probe=_driver.probe,
    create=getattr(_driver, "create_vmdk", None),
    create_options=getattr(_driver, "CREATE_OPTIONS", ()),
    check=getattr(_driver, "check_vmdk", None),
))
