"""The Python API called directly: docs/api.md's examples run, the API and the CLI write the same
bytes, planning reads no weight, errors are `UserError`s with the CLI's line, events arrive,
and the file list's sizes and sha256 are those on disk."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli, write_recipe

import mergekit_ri as m

ROOT = Path(__file__).resolve().parents[1]


def tree(folder: Path) -> dict[str, bytes]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files}


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


def test_the_api_page_examples_run(tmp_path, monkeypatch, capsys):
    """docs/api.md, block after block in one namespace, from a folder laid out like a checkout."""
    (tmp_path / "configs").mkdir()
    shutil.copyfile(ROOT / "configs" / "demo.yaml", tmp_path / "configs" / "demo.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RI_MERGE_CACHE", str(tmp_path / "cache"))
    blocks = python_blocks((ROOT / "docs" / "api.md").read_text())
    assert len(blocks) >= 6
    namespace: dict[str, object] = {"__name__": "docs_api"}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "error: recipe: unknown merge_method 'tie' (did you mean 'ties'?)" in printed
    assert "files verified" in printed and "100.0%" in printed
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert (tmp_path / "cache" / "demo" / "base").is_dir()  # the demo models, generated on first use


@pytest.mark.slow
def test_merging_the_demo_recipe_works_from_a_fresh_process(tmp_path):
    """The one-liner of the issue, from a folder holding configs/demo.yaml (as a checkout does)."""
    (tmp_path / "configs").mkdir()
    shutil.copyfile(ROOT / "configs" / "demo.yaml", tmp_path / "configs" / "demo.yaml")
    env = {**os.environ, "RI_MERGE_CACHE": str(tmp_path / "cache")}
    code = "import mergekit_ri as m; m.merge('configs/demo.yaml', 'out')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "config.json").exists()


def test_importing_the_package_stays_cheap():
    code = (
        "import sys, mergekit_ri as m; m.UserError; "
        "print('torch' in sys.modules, 'mergekit_ri.api' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["False", "False"]


def test_merge_from_path_yaml_text_and_dict_writes_the_cli_bytes(tmp_path, recipe_for):
    recipe = recipe_for("ties", parameters={"density": 0.3})
    assert run_cli("merge", recipe, "-o", tmp_path / "cli", "-q").code == 0
    expected = tree(tmp_path / "cli")
    text = recipe.read_text()
    inputs = [("path", recipe), ("str-path", str(recipe)), ("text", text), ("dict", yaml.safe_load(text))]
    for name, given in inputs:
        result = m.merge(given, tmp_path / name)
        assert result.out == tmp_path / name and result.method == "ties"
        assert tree(tmp_path / name) == expected, name
    assert m.load_recipe(text) == m.load_recipe(recipe) == m.load_recipe(yaml.safe_load(text))


def test_plan_reads_no_weight_and_writes_nothing(tmp_path, recipe_for, monkeypatch):
    from mergekit_ri.io import sources

    def refuse(*args, **kwargs):
        raise AssertionError("plan() read a weight")

    recipe = recipe_for("dare_ties")
    monkeypatch.setattr(sources.TensorReader, "read", refuse)
    monkeypatch.setattr(os, "pread", refuse)
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    report = m.plan(recipe)
    assert sorted(tmp_path.rglob("*")) == before
    assert report.ri is None and report.plan.method.name == "dare_ties"
    summary = report.summary()
    assert summary["tensors"] == len(report.plan.tasks) and summary["bytes_read"] > 0
    cli = json.loads(run_cli("merge", recipe, "-o", tmp_path / "o", "--dry-run", "--json").stdout)
    assert cli == {"dry_run": True, **json.loads(json.dumps(summary))}


@pytest.mark.parametrize("case", ["unknown-method", "missing-recipe", "missing-model", "non-empty-output"])
def test_user_errors_carry_the_cli_line(tmp_path, recipe_for, family, case):
    out = tmp_path / "out"
    recipe = recipe_for("ties")
    if case == "unknown-method":
        recipe = write_recipe(
            tmp_path / "bad.yaml", merge_method="tiez", models=[{"model": str(family["a"])}]
        )
    elif case == "missing-recipe":
        recipe = tmp_path / "nope.yaml"
    elif case == "missing-model":
        recipe = write_recipe(
            tmp_path / "bad.yaml",
            merge_method="ties",
            base_model=str(family["base"]),
            models=[{"model": str(tmp_path / "no-such-model")}],
        )
    else:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    with pytest.raises(m.UserError) as caught:
        m.merge(recipe, out)
    cli = run_cli("merge", recipe, "-o", out)
    assert cli.code == 2 and cli.stderr == f"error: {caught.value}\n"
    assert "\n" not in str(caught.value)


class Recorder(m.MergeEvents):
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_plan(self, plan, total_bytes):
        self.calls.append(("plan", total_bytes))

    def on_warning(self, text):
        self.calls.append(("warning", text))

    def on_progress(self, advance):
        self.calls.append(("progress", advance))

    def on_layer(self, name, figures):
        self.calls.append(("layer", name, dict(figures)))


def test_events_report_the_plan_then_progress_adding_up_to_the_total(tmp_path, recipe_for):
    events = Recorder()
    result = m.merge(recipe_for("ties", parameters={"trim_scope": "model"}), tmp_path / "out", events=events)
    assert events.calls[0][0] == "plan"
    total = events.calls[0][1]
    advances = [c[1] for c in events.calls if c[0] == "progress"]
    assert advances and sum(advances) == total > result.bytes_read  # the model-wide pre-pass counts too
    assert result.layers is None and not [c for c in events.calls if c[0] == "layer"]


def test_layer_figures_with_report_layers(tmp_path, recipe_for):
    events = Recorder()
    result = m.merge(
        recipe_for("wudi", out_dtype="float32"),
        tmp_path / "out",
        options=m.MergeOptions(report_layers=True),
        events=events,
    )
    layers = {c[1]: c[2] for c in events.calls if c[0] == "layer"}
    assert layers and layers == result.layers
    assert all(f["loss_after"] <= f["loss_before"] for f in layers.values())


def test_files_list_every_written_file_with_its_size_and_sha256(tmp_path, recipe_for):
    result = m.merge(recipe_for("task_arithmetic", out_shard_size=4000), tmp_path / "out")
    on_disk = tree(tmp_path / "out")
    assert [f.name for f in result.files] == sorted(on_disk) and len(on_disk) > 4
    for record in result.files:
        data = on_disk[record.name]
        assert record.size == len(data) and record.sha256 == hashlib.sha256(data).hexdigest()
    quick = m.merge(
        recipe_for("task_arithmetic"), tmp_path / "quick", options=m.MergeOptions(checksums=False)
    )
    assert quick.files and all(f.sha256 is None for f in quick.files)


def test_cli_json_keeps_files_and_adds_the_manifest(tmp_path, recipe_for):
    result = run_cli("merge", recipe_for("ties"), "-o", tmp_path / "out", "--json")
    summary = json.loads(result.stdout)
    assert summary["files"] == sorted(p.name for p in (tmp_path / "out").iterdir())
    on_disk = tree(tmp_path / "out")
    assert {f["name"]: (f["size"], f["sha256"]) for f in summary["manifest"]} == {
        name: (len(data), hashlib.sha256(data).hexdigest()) for name, data in on_disk.items()
    }


def test_options_are_frozen_checked_and_threads_restored(tmp_path, recipe_for):
    options = m.MergeOptions(threads=1)
    with pytest.raises(AttributeError):
        options.force = True  # type: ignore[misc]
    with pytest.raises(m.UserError):
        m.MergeOptions(prefetch=0)
    with pytest.raises(m.UserError, match="unknown device 'gpu'"):
        m.MergeOptions(device="gpu")
    before = torch.get_num_threads()
    m.merge(recipe_for("linear"), tmp_path / "out", options=options)
    assert torch.get_num_threads() == before


def test_plan_is_both_the_function_and_the_module(recipe_for):
    from mergekit_ri.plan import build_plan

    assert m.plan.build_plan is build_plan  # the planning module, as before
    assert isinstance(m.plan(recipe_for("ties")), m.PlanReport)
