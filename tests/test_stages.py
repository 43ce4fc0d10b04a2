"""Multi-stage recipes (mergekit-multi's format): stages in dependency order, earlier stages as
models, intermediates reused when unchanged, every reference checked before any stage runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import (
    assert_nothing_written,
    assert_user_error,
    read_any,
    read_checkpoint,
    run_cli,
    tree_digest,
)

import mergekit_ri as m
from mergekit_ri.events import MergeEvents


def documents(*docs: dict) -> str:
    return "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs)


def three_stages(family: dict[str, Path]) -> list[dict]:
    first = {
        "name": "soup",
        "merge_method": "linear",
        "models": [{"model": str(family["a"])}, {"model": str(family["b"])}],
    }
    second = {
        "name": "arith",
        "merge_method": "task_arithmetic",
        "base_model": str(family["base"]),
        "models": [{"model": "soup"}, {"model": str(family["c"])}],
        "parameters": {"lambda": 0.5},
    }
    final = {
        "merge_method": "ties",
        "base_model": str(family["base"]),
        "models": [{"model": "arith"}, {"model": str(family["a"])}],
        "parameters": {"density": 0.5},
    }
    return [first, second, final]


def same(left: Path, right: Path) -> None:
    a, b = read_checkpoint(left), read_checkpoint(right)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].equal(b[name]), name


def test_stages_equal_the_merges_run_one_by_one(tmp_path: Path, family) -> None:
    first, second, final = three_stages(family)
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(documents(final, second, first))  # any order: they run by dependency
    result = run_cli("merge", recipe, "-o", tmp_path / "out")
    assert result.code == 0, result.stderr

    by_hand = tmp_path / "by-hand"
    m.merge({k: v for k, v in first.items() if k != "name"}, by_hand / "soup")
    second = {k: v for k, v in second.items() if k != "name"}
    second["models"][0]["model"] = str(by_hand / "soup")
    m.merge(second, by_hand / "arith")
    final["models"][0]["model"] = str(by_hand / "arith")
    m.merge(final, by_hand / "final")
    same(tmp_path / "out", by_hand / "final")
    assert [p.name for p in tmp_path.iterdir() if "ri-merge" in p.name] == []  # intermediates removed


class Stages(MergeEvents):
    def __init__(self) -> None:
        self.stages: list[str | None] = []
        self.warnings: list[str] = []

    def on_stage(self, name, index, count, out) -> None:
        self.stages.append(name)

    def on_warning(self, text: str) -> None:
        self.warnings.append(text)


def test_kept_intermediates_are_reused_until_an_input_changes(tmp_path: Path, family) -> None:
    text = documents(*three_stages(family))
    options = m.MergeOptions(intermediate_dir=tmp_path / "inter", force=True)
    events = Stages()
    m.merge(text, tmp_path / "out", options=options, events=events)
    assert events.stages == ["soup", "arith", None]
    assert {p.name for p in (tmp_path / "inter").iterdir() if not p.name.startswith(".")} == {"soup", "arith"}
    first = read_checkpoint(tmp_path / "out")

    again = Stages()
    m.merge(text, tmp_path / "out", options=options, events=again)
    assert sum("reusing" in w for w in again.warnings) == 2
    same(tmp_path / "out", tmp_path / "out")
    assert all(read_checkpoint(tmp_path / "out")[n].equal(t) for n, t in first.items())

    shard = next(family["b"].glob("*.safetensors"))  # same names and shapes, new bytes
    raw = bytearray(shard.read_bytes())
    raw[-2] ^= 0x01
    shard.write_bytes(bytes(raw))
    changed = Stages()
    m.merge(text, tmp_path / "out", options=options, events=changed)
    assert not any("reusing" in w for w in changed.warnings)  # soup read b; arith read soup


def test_dry_run_lists_the_stages_in_order(tmp_path: Path, family) -> None:
    report = m.plan(documents(*reversed(three_stages(family))))
    assert [s["name"] for s in report.summary()["stages"]] == ["soup", "arith", None]
    assert [s["needs"] for s in report.summary()["stages"]] == [[], ["soup"], ["arith"]]


@pytest.mark.parametrize(
    "case, needle",
    [
        ("typo", "stage name"),
        ("cycle", "cycle"),
        ("two unnamed", "no name"),
        ("duplicate", "two stages"),
        ("two finals", "all final"),
    ],
)
def test_bad_stage_graphs_fail_before_any_stage_runs(tmp_path: Path, family, case: str, needle: str) -> None:
    first, second, final = three_stages(family)
    if case == "typo":
        second["models"][0]["model"] = "soupp"
    elif case == "cycle":
        first["models"][0]["model"] = "arith"
    elif case == "two unnamed":
        del second["name"]
        final["models"][0]["model"] = str(family["b"])
    elif case == "duplicate":
        second["name"] = "soup"
    else:
        final["name"] = "last"
        final["models"][0]["model"] = str(family["b"])
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(documents(first, second, final))
    before = tree_digest(*family.values())
    assert_user_error(run_cli("merge", recipe, "-o", tmp_path / "out"), needle)
    assert_nothing_written(tmp_path / "out")
    assert tree_digest(*family.values()) == before


def test_a_bad_later_stage_stops_before_the_first_runs(tmp_path: Path, family) -> None:
    first, second, final = three_stages(family)
    final["models"][1]["model"] = str(tmp_path / "missing")
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(documents(first, second, final))
    assert_user_error(run_cli("merge", recipe, "-o", tmp_path / "out"), "final stage", "missing")
    assert [p.name for p in tmp_path.iterdir() if "ri-merge" in p.name] == []


def test_cli_runs_stages_with_a_kept_intermediate_dir_and_shows_them(tmp_path: Path, family) -> None:
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(documents(*three_stages(family)))
    dry = run_cli("merge", recipe, "-o", tmp_path / "out", "--dry-run")
    assert dry.code == 0 and "1. soup: linear" in dry.stdout and "3. final: ties (uses arith)" in dry.stdout
    args = (
        "merge",
        recipe,
        "--out-path",
        tmp_path / "out",
        "--intermediate-dir",
        tmp_path / "inter",
        "--force",
    )
    first = run_cli(*args)
    assert first.code == 0, first.stderr
    assert "stage 1/3 'soup'" in first.stderr and "stage 3/3 final" in first.stderr
    again = run_cli(*args)
    assert again.code == 0 and again.stderr.count("reusing") == 2, again.stderr


def test_a_sliced_stage_takes_an_earlier_stage_as_a_source(tmp_path: Path, family) -> None:
    """A frankenmerge of a merge: the final stage's slices read the 'soup' stage's layers."""
    first = three_stages(family)[0]
    final = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "soup", "layer_range": [0, 2]}]},
            {"sources": [{"model": str(family["a"]), "layer_range": [1, 3]}]},
        ],
    }
    out = tmp_path / "out"
    m.merge(documents(first, final), out)
    m.merge({k: v for k, v in first.items() if k != "name"}, tmp_path / "soup")
    merged, soup, a = read_checkpoint(out), read_checkpoint(tmp_path / "soup"), read_any(family["a"])
    layer = "model.layers.{}.mlp.up_proj.weight"
    assert merged[layer.format(1)].equal(soup[layer.format(1)].to(merged[layer.format(1)].dtype))
    assert merged[layer.format(3)].equal(a[layer.format(2)].to(merged[layer.format(3)].dtype))


def test_a_slice_base_model_may_name_an_earlier_stage(tmp_path: Path, family) -> None:
    """The stage's output replaces its name in a slice's base_model too, and is a dependency."""
    first = three_stages(family)[0]
    final = {
        "merge_method": "task_arithmetic",
        "slices": [
            {
                "sources": [
                    {"model": "soup", "layer_range": [0, 3]},
                    {"model": str(family["c"]), "layer_range": [0, 3]},
                ],
                "base_model": "soup",
            }
        ],
        "parameters": {"weight": 0.5},
    }
    out = tmp_path / "out"
    m.merge(documents(final, first), out)
    m.merge({k: v for k, v in first.items() if k != "name"}, tmp_path / "soup")
    by_hand = {
        "merge_method": "task_arithmetic",
        "base_model": str(tmp_path / "soup"),
        "models": [{"model": str(family["c"])}],
        "parameters": {"weight": 0.5},
    }
    m.merge(by_hand, tmp_path / "by-hand")
    same(out, tmp_path / "by-hand")
