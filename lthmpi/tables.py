"""Tables, rendered once: aligned plain text for terminals and markdown for reports.

Cells are shown with str(); numbers are formatted by the caller (results.py, analysis/science.py,
analysis/report.py, analysis/scaling_cli.py), which know what a column holds.
"""
from __future__ import annotations


def text_table(head: list[str], rows: list[list]) -> str:
    """Right-aligned columns separated by two spaces, the header first."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(cs, widths)) for cs in [head, *cells])


def markdown_table(head: list[str], rows: list[list], align: str = "---") -> str:
    """A markdown table; `align` is every column's separator cell ("---:" aligns right)."""
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(align for _ in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)
