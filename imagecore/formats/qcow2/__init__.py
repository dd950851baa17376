"""qcow2: layout, table math, caches, allocator, the driver, create and check; registers the format."""

from __future__ import annotations

from ...driver import FormatSpec, register_format
from . import check as _check
from . import create as _create
from . import driver as _driver

register_format(FormatSpec(
    name="qcow2",
    open=_driver.open_qcow2,
    probe=_driver.probe,
    create=_create.create_qcow2,
    create_options=_create.CREATE_OPTIONS,
    check=_check.check_qcow2,
))
