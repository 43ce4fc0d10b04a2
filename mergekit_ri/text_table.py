"""A two-column text table (label | value) in box-drawing characters, for `--dry-run`'s plan.

Drawn here rather than with rich's `Table`: importing rich's console and table took ~50 ms, a
sixth of a dry run, to draw eight rows of text. Values wrap at spaces (a word longer than the
column is broken) within the terminal's width, or 80 columns when the output is not a terminal.
"""

from __future__ import annotations

import shutil
import textwrap


def terminal_width() -> int:
    """$COLUMNS, else the terminal's width, else 80."""
    return shutil.get_terminal_size(fallback=(80, 24)).columns


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for paragraph in text.split("\n"):
        lines += textwrap.wrap(paragraph, width, break_on_hyphens=False, drop_whitespace=True) or [""]
    return lines


def two_column_table(title: str, rows: list[tuple[str, str]], width: int) -> str:
    """`title` centred over a boxed table of `rows`, no wider than `width` (or than the labels
    and one column of values, if that is wider)."""
    label_width = max((len(label) for label, _ in rows), default=0)
    widest_value = max((len(line) for _, value in rows for line in value.split("\n")), default=0)
    value_width = max(1, min(widest_value, width - label_width - 7))
    total = label_width + value_width + 7  # "│ " + label + " │ " + value + " │"
    out = [" " * ((total - len(title)) // 2) + title]
    out.append(f"┌{'─' * (label_width + 2)}┬{'─' * (value_width + 2)}┐")
    for label, value in rows:
        for i, line in enumerate(_wrap(value, value_width)):
            out.append(f"│ {(label if i == 0 else ''):<{label_width}} │ {line:<{value_width}} │")
    out.append(f"└{'─' * (label_width + 2)}┴{'─' * (value_width + 2)}┘")
    return "\n".join(out)
