"""The operator's tables, readable at any terminal width and when piped (rich then assumes 80 columns).

A short column (an id, a number, a status) is one line as wide as its widest cell and is never cut;
a text column (a reason, metrics) wraps, and folds a word longer than the column instead of cutting
it. When the width cannot hold every column so, the columns of lowest priority are left out and a
note under the table names them: ``--json`` or a wider terminal shows everything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table

#: A text column is not made narrower than this (or its header, or its longest word up to
#: ``WORD_MAX``) before lower-priority columns are left out.
TEXT_MIN = 12
WORD_MAX = 24
#: How narrow a text column may be squeezed when even the columns always shown do not fit.
TEXT_FLOOR = 6


@dataclass(frozen=True)
class Column:
    """A column of an operator's table.

    ``wrap``: long text that may take several lines (a reason, metrics); otherwise the column is
    one line as wide as its widest cell. ``priority``: 0 is always shown; the higher the number,
    the sooner the column is left out when the width cannot hold it.
    """

    header: str
    wrap: bool = False
    priority: int = 0


def border_width(columns: int) -> int:
    """What rich's default table spends beside its cells: a rule either side of every column
    and one space of padding either side of every cell."""
    return 3 * columns + 1


def _lines(text: str) -> list[str]:
    return text.splitlines() or [""]


def _natural(header: str, cells: Sequence[str]) -> int:
    """The width that shows the header and every cell on one line each."""
    return max(cell_len(line) for text in (header, *cells) for line in _lines(text))


def _minimum(column: Column, cells: Sequence[str], natural: int) -> int:
    """The narrowest a column is made before other columns are left out."""
    if not column.wrap:
        return natural
    words = [cell_len(w) for text in cells for w in text.split()]
    longest = min(max(words, default=0), WORD_MAX)
    return min(natural, max(cell_len(column.header), longest, TEXT_MIN))


def fit_columns(columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int) -> list[int | None]:
    """Each column's width (without padding) in a table ``width`` characters wide; ``None``: left out.

    Columns are taken by priority (then in order); one that does not fit beside those already
    taken is left out, unless its priority is 0. The room left over goes to the text columns, up
    to the width that shows their cells on one line, the narrowest first.
    """
    naturals = [_natural(c.header, [row[i] for row in rows]) for i, c in enumerate(columns)]
    minimums = [_minimum(c, [row[i] for row in rows], naturals[i]) for i, c in enumerate(columns)]
    widths: list[int | None] = [None] * len(columns)
    used = border_width(0)
    for i in sorted(range(len(columns)), key=lambda i: (columns[i].priority, i)):
        cost = minimums[i] + border_width(1) - border_width(0)
        if columns[i].priority == 0 or used + cost <= width:
            widths[i] = minimums[i]
            used += cost
    text = [i for i, c in enumerate(columns) if c.wrap and widths[i] is not None]
    # Too narrow even for the columns always shown: squeeze the text columns (they fold).
    while used > width:
        widest = max(text, key=lambda i: widths[i] or 0, default=None)
        if widest is None or (widths[widest] or 0) <= TEXT_FLOOR:
            break
        widths[widest] = (widths[widest] or 0) - 1
        used -= 1
    while used < width:
        short = [i for i in text if (widths[i] or 0) < naturals[i]]
        if not short:
            break
        # The narrowest grows first: a short text reaches one line a cell before a long one takes the rest.
        grow = min(short, key=lambda i: widths[i] or 0)
        widths[grow] = (widths[grow] or 0) + 1
        used += 1
    return widths


def build_table(
    columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int
) -> tuple[Table, list[str]]:
    """The table that fits ``width``, and the headers of the columns left out."""
    widths = fit_columns(columns, rows, width)
    shown = [i for i, w in enumerate(widths) if w is not None]
    wraps = any("\n" in row[i] for row in rows for i in shown) or any(
        _natural("", [row[i] for row in rows]) > (widths[i] or 0) for i in shown if columns[i].wrap
    )
    # Rows of several lines each run into one another without a rule between them.
    table = Table(show_lines=wraps)
    for i in shown:
        c = columns[i]
        table.add_column(c.header, width=widths[i], no_wrap=not c.wrap, overflow="fold")
    for row in rows:
        table.add_row(*(row[i] for i in shown))
    return table, [c.header for c, w in zip(columns, widths, strict=True) if w is None]


def left_out_note(headers: Sequence[str], width: int) -> str:
    """The line under a table that says which columns did not fit (shorter if the width needs it)."""
    names = ", ".join(headers)
    note = f"not shown: {names} (--json or a wider terminal shows every column)"
    return note if cell_len(note) <= width else f"not shown: {names}; --json shows all"


def print_table(out: Console, columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> None:
    """Print a table fitted to ``out``'s width (``COLUMNS``, or 80 when piped), and under it the
    note naming the columns left out, if any."""
    table, left_out = build_table(columns, rows, out.width)
    out.print(table)
    if left_out:
        out.print(left_out_note(left_out, out.width), style="dim")
