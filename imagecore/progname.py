"""The program's name as invoked, for message prefixes: qemu-img's error_get_progname (basename of argv[0]).

Installed or linked as ``qemu-img``, imagecore's messages start ``qemu-img: `` as qemu-img's do, so that
scripts matching qemu-img's stderr keep working; run as ``imagecore`` or ``python -m imagecore.cli`` they
start ``imagecore: ``.
"""

from __future__ import annotations

import os

DEFAULT = "imagecore"
_name = DEFAULT


def set_from_argv0(argv0: str | None) -> str:
    """Take the name from ``argv[0]``; a Python file (``python -m imagecore.cli``) or nothing means the
    default."""
    global _name
    base = os.path.basename(argv0 or "")
    _name = DEFAULT if not base or base.endswith((".py", ".pyc")) or base == "-c" else base
    return _name


def name() -> str:
    return _name
