"""luks: a LUKS1 volume holding the guest's disk, as qemu's ``luks`` driver reads and writes it;
registers the format.

Only ``spec`` (with the probe) loads with the registry; the driver and the ciphers load when first used.
"""

from __future__ import annotations

from ...driver import FormatSpec, lazy, register_format
from .spec import CREATE_OPTIONS, probe

register_format(FormatSpec(
    name="luks",
    open=lazy(f"{__name__}.driver", "open_luks"),
    probe=probe,
    create=lazy(f"{__name__}.driver", "create_luks"),
    create_options=CREATE_OPTIONS,
    extensions=("luks",),
    open_options=("key-secret",),
    check=lazy(f"{__name__}.driver", "check_luks"),
))
