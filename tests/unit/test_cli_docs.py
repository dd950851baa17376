"""Generated doc tables are current: docs/cli.md's verb table (imagecore.docgen) and docs/pools.md's
`nbdsrv serve` option table (nbdsrv.docgen)."""

from __future__ import annotations

from imagecore.cli import COMMANDS
from imagecore.docgen import DOC, render, synopses


def test_cli_md_verb_table_is_current() -> None:
    text = DOC.read_text()
    assert render(text) == text, "run: python -m imagecore.docgen"


def test_every_verb_has_its_usage_line() -> None:
    assert set(COMMANDS) <= set(synopses())


def test_serve_option_table_is_current() -> None:
    from nbdsrv.docgen import DOC as POOLS_DOC
    from nbdsrv.docgen import render as render_pools

    text = POOLS_DOC.read_text()
    assert render_pools(text) == text, "run: python -m nbdsrv.docgen"
    assert "`--cow`" in text and "`--snapshot ID_OR_NAME`" in text
