"""Result tables, rendered as rich tables, plain aligned text or Markdown.

A table is data first (title, columns, rows of already formatted cells,
notes), so the same object feeds the terminal, the README (Markdown) and the
JSON output. The first `left` columns are labels (left-aligned), the others
numbers (right-aligned).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    left: int = 1

    def add(self, *cells: object) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{self.title}: {len(cells)} cells for {len(self.columns)} columns")
        self.rows.append([str(c) for c in cells])

    def as_dict(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": self.rows,
                "notes": self.notes}

    def plain(self) -> str:
        widths = [max(len(r[i]) for r in [self.columns, *self.rows])
                  for i in range(len(self.columns))]

        def line(cells: list[str]) -> str:
            return "  ".join(c.ljust(w) if i < self.left else c.rjust(w)
                             for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

        out = [self.title, "=" * len(self.title), line(self.columns),
               "  ".join("-" * w for w in widths)]
        out += [line(r) for r in self.rows]
        out += [f"  {n}" for n in self.notes]
        return "\n".join(out) + "\n"

    def markdown(self) -> str:
        def esc(c: str) -> str:
            return c.replace("|", r"\|")

        out = [f"#### {self.title}", "", "| " + " | ".join(map(esc, self.columns)) + " |",
               "|" + "|".join(":---" if i < self.left else "---:"
                              for i in range(len(self.columns))) + "|"]
        out += ["| " + " | ".join(map(esc, r)) + " |" for r in self.rows]
        if self.notes:
            out += ["", *(f"{n}  " for n in self.notes)]
        return "\n".join(out) + "\n"

    def rich(self) -> Any:
        from rich.table import Table as RichTable

        t = RichTable(title=self.title, title_style="bold", title_justify="left",
                      caption="\n".join(self.notes) or None, caption_justify="left")
        for i, c in enumerate(self.columns):
            t.add_column(c, justify="left" if i < self.left else "right",
                         style="bold" if i == 0 else None)
        for r in self.rows:
            t.add_row(*(_styled(c) for c in r))
        return t


def _styled(cell: str) -> str:
    from rich.markup import escape

    text = escape(cell)
    if cell == "PASS":
        return f"[bold green]{text}[/]"
    if cell == "FAIL":
        return f"[bold red]{text}[/]"
    return text


def render(tables: list[Table], fmt: str) -> str:
    """All tables in `fmt`: "markdown", "plain" or "rich" (rich renders to a string)."""
    if fmt == "markdown":
        return "\n".join(t.markdown() for t in tables)
    if fmt == "plain":
        return "\n".join(t.plain() for t in tables)
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=_width())
    for t in tables:
        console.print(t.rich())
        console.print()
    return buf.getvalue()


def _width() -> int:
    import shutil

    return max(100, shutil.get_terminal_size((140, 40)).columns)
