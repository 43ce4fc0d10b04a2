"""`--dry-run`'s plan table is drawn without rich: the text rich's `Table` draws, except that a
word wider than the column (a long path) is folded onto the next lines instead of cut with '…'."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from rich.table import Table

from mergekit_ri.text_table import two_column_table

ROWS = [
    ("base", "/models/base"),
    ("models", "/models/expert1\n/models/expert2"),
    (
        "output shards",
        "model-00001-of-00002.safetensors  12 tensors, 4.02 GB\nmodel-00002-of-00002.safetensors  9 tensors, 1.50 GB",
    ),
    (
        "peak memory (planned)",
        "612.0 MiB: 372.0 MiB of tensors + ~240.0 MiB runtime\ncap 8.00 GiB (--max-memory)",
    ),
    ("layers", "0-1: a[0:2] b[0:2]\n2: a[2:3]"),
]


def _rich(title: str, rows: list[tuple[str, str]], width: int) -> str:
    table = Table(title=title, show_header=False)
    for label, value in rows:
        table.add_row(label, value)
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None).print(table)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())


@pytest.mark.parametrize("width", [120, 80, 60])
@pytest.mark.parametrize("rows", [ROWS, ROWS[:2], [("read", "60 KB")]], ids=["all", "two", "one"])
def test_the_table_is_the_one_rich_draws(rows, width):
    ours = "\n".join(line.rstrip() for line in two_column_table("Merge plan: ties", rows, width).splitlines())
    assert ours == _rich("Merge plan: ties", rows, width)


@pytest.mark.parametrize("width", [40, 20])
def test_a_narrow_terminal_keeps_every_character_and_the_labels_whole(width):
    """Where rich would also narrow the labels (and cut words), the values alone give way."""
    lines = two_column_table("Merge plan: ties", ROWS, width).splitlines()[1:]
    assert max(len(line) for line in lines) == max(width, len("peak memory (planned)") + 8)
    cells = [line.split("│")[1:3] for line in lines if line.startswith("│")]
    assert [label.strip() for label, _ in cells if label.strip()] == [label for label, _ in ROWS]
    shown = "".join(value for _, value in cells).replace(" ", "")
    assert shown == "".join(value for _, value in ROWS).replace(" ", "").replace("\n", "")


def test_a_word_longer_than_the_column_is_folded_whole_where_rich_cuts_it():
    path = "/data/" + "x" * 95 + "/expert"
    lines = two_column_table("t", [("models", path)], 60).splitlines()[2:-1]
    assert "".join(line.split("│")[2].strip() for line in lines) == path
    assert {len(line) for line in lines} == {60}
