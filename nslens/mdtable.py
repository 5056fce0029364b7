"""Markdown table cells for text nslens did not write: concept names and labels come from users' datasets, and
a ``|`` in one would end its cell early and shift every later column of the row; a line break would end the table.
"""

from __future__ import annotations

__all__ = ["cell"]


def cell(text: object) -> str:
    """``text`` as one GitHub-flavoured Markdown table cell: whitespace runs (line breaks included) become one
    space, and ``|`` is escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")
