"""`ri-merge demo --ri`: the RI demo's table and JSON, its recipe, and that RI beats the plain merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

pytest.importorskip("transformers")
from mergekit_ri.api import load_recipe  # noqa: E402
from mergekit_ri.demo_ri import (  # noqa: E402
    FULL,
    MARKER,
    ROW_NAMES,
    ROWS,
    DemoReport,
    prepare_folder,
    recipe_text,
    render_table,
)
from mergekit_ri.demo_tasks import make_auxiliary, make_tasks  # noqa: E402

# RI + task arithmetic beats plain task arithmetic on the average by at least this much in the
# quick run (measured: 42.5 → 50.1 %, +7.6 points; see docs/heads-and-ri.md)
MARGIN = 0.04


def test_quick_needs_ri_and_a_foreign_folder_is_refused(tmp_path):
    result = run_cli("demo", "--quick", "--dir", tmp_path / "d")
    assert result.code == 2 and "--ri" in result.stderr and not (tmp_path / "d").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    result = run_cli("demo", "--ri", "--quick", "--dir", mine)
    assert result.code == 2 and str(mine) in result.stderr, result.stderr
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    previous = tmp_path / "previous"  # a folder of an earlier run is replaced
    prepare_folder(previous)
    (previous / "old").write_text("")
    prepare_folder(previous)
    assert [p.name for p in previous.iterdir()] == [MARKER]


def test_the_data_is_seeded_and_shaped_for_the_model():
    first, again = make_tasks(FULL.tasks, 40, 10, 0), make_tasks(FULL.tasks, 40, 10, 0)
    for a, b in zip(first, again):
        assert a.train_x.shape == (40, 1, 16, 16) and a.test_x.shape == (10, 1, 16, 16)
        assert a.train_x.equal(b.train_x) and a.test_y.equal(b.test_y)
        assert -1 <= a.train_x.min() and a.train_x.max() <= 1
    assert make_auxiliary(16, 0).equal(make_auxiliary(16, 0)) and not make_auxiliary(16, 0).equal(
        make_auxiliary(16, 1)
    )


def test_the_recipes_parse_and_differ_only_by_ri(tmp_path):
    tasks = make_tasks(FULL.tasks, 8, 4, 0)
    with_ri = load_recipe(recipe_text(FULL, tasks, tmp_path, ri=True))
    plain = load_recipe(recipe_text(FULL, tasks, tmp_path, ri=False))
    assert with_ri.merge_method == plain.merge_method == "task_arithmetic"
    assert [m.model for m in with_ri.models] == [f"expert_{t}" for t in FULL.tasks]
    assert plain.resolve_interference is None and with_ri.resolve_interference is not None
    assert with_ri.resolve_interference.steps == FULL.ri_steps
    assert with_ri.model_copy(update={"resolve_interference": None}) == plain


def test_the_table_has_a_row_per_model_and_a_column_per_task(tmp_path):
    from rich.console import Console

    rows = {row: {"a": 0.5, "b": 0.25, "average": 0.375} for row in ROWS}
    report = DemoReport(
        rows, {"without_ri": 2.0, "with_ri": 1.0}, 1.0, tmp_path, tmp_path / "r.yaml", tmp_path
    )
    console = Console(record=True, width=200)
    console.print(render_table(report))
    text = console.export_text()
    assert all(ROW_NAMES[row] in text for row in ROWS) and "average" in text and "37.5" in text


@pytest.mark.slow
def test_quick_demo_ri_beats_the_plain_merge(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli("demo", "--ri", "--quick", "--json", "--dir", tmp_path / "demo")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) >= {"rows", "interference", "seconds"}
    tasks = set(FULL.tasks)
    assert set(report["rows"]) == set(ROWS)
    for row, scores in report["rows"].items():
        assert set(scores) == tasks | {"average"}, row
        assert scores["average"] == pytest.approx(sum(scores[t] for t in tasks) / len(tasks), abs=1e-3)
        assert all(0 <= v <= 1 for v in scores.values())
    rows = report["rows"]
    assert rows["experts"]["average"] > rows["base"]["average"]
    assert rows["ri_merge"]["average"] >= rows["merge"]["average"] + MARGIN, rows
    xi = report["interference"]
    assert 0 < xi["with_ri"] < xi["without_ri"]
    # the recipe it ran is beside the models, and `ri-merge` reruns it (its RI cache: no training)
    recipe = Path(report["recipe"])
    assert recipe.parent == tmp_path / "demo"
    again = run_cli("merge", recipe, "-o", tmp_path / "again", "--json")
    assert again.code == 0, again.stderr
    assert json.loads(again.stdout)["ri"]["trained"] == []
