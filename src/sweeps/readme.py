"""Generated blocks of the README: text between ``<!-- name:start -->`` and
``<!-- name:end -->`` that a command (the benchmark, the source-systems report) rewrites."""

from __future__ import annotations

import os
from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def _split(path: str | Path, name: str) -> tuple[str, str, str]:
    """(head, block, tail) of the file at ``path``; SystemExit naming the path when it cannot
    be read or has no ``name`` block."""
    start, end = markers(name)
    try:
        readme = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"cannot read {path} for its {start} block: {e}") from None
    head, sep, rest = readme.partition(start)
    block, sep2, tail = rest.partition(end)
    if not (sep and sep2):
        raise SystemExit(f"{path} has no {start} ... {end} block")
    return head, block, tail


def check_block(path: str | Path, name: str) -> None:
    """Fail now, before the work whose result goes there, if ``replace_block`` would fail
    later: the file cannot be read or written, or has no ``name`` block."""
    _split(path, name)
    if not os.access(path, os.W_OK):
        raise SystemExit(f"cannot write {path}: no write permission")


def replace_block(path: str | Path, name: str, text: str) -> None:
    """Replace the ``name`` block of the file at ``path`` with ``text``; the file must
    already have both markers (nothing is appended silently)."""
    start, end = markers(name)
    head, _, tail = _split(path, name)
    Path(path).write_text(f"{head}{start}\n{text}\n{end}{tail}", encoding="utf-8")
