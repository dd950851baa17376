"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagecore.formats import register_all

# the tests open images in-process: they register the formats as the programs do at start
register_all()


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A scratch folder for images."""
    return tmp_path
