"""Plain-text tables: one formatter for every table a CLI prints."""
from __future__ import annotations

from typing import Sequence


def format_table(rows: Sequence[Sequence[object]], header: Sequence[str] | None = None, rule: bool = True,
                 align_right: Sequence[int] = ()) -> str:
    """Column-aligned text; `header` (if given) is followed by a dashed rule; columns in `align_right` are
    right-aligned (numbers), the rest left-aligned; trailing spaces are stripped."""
    table = [list(map(str, header))] if header is not None else []
    table += [[str(c) for c in row] for row in rows]
    if not table:
        return ""
    widths = [max(len(r[i]) for r in table if i < len(r)) for i in range(max(len(r) for r in table))]
    right = set(align_right)

    def line(row):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    lines = [line(r) for r in table]
    if header is not None and rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A GitHub-markdown table (the README's form) of `rows` under `header`."""
    line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"  # noqa: E731
    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])
