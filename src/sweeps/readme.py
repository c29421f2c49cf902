"""Generated blocks of the README: text between ``<!-- name:start -->`` and
``<!-- name:end -->`` that a command (the benchmark, the source-systems report) rewrites."""

from __future__ import annotations

from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_block(path: str | Path, name: str, text: str) -> None:
    """Replace the ``name`` block of the file at ``path`` with ``text``; the file must
    already have both markers (nothing is appended silently)."""
    start, end = markers(name)
    readme = Path(path).read_text(encoding="utf-8")
    head, sep, rest = readme.partition(start)
    _, sep2, tail = rest.partition(end)
    if not (sep and sep2):
        raise SystemExit(f"{path} has no {start} ... {end} block")
    Path(path).write_text(f"{head}{start}\n{text}\n{end}{tail}", encoding="utf-8")
