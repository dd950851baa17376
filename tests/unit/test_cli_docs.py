"""docs/cli.md's verb table is what imagecore.docgen writes from the CLI's own tables."""

from __future__ import annotations

from imagecore.cli import COMMANDS
from imagecore.docgen import DOC, render, synopses


def test_cli_md_verb_table_is_current() -> None:
    text = DOC.read_text()
    assert render(text) == text, "run: python -m imagecore.docgen"


def test_every_verb_has_its_usage_line() -> None:
    assert set(COMMANDS) <= set(synopses())
