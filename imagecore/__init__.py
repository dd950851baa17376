"""imagecore: the disk-image format core (raw, qcow2, vmdk) and its qemu-img-compatible command."""

from __future__ import annotations


def __getattr__(name: str) -> str:
    # The version lives in pyproject.toml (imagecore.version); looked up only when asked for.
    if name == "__version__":
        from .version import package_version

        return package_version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
