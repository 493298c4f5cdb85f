"""Plain-text tables for the command line (`quill models`, `quill cost`, `quill bench`)."""
from __future__ import annotations

from collections.abc import Sequence


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: bool = False) -> str:
    """Columns padded to their widest cell; with `numeric`, every column but the first is
    right-aligned so that digits line up."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [cell.rjust(width) if numeric and i else cell.ljust(width)
                 for i, (cell, width) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    return "\n".join(line(row) for row in (header, *rows))
