"""nbdsrv: an NBD server exporting the images of directory pools."""

from __future__ import annotations


def __getattr__(name: str) -> str:
    # The version lives in pyproject.toml (imagecore.version); looked up only when asked for.
    if name == "__version__":
        from imagecore.version import package_version

        return package_version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
