"""The command line as users run it: shorthand, dry run, JSON, validate, methods, demo,
artifacts beside the weights, transformers loading the result, and interrupted merges."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, read_checkpoint, run_cli, write_recipe

from mergekit_ri.synthetic import LlamaShape, make_family

CLI = [sys.executable, "-m", "mergekit_ri.cli"]


def test_the_command_keeps_its_exit_codes_and_output_through_the_fast_exit(tmp_path, recipe_for):
    """`ri-merge` ends with os._exit after flushing: exit codes and every printed line survive."""
    bad = subprocess.run(
        [*CLI, str(tmp_path / "missing.yaml"), "-o", str(tmp_path / "x")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
    assert subprocess.run([*CLI, "merge", "--no-such-flag"], capture_output=True, text=True).returncode == 2
    version = subprocess.run([*CLI, "version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == __import__("mergekit_ri").__version__
    big = subprocess.run(
        [*CLI, "methods", "--json"], capture_output=True, text=True
    )  # a long stdout, fully flushed
    assert big.returncode == 0 and "ties" in json.loads(big.stdout)


def test_shorthand_merge_with_json_summary(tmp_path, recipe_for):
    recipe = recipe_for("ties")
    proc = subprocess.run(
        [*CLI, str(recipe), "-o", str(tmp_path / "out"), "--json"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["method"] == "ties" and summary["tensors"] == len(TINY.tensor_shapes())
    assert summary["bytes_read"] == sum(
        4 * 2 * n for n in map(lambda s: torch.Size(s).numel(), TINY.tensor_shapes().values())
    )
    assert sorted(summary["files"]) == sorted(p.name for p in (tmp_path / "out").iterdir())


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, recipe_for):
    out = tmp_path / "out"
    result = run_cli("merge", recipe_for("ties"), "-o", out, "--dry-run", "--json")
    assert result.code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["dry_run"] and plan["tensors"] == len(TINY.tensor_shapes())
    assert plan["bytes_written"] * 4 == plan["bytes_read"]  # bf16 in, bf16 out, base + 3 experts
    assert plan["shards"][0]["file"] == "model-00001-of-00001.safetensors"
    from mergekit_ri.memory import RUNTIME_BYTES

    # a tiny model: the runtime plus at most a few copies of its bytes, not a multiple of the model
    assert RUNTIME_BYTES < plan["peak_memory_estimate"] < RUNTIME_BYTES + 3 * plan["bytes_read"]
    assert not out.exists()
    human = run_cli("merge", recipe_for("ties"), "-o", out, "--dry-run")
    assert human.code == 0 and "peak memory" in human.stdout and not out.exists()


def test_out_shard_size_splits_output_and_index_is_consistent(tmp_path, recipe_for):
    out = tmp_path / "out"
    assert run_cli("merge", recipe_for("task_arithmetic", out_shard_size=4000), "-o", out, "-q").code == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    tensors = read_checkpoint(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())


def test_validate_and_methods(recipe_for):
    ok = run_cli("validate", recipe_for("dare_ties"))
    assert ok.code == 0 and "valid" in ok.stdout
    listed = json.loads(run_cli("methods", "--json").stdout)
    assert {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"} <= set(listed)
    assert {p["name"] for p in listed["ties"]["parameters"]} >= {"weight", "density", "lambda", "normalize"}


def test_artifacts_config_tokenizer_and_card(tmp_path, family):
    (family["a"] / "tokenizer.json").write_text('{"from": "a"}')
    (family["base"] / "tokenizer.json").write_text('{"from": "base"}')
    (family["base"] / "generation_config.json").write_text('{"do_sample": false}')
    for source, expected in [("base", "base"), (str(family["a"]), "a")]:
        recipe = write_recipe(
            tmp_path / "r.yaml",
            merge_method="ties",
            base_model=str(family["base"]),
            models=[{"model": str(family["a"])}, {"model": str(family["b"])}],
            out_dtype="float16",
            tokenizer_source=source,
        )
        out = tmp_path / f"out-{expected}"
        assert run_cli("merge", recipe, "-o", out, "-q").code == 0
        assert json.loads((out / "tokenizer.json").read_text())["from"] == expected
    config = json.loads((tmp_path / "out-base" / "config.json").read_text())
    assert config["torch_dtype"] == "float16" and config["architectures"] == ["LlamaForCausalLM"]
    assert (tmp_path / "out-base" / "generation_config.json").exists()
    card = (tmp_path / "out-base" / "README.md").read_text()
    assert "merge_method: ties" in card and "TIES-Merging" in card and str(family["a"]) in card


def test_merged_checkpoint_loads_in_transformers_and_runs(tmp_path, recipe_for):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    assert run_cli("merge", recipe_for("ties", out_dtype="float32"), "-o", out, "-q").code == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    files = read_checkpoint(out)
    state = model.state_dict()
    for name, tensor in files.items():
        assert torch.equal(state[name].float(), tensor.float()), name
    logits = model(torch.tensor([[1, 2, 3, 4, 5]])).logits
    assert logits.shape == (1, 5, TINY.vocab) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    proc = subprocess.run([*CLI, "demo", "--dir", str(tmp_path / "demo")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "transformers loads" in proc.stdout
    assert proc.stderr == ""  # no warnings, no exit noise (e.g. bindings reporting objects alive at exit)
    assert (tmp_path / "demo" / "merged" / "model.safetensors.index.json").exists()
    again = subprocess.run(
        [*CLI, "demo", "--dir", str(tmp_path / "demo"), "--quiet"], capture_output=True, text=True
    )
    assert (
        again.returncode == 0 and again.stdout == "" and again.stderr == ""
    )  # --quiet: nothing, not even exit noise


def _start_slow_merge(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    shape = LlamaShape(vocab=2048, hidden=384, intermediate=1024, layers=12, heads=4, kv_heads=4)
    folders = make_family(tmp_path / "m", ["a", "b", "c"], shape=shape, dtype="float32", shards=3)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        merge_method="ties",
        base_model=str(folders["base"]),
        models=[{"model": str(folders[n])} for n in "abc"],
        parameters={"trim_scope": "model"},
    )
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [*CLI, str(recipe), "-o", str(out), "-q", "--prefetch", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while not list(tmp_path.glob(".out.ri-merge-partial-*")) and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert proc.poll() is None, "the merge finished before it could be interrupted"
    return proc, out


@pytest.mark.slow
def test_killed_merge_leaves_no_complete_looking_output(tmp_path):
    proc, out = _start_slow_merge(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    for partial in tmp_path.glob(".out.ri-merge-partial-*"):
        assert not (partial / "model.safetensors.index.json").exists()


@pytest.mark.slow
def test_terminated_merge_before_any_unit_is_finished_cleans_up_and_exits_143(tmp_path):
    """SIGTERM during the whole-model pre-pass: nothing to keep for --resume, everything removed."""
    proc, out = _start_slow_merge(tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "interrupted: no output was written" in stderr
    assert not out.exists() and not list(tmp_path.glob(".out.ri-merge-partial-*"))


def test_example_recipes_in_configs_are_valid():
    import yaml

    from mergekit_ri.recipe import parse_recipe

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        recipe = parse_recipe(yaml.safe_load(path.read_text()), source=str(path))
        assert recipe.models, path


@pytest.mark.slow  # plans two 4096-vocab models
def test_memory_estimate_is_bounded_by_work_units_not_by_the_model(tmp_path):
    """Two models 4x apart in size get the same estimate for task arithmetic: the engine holds
    row blocks, never whole tensors of a big model."""
    import mergekit_ri.memory as memory
    import mergekit_ri.reading as reading
    from mergekit_ri.plan import build_plan
    from mergekit_ri.recipe import load_recipe

    estimates = []
    for layers in (2, 8):
        shape = LlamaShape(vocab=4096, hidden=256, intermediate=512, layers=layers, heads=4, kv_heads=2)
        folders = make_family(tmp_path / f"m{layers}", ["a", "b"], shape=shape, dtype="bfloat16")
        recipe = write_recipe(
            tmp_path / f"r{layers}.yaml",
            merge_method="task_arithmetic",
            base_model=str(folders["base"]),
            models=[{"model": str(folders[n])} for n in ("a", "b")],
        )
        estimates.append(build_plan(load_recipe(recipe)).peak_memory_estimate())
    assert estimates[0] == estimates[1]
    assert estimates[0] < memory.RUNTIME_BYTES + reading.PREFETCH_BYTES


def test_a_reader_that_leaves_early_is_no_internal_error(tmp_path: Path, recipe_for) -> None:
    """`ri-merge ... --json | true`: the reader is gone before the summary is printed; the merge is
    written, and there is no traceback and no 'internal error'."""
    recipe = recipe_for("task_arithmetic")
    done = subprocess.run(
        f"{sys.executable} -m mergekit_ri.cli merge {recipe} -o {tmp_path / 'out'} --json -v "
        "| true; exit ${PIPESTATUS[0]}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode in (0, 141), done.stderr
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
