"""Generated regions of the Markdown docs: the text between two marker comments, rewritten from the code.

The doc generators of both packages (``imagecore.docgen``, ``nbdsrv.docgen``, ``nbdsrv.admin.docgen``)
write their tables through :func:`replace_region`; a test per table compares the file with what it would
write, so a table cannot go stale. This module imports nothing of either package.
"""

from __future__ import annotations


def replace_region(text: str, begin: str, end: str, body: str, *, doc: str) -> str:
    """``text`` with what lies between the ``begin`` and ``end`` markers replaced by ``body``.

    ``doc`` names the file in the error raised when a marker is missing.
    """
    head, sep, rest = text.partition(begin)
    if not sep:
        raise ValueError(f"{doc} has no '{begin}' marker")
    _, sep, tail = rest.partition(end)
    if not sep:
        raise ValueError(f"{doc} has no '{end}' marker")
    return f"{head}{begin}\n{body}{end}{tail}"
