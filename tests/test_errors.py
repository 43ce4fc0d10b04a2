"""Every kind of bad input: exit code 2, one line naming the culprit, no output folder."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_cli, write_recipe
from safetensors.torch import save_file

from mergekit_ri.synthetic import make_family


def assert_bad_input(result, *needles: str, out: Path | None = None) -> None:
    assert result.code == 2, (result.code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}.ri-merge-partial-*"))


@pytest.fixture
def models(tmp_path):
    return make_family(tmp_path / "models", ["a", "b"], shape=TINY)


def recipe(tmp_path, family_dirs, **override):
    fields = {
        "merge_method": "ties",
        "base_model": str(family_dirs["base"]),
        "models": [{"model": str(family_dirs["a"])}, {"model": str(family_dirs["b"])}],
    }
    fields.update(override)
    return write_recipe(tmp_path / "recipe.yaml", **fields)


def test_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("merge_method: ties\nmodels: [unclosed\n")
    assert_bad_input(
        run_cli("merge", path, "-o", tmp_path / "out"),
        "bad.yaml",
        "malformed YAML",
        "line",
        out=tmp_path / "out",
    )


def test_recipe_file_missing(tmp_path):
    assert_bad_input(
        run_cli("merge", tmp_path / "nope.yaml", "-o", tmp_path / "out"), "nope.yaml", out=tmp_path / "out"
    )


@pytest.mark.parametrize(
    "fields,expected",
    [
        (lambda m: {"merge_method": "tie"}, ["unknown merge_method 'tie'", "did you mean 'ties'"]),
        (lambda m: {"parameters": {"densty": 0.3}}, ["unknown parameter 'densty'", "did you mean 'density'"]),
        (
            lambda m: {
                "models": [{"model": str(m["a"]), "parameters": {"wieght": 1}}, {"model": str(m["b"])}]
            },
            ["models[0].parameters", "'wieght'", "did you mean 'weight'"],
        ),
        (lambda m: {"out_dtpye": "bfloat16"}, ["unknown key 'out_dtpye'", "did you mean 'out_dtype'"]),
        (lambda m: {"dtype": "bfloat61"}, ["dtype", "bfloat61"]),
        (lambda m: {"parameters": {"density": 1.5}}, ["density", "1.5"]),
    ],
    ids=["method", "parameter", "per-model-parameter", "top-level-key", "field-value", "density-range"],
)
def test_bad_recipe_fields_are_named(tmp_path, models, fields, expected):
    """A misspelt or out-of-range field: one line naming it (and the closest spelling), exit 2."""
    result = run_cli("merge", recipe(tmp_path, models, **fields(models)), "-o", tmp_path / "out")
    assert_bad_input(result, *expected, out=tmp_path / "out")


def test_missing_model_path(tmp_path, models):
    entries = [{"model": str(tmp_path / "no-such-model")}, {"model": str(models["b"])}]
    result = run_cli("merge", recipe(tmp_path, models, models=entries), "-o", tmp_path / "out")
    assert_bad_input(result, "path not found", "no-such-model", out=tmp_path / "out")


@pytest.mark.parametrize(
    "model,name,shape,expected",
    [
        (
            "b",
            "model.layers.1.mlp.up_proj.weight",
            (41, 16),
            ["'b'", "model.layers.1.mlp.up_proj.weight", "[41, 16]", "[40, 16]"],
        ),
        ("a", "model.embed_tokens.weight", (65, 16), ["model.embed_tokens.weight", "vocabularies differ"]),
    ],
    ids=["shape-mismatch", "vocab-mismatch"],
)
def test_a_mismatched_tensor_is_named_with_both_shapes(tmp_path, models, model, name, shape, expected):
    from safetensors.torch import load_file

    path = models[model] / "model.safetensors"
    weights = load_file(path)
    weights[name] = torch.zeros(*shape, dtype=torch.bfloat16)
    save_file(weights, path)
    result = run_cli("merge", recipe(tmp_path, models), "-o", tmp_path / "out")
    assert_bad_input(result, *expected, out=tmp_path / "out")


def test_missing_tensor(tmp_path, models):
    path = models["a"] / "model.safetensors"
    from safetensors.torch import load_file

    weights = load_file(path)
    del weights["model.norm.weight"]
    save_file(weights, path)
    result = run_cli("merge", recipe(tmp_path, models), "-o", tmp_path / "out")
    assert_bad_input(result, "'a'", "lacks tensor 'model.norm.weight'", out=tmp_path / "out")


def test_truncated_shard(tmp_path, models):
    path = models["b"] / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    result = run_cli("merge", recipe(tmp_path, models), "-o", tmp_path / "out")
    assert_bad_input(result, str(path), "truncated", out=tmp_path / "out")


def test_corrupt_header(tmp_path, models):
    path = models["a"] / "model.safetensors"
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    data[8:18] = b"#garbage!!"
    path.write_bytes(bytes(data))
    result = run_cli("merge", recipe(tmp_path, models), "-o", tmp_path / "out")
    assert_bad_input(result, str(path), "corrupt safetensors header", out=tmp_path / "out")


def test_header_length_beyond_file(tmp_path, models):
    path = models["a"] / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", 10**12)
    path.write_bytes(bytes(data))
    assert_bad_input(
        run_cli("merge", recipe(tmp_path, models), "-o", tmp_path / "out"),
        str(path),
        "corrupt",
        out=tmp_path / "out",
    )


def test_index_lists_missing_shard(tmp_path):
    folders = make_family(tmp_path / "m", ["a"], shape=TINY, shards=2)
    (folders["a"] / "model-00002-of-00002.safetensors").unlink()
    path = write_recipe(
        tmp_path / "r.yaml",
        merge_method="ties",
        base_model=str(folders["base"]),
        models=[{"model": str(folders["a"])}],
    )
    assert_bad_input(
        run_cli("merge", path, "-o", tmp_path / "out"),
        "model-00002-of-00002.safetensors",
        "missing",
        out=tmp_path / "out",
    )


def test_output_exists_and_not_empty(tmp_path, models):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = run_cli("merge", recipe(tmp_path, models), "-o", out)
    assert_bad_input(result, str(out), "--force")
    assert (out / "keep.txt").read_text() == "precious"
    assert run_cli("merge", recipe(tmp_path, models), "-o", out, "--force", "-q").code == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors.index.json").exists()


def test_output_inside_an_input(tmp_path, models):
    out = models["a"] / "merged"
    before = sorted(p.name for p in models["a"].iterdir())
    assert_bad_input(run_cli("merge", recipe(tmp_path, models), "-o", out), "inside input", out=out)
    assert sorted(p.name for p in models["a"].iterdir()) == before


def test_output_that_contains_an_input_is_refused_even_with_force(tmp_path, models):
    result = run_cli("merge", recipe(tmp_path, models), "-o", tmp_path / "models", "--force")
    assert_bad_input(result, "contains input")
    assert (models["a"] / "model.safetensors").exists()


def test_cuda_requested_without_gpu(tmp_path, models):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert_bad_input(
        run_cli("merge", recipe(tmp_path, models), "-o", tmp_path / "out", "--device", "cuda"),
        "cuda",
        out=tmp_path / "out",
    )


def test_hub_id_offline_without_cache(tmp_path, models, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    entries = [{"model": "some-org/not-cached-model@main"}, {"model": str(models["b"])}]
    result = run_cli("merge", recipe(tmp_path, models, models=entries), "-o", tmp_path / "out")
    assert_bad_input(result, "some-org/not-cached-model@main", "HF_HUB_OFFLINE", out=tmp_path / "out")


def test_inputs_are_never_modified(tmp_path, models):
    stamp = {p: (p.stat().st_mtime_ns, p.read_bytes()) for f in models.values() for p in f.iterdir()}
    assert run_cli("merge", recipe(tmp_path, models), "-o", tmp_path / "out", "-q").code == 0
    assert stamp == {p: (p.stat().st_mtime_ns, p.read_bytes()) for f in models.values() for p in f.iterdir()}


def test_choice_parameters_are_checked_inside_filters(tmp_path, models):
    scope = [{"filter": "self_attn", "value": "all_2d"}, {"value": "linaer"}]
    result = run_cli(
        "merge",
        recipe(tmp_path, models, merge_method="wudi", parameters={"scope": scope}),
        "-o",
        tmp_path / "out",
    )
    assert_bad_input(result, "scope", "'linaer'", out=tmp_path / "out")
    scope[1]["value"] = "linear"
    assert (
        run_cli(
            "merge",
            recipe(tmp_path, models, merge_method="wudi", parameters={"scope": scope}),
            "-o",
            tmp_path / "out",
            "-q",
        ).code
        == 0
    )
