"""The merge-quality benchmark, end to end in --small mode (about a minute on two cores).

It runs the script as a user would — pretraining, probe heads, experts, merges through the real
`ri-merge` CLI, evaluation through `load_with_head` — and checks what must hold at any scale:
fine-tuning helps each task, some merge beats the pretrained model, merges never touch the task
heads, and a method's row comes out the same when merged and evaluated again from scratch.
Part of the normal suite on purpose: it is the only test that runs the heads feature through
transformers on trained models.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # minutes on two cores; `-m 'not slow'` skips it

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_quality.py"
METHODS = "task_arithmetic,ties"


def bench(out: Path, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--small", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "quality.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict]:
    """The first run builds everything; the second merges and evaluates task arithmetic again."""
    out = tmp_path_factory.mktemp("quality")
    first = bench(out, "--methods", METHODS)
    again = bench(out, "--methods", "task_arithmetic", "--rerun-merges")
    return first, again


def rows(report: dict, kind: str | None = None) -> list[dict]:
    return [r for r in report["rows"] if kind is None or r["kind"] == kind]


def test_every_method_has_rows(runs):
    first, _ = runs
    methods = {r["method"] for r in rows(first) if r["method"]}
    assert methods == set(METHODS.split(","))
    assert {r["kind"] for r in rows(first)} == {"pretrained", "experts", "default", "tuned"}


def test_experts_beat_the_pretrained_model_on_their_own_tasks(runs):
    first, _ = runs
    (pretrained,), (experts,) = rows(first, "pretrained"), rows(first, "experts")
    for task in first["tasks"]:
        assert experts["test"][task] > pretrained["test"][task], task


def test_best_merge_beats_the_pretrained_model_on_average(runs):
    first, _ = runs
    (pretrained,) = rows(first, "pretrained")
    best = max(rows(first, "tuned"), key=lambda r: r["average"])
    assert best["average"] > pretrained["average"], (best["name"], best["average"], pretrained["average"])


def test_merges_leave_every_head_untouched(runs):
    first, _ = runs
    merged = [r for r in rows(first) if r["method"]]
    assert merged and all(r["heads_untouched"] is True for r in merged)


def test_a_method_row_is_reproducible_run_to_run(runs):
    first, again = runs
    before = {r["name"]: r for r in rows(first) if r["method"] == "task_arithmetic"}
    after = {r["name"]: r for r in rows(again) if r["method"] == "task_arithmetic"}
    assert before.keys() == after.keys() and before
    for name in before:
        assert after[name]["test"] == before[name]["test"], name
        assert after[name]["val"] == before[name]["val"], name
