"""The package version, read from one place: the `version` of pyproject.toml.

An installed package (wheel, sdist, editable) reads it from its distribution metadata, which the build
copied from pyproject.toml; a source checkout run with PYTHONPATH reads the checkout's pyproject.toml
itself, so that the version printed is the tree's own even when an older install is on the path too.
Looked up on demand only (`--version`, the admin greeting): importing importlib.metadata costs start-up.
"""

from __future__ import annotations

import functools
from pathlib import Path

DISTRIBUTION = "nbdsrv"


@functools.cache
def package_version() -> str:
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.is_file():
        import tomllib

        try:
            project = tomllib.loads(pyproject.read_text()).get("project", {})
        except (OSError, tomllib.TOMLDecodeError):
            project = {}
        if project.get("name") == DISTRIBUTION and isinstance(project.get("version"), str):
            return str(project["version"])
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "0+unknown"
