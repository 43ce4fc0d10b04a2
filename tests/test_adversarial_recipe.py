"""Hostile and mistyped recipes: exit 2, one line naming the file and field, nothing written.

Each case goes through the CLI (`ri-merge RECIPE -o OUT`) and must leave the inputs unchanged;
the library entry points (`parse_recipe_text`, `parse_recipe`) must say the same as `UserError`s.
"""

from __future__ import annotations

import json
import math
import os
import time
import tracemalloc
from pathlib import Path

import pytest
from conftest import assert_nothing_written, assert_user_error, run_cli, tree_digest, write_recipe

from mergekit_ri.errors import UserError
from mergekit_ri.recipe import MAX_NODES, Recipe, load_recipe, parse_recipe, parse_recipe_text


def _yaml(family: dict, extra: str = "", method: str = "ties") -> str:
    """A valid recipe over two experts, followed by `extra` top-level YAML."""
    return (
        f"merge_method: {method}\nbase_model: {json.dumps(str(family['base']))}\nmodels:\n"
        f"  - model: {json.dumps(str(family['a']))}\n  - model: {json.dumps(str(family['b']))}\n{extra}"
    )


def _second_model_with(family: dict, parameters: str) -> str:
    """The recipe of `_yaml` with `parameters` (flow YAML) on its second model."""
    entry = f"  - model: {json.dumps(str(family['b']))}\n"
    return _yaml(family).replace(entry, f"{entry}    parameters: {parameters}\n")


def _refused(tmp_path: Path, family: dict, recipe: Path, *needles: str) -> str:
    """Run the merge on `recipe`: the bad-input contract, the inputs unchanged."""
    out = tmp_path / "out"
    inputs = [family["models"] if "models" in family else Path(family["base"]).parent]
    inputs += [recipe] if recipe.is_file() else []
    before = tree_digest(*inputs)
    started = time.monotonic()
    line = assert_user_error(run_cli("merge", recipe, "-o", out), *needles)
    assert time.monotonic() - started < 30
    assert_nothing_written(out)
    assert tree_digest(*inputs) == before
    return line


def _write(tmp_path: Path, text: str | bytes, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _bomb(levels: int, width: int = 9) -> str:
    """The billion laughs: each level a list of `width` aliases of the one before."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


# --- 1. alias bombs ---------------------------------------------------------------------------


def test_an_alias_bomb_is_refused_naming_the_file(tmp_path, family):
    recipe = _write(tmp_path, _yaml(family, "parameters:\n  weight: 1.0\n") + _bomb(9))
    line = _refused(tmp_path, family, recipe, str(recipe), "alias")
    assert str(MAX_NODES) in line


def test_an_alias_bomb_costs_little_memory_and_time():
    """A 31 KB bomb (~70 GB expanded) is refused in well under 2 s and 100 MB."""
    text = _bomb(12, width=40)[:31_000].rsplit("\n", 1)[0] + "\n"
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(UserError, match="alias bomb"):
            parse_recipe_text(text, "bomb.yaml")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 2
    assert peak < 100 * 2**20, peak


def test_a_shared_list_bomb_in_a_parsed_dict_is_refused():
    layer: list = ["lol"] * 10
    for _ in range(8):
        layer = [layer] * 10
    with pytest.raises(UserError, match="alias bomb"):
        parse_recipe({"merge_method": "linear", "models": [{"model": "a"}], "parameters": {"x": layer}})


def test_an_alias_to_its_own_container_is_refused(tmp_path, family):
    recipe = _write(tmp_path, _yaml(family, "parameters:\n  weight: &w [1, *w]\n"))
    _refused(tmp_path, family, recipe, str(recipe), "contains it")
    cyclic: dict = {"merge_method": "linear", "models": [{"model": "a"}]}
    cyclic["parameters"] = {"weight": cyclic}
    with pytest.raises(UserError, match="contains itself"):
        parse_recipe(cyclic, "api")


def test_anchors_and_merge_keys_of_real_recipes_still_load(family):
    text = _yaml(family, "parameters:\n  weight: &w 0.5\n  density: *w\n").replace(
        f"  - model: {json.dumps(str(family['b']))}\n",
        f"  - model: {json.dumps(str(family['b']))}\n    parameters: &p {{weight: 0.7, density: 0.3}}\n"
        f"  - model: {json.dumps(str(family['c']))}\n    parameters: {{<<: *p, weight: 0.9}}\n",
    )
    recipe = parse_recipe_text(text, "ok.yaml")
    assert recipe.parameters == {"weight": 0.5, "density": 0.5}
    assert recipe.models[2].parameters == {"weight": 0.9, "density": 0.3}


# --- 2. duplicate keys ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, needles",
    [
        ("models:\n  - model: x\n", ["duplicate key 'models'", "line 6", "line 3"]),
        ("parameters:\n  lambda: 1.0\n  density: 0.5\n  lambda: 2.0\n", ["duplicate key 'lambda'", "line 9"]),
        ("parameters: {density: 0.5, density: 0.7}\n", ["duplicate key 'density'"]),
    ],
    ids=["models-twice", "parameter-twice", "flow-mapping"],
)
def test_a_key_given_twice_is_refused_naming_it_and_its_line(tmp_path, family, extra, needles):
    recipe = _write(tmp_path, _yaml(family, extra))
    _refused(tmp_path, family, recipe, str(recipe), *needles)


# --- 3. deep nesting, bytes that are not UTF-8, files that are not files ------------------------


@pytest.mark.parametrize("depth", [40, 5000])
def test_deep_nesting_is_refused_without_a_recursion_error(tmp_path, family, depth):
    nested = "[" * depth + "1" + "]" * depth
    recipe = _write(tmp_path, _yaml(family, f"parameters:\n  weight: {nested}\n"))
    _refused(tmp_path, family, recipe, str(recipe), "nested more than")
    deep: list = [1.0]
    for _ in range(depth):
        deep = [deep]
    with pytest.raises(UserError, match="nested more than"):
        parse_recipe({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": deep}}]})


def test_a_recipe_that_is_not_utf8_is_refused(tmp_path, family):
    recipe = _write(tmp_path, _yaml(family).encode() + b"dtype: bfloat16 # caf\xe9\n")
    _refused(tmp_path, family, recipe, str(recipe), "not UTF-8", "line 6")


def test_a_utf8_byte_order_mark_is_fine(tmp_path, family):
    assert load_recipe(_write(tmp_path, b"\xef\xbb\xbf" + _yaml(family).encode())).merge_method == "ties"


def test_a_directory_is_not_a_recipe(tmp_path, family):
    folder = tmp_path / "recipe.yaml"
    folder.mkdir()
    _refused(tmp_path, family, folder, str(folder), "directory")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_without_hanging(tmp_path, family):
    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)
    _refused(tmp_path, family, fifo, str(fifo), "not a regular file")


def test_a_huge_recipe_is_refused_unread(tmp_path, family):
    recipe = _write(tmp_path, _yaml(family) + "# " + "x" * (2 << 20) + "\n")
    _refused(tmp_path, family, recipe, str(recipe), "larger than")


# --- 4. NaN, Inf and ranges -------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, needles",
    [
        ("parameters:\n  weight: .nan\n", ["parameters.weight", "nan", "finite"]),
        ("parameters:\n  weight: .inf\n", ["parameters.weight", "inf", "finite"]),
        ("parameters:\n  lambda: .nan\n", ["parameters.lambda", "finite"]),
        ("parameters:\n  lambda: -.inf\n", ["parameters.lambda", "finite"]),
        ("parameters:\n  density: [0.2, .nan]\n", ["parameters.density[1]", "finite"]),
        (
            "parameters:\n  weight:\n    - filter: mlp\n      value: .inf\n    - value: 1.0\n",
            ["parameters.weight[0].value", "finite"],
        ),
        ("parameters:\n  lambda: 1.0e+39\n", ["parameters.lambda", "float32"]),
        ("parameters:\n  weight: 1" + "0" * 400 + "\n", ["parameters.weight", "float32"]),
        ("parameters:\n  lambda: 1e5\n", ["parameters.lambda", "1.0e+5"]),
        ("parameters:\n  density: [0.2, 1.5]\n", ["parameters.density", "1.5", "[0, 1]"]),
        ("parameters:\n  density: -0.1\n", ["parameters.density", "-0.1", "[0, 1]"]),
        ("out_shard_size: .inf\n", ["out_shard_size"]),
        ("out_shard_size: " + "9" * 400 + "GB\n", ["out_shard_size", "cannot read size"]),
        (
            "resolve_interference: {auxiliary_data: gaussian, lr: .nan}\n",
            ["resolve_interference.lr", "finite"],
        ),
        (
            "resolve_interference: {auxiliary_data: gaussian, alpha: .inf}\n",
            ["resolve_interference.alpha", "finite"],
        ),
        (
            "resolve_interference: {auxiliary_data: gaussian, weight_decay: 'nan'}\n",
            ["resolve_interference.weight_decay", "finite"],
        ),
    ],
    ids=[
        "weight-nan",
        "weight-inf",
        "lambda-nan",
        "lambda-minus-inf",
        "gradient-nan",
        "filtered-inf",
        "beyond-float32",
        "huge-int",
        "exponent-text",
        "gradient-range",
        "density-negative",
        "shard-inf",
        "shard-huge",
        "ri-lr-nan",
        "ri-alpha-inf",
        "ri-nan-string",
    ],
)
def test_non_finite_and_out_of_range_numbers_are_refused(tmp_path, family, extra, needles):
    recipe = _write(tmp_path, _yaml(family, extra))
    _refused(tmp_path, family, recipe, str(recipe), *needles)


def test_a_non_finite_per_model_value_is_refused(tmp_path, family):
    recipe = _write(tmp_path, _second_model_with(family, "{weight: .nan}"))
    _refused(tmp_path, family, recipe, "models[1].parameters.weight", "finite")


@pytest.mark.parametrize(
    "method, parameters, needles",
    [
        ("wudi2", {"momentum": 1.5}, ["parameters.momentum", "[0, 1]"]),
        ("wudi", {"rank_ratio": 2.0}, ["parameters.rank_ratio", "[0, 1]"]),
        ("wudi", {"iterations": 2.5}, ["parameters.iterations", "whole number"]),
        ("wudi", {"iterations": [10, 20]}, ["parameters.iterations", "whole number"]),
        ("wudi", {"lr": -1e-3}, ["parameters.lr", ">= 0"]),
        ("wudi", {"t": -1}, ["parameters.t", ">= 0"]),
        ("iso_cts", {"common_space_fraction": 1.2}, ["parameters.common_space_fraction", "[0, 1]"]),
        ("tsv", {"alpha": float("nan")}, ["parameters.alpha", "finite"]),
    ],
)
def test_method_parameters_keep_to_their_declared_ranges(
    tmp_path, family, recipe_for, method, parameters, needles
):
    recipe = recipe_for(method, parameters=parameters)
    _refused(tmp_path, family, recipe, str(recipe), *needles)


def test_negative_weights_are_legitimate(tmp_path, family, recipe_for):
    recipe = recipe_for("task_arithmetic", parameters={"weight": -0.5, "lambda": -1.0})
    result = run_cli("merge", recipe, "-o", tmp_path / "out", "-q")
    assert result.code == 0, result.stderr


def test_methods_listing_shows_the_ranges():
    listed = json.loads(run_cli("methods", "--json").stdout)
    docs = {p["name"]: p["doc"] for p in listed["ties"]["parameters"]}
    assert "[0, 1]" in docs["density"]
    assert "whole number" in {p["name"]: p["doc"] for p in listed["wudi"]["parameters"]}["iterations"]


# --- 5. empty lists ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, field",
    [
        ("parameters:\n  density: []\n", "parameters.density"),
        ("parameters:\n  weight:\n    - filter: mlp\n      value: []\n", "parameters.weight[0].value"),
    ],
    ids=["gradient", "filtered-value"],
)
def test_an_empty_list_is_refused_not_taken_as_the_default(tmp_path, family, extra, field):
    recipe = _write(tmp_path, _yaml(family, extra))
    _refused(tmp_path, family, recipe, str(recipe), field, "empty list")


# --- 6. types ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, needles",
    [
        ("parameters:\n  lambda: abc\n", ["parameters.lambda: expected a number, got 'abc'"]),
        ("parameters:\n  lambda: '1.0'\n", ["parameters.lambda: expected a number, got '1.0'"]),
        ("parameters:\n  normalize: 'false'\n", ["parameters.normalize", "true or false", "'false'"]),
        ("parameters:\n  normalize: 0.5\n", ["parameters.normalize", "true or false"]),
        ("parameters:\n  normalize: [1, 0.5]\n", ["parameters.normalize[1]", "true or false", "0.5"]),
        ("parameters:\n  weight: true\n", ["parameters.weight", "expected a number", "True"]),
        ("parameters:\n  density: [0.5, true]\n", ["parameters.density[1]", "expected a number", "True"]),
        ("parameters:\n  density: [0.5, '0.3']\n", ["parameters.density[1]", "expected a number", "'0.3'"]),
        ("parameters:\n  trim_scope: 1\n", ["parameters.trim_scope", "tensor, model", "got 1"]),
        ("parameters:\n  weight: null\n", ["parameters.weight", "null"]),
        ("parameters:\n  weight: {a: 1}\n", ["parameters.weight", "mapping"]),
        (
            "parameters:\n  weight:\n    - filter: 3\n      value: 1\n",
            ["parameters.weight[0].filter", "text"],
        ),
        ("parameters:\n  weight:\n    - filter: mlp\n", ["parameters.weight[0]", "needs a 'value'"]),
        (
            "parameters:\n  weight:\n    - filter: mlp\n      value: x\n",
            ["parameters.weight", "filter 'mlp'", "'x'"],
        ),
        ("parameters: [1, 2]\n", ["parameters", "mapping"]),
        ("seed: .nan\n", ["seed"]),
        ("seed: 1" + "0" * 30 + "\n", ["seed", "less than"]),
        (
            "resolve_interference: {auxiliary_data: gaussian, steps: 1" + "0" * 30 + "}\n",
            ["resolve_interference.steps", "less than"],
        ),
        ("on_nonfinite: ignore\n", ["on_nonfinite", "'error' or 'warn'"]),
        ("merge_method: [ties]\n", ["duplicate key 'merge_method'"]),
    ],
    ids=[
        "lambda-word",
        "lambda-quoted",
        "bool-string",
        "bool-fraction",
        "bool-gradient",
        "number-bool",
        "gradient-bool",
        "gradient-string",
        "choice-number",
        "null",
        "mapping",
        "filter-number",
        "filter-no-value",
        "filtered-word",
        "parameters-list",
        "seed-nan",
        "seed-huge",
        "ri-steps-huge",
        "on-nonfinite",
        "method-twice",
    ],
)
def test_mistyped_values_are_refused_naming_the_field(tmp_path, family, extra, needles):
    recipe = _write(tmp_path, _yaml(family, extra))
    _refused(tmp_path, family, recipe, str(recipe), *needles)


@pytest.mark.parametrize(
    "value, needles",
    [
        ("x", ["models[1].parameters.weight", "'x'"]),
        ("[]", ["models[1].parameters.weight", "empty list"]),
        ("[1, abc]", ["models[1].parameters.weight[1]", "'abc'"]),
    ],
)
def test_mistyped_per_model_values_are_refused(tmp_path, family, value, needles):
    _refused(tmp_path, family, _write(tmp_path, _second_model_with(family, f"{{weight: {value}}}")), *needles)


def test_hostile_text_in_a_message_stays_on_one_short_line(tmp_path, family):
    key = "a\\nb" + "x" * 900
    recipe = _write(tmp_path, _yaml(family, f'"{key}": 1\n'))
    line = _refused(tmp_path, family, recipe, "unknown key")
    assert len(line) < 400


# --- 7. on_nonfinite, 8. the library entry points ------------------------------------------------


def test_on_nonfinite_defaults_to_error_and_takes_warn(family):
    assert parse_recipe_text(_yaml(family)).on_nonfinite == "error"
    assert parse_recipe_text(_yaml(family, "on_nonfinite: warn\n")).on_nonfinite == "warn"


def test_parse_recipe_text_and_parse_recipe_agree_with_load_recipe(tmp_path, family):
    text = _yaml(family, "parameters:\n  density: [0.1, 0.3]\n  weight: 0.5\n")
    from_file = load_recipe(_write(tmp_path, text))
    assert parse_recipe_text(text) == from_file
    import yaml

    assert parse_recipe(yaml.safe_load(text)) == from_file
    with pytest.raises(UserError, match=r"^api: parameters\.weight: nan is not a finite number$"):
        parse_recipe(yaml.safe_load(text) | {"parameters": {"weight": math.nan}}, "api")
    with pytest.raises(UserError, match="^lib: a recipe is YAML text"):
        parse_recipe_text(b"merge_method: ties", "lib")  # type: ignore[arg-type]


def test_valid_mergekit_recipe_loads_unchanged(tmp_path, family):
    recipe = write_recipe(
        tmp_path / "mk.yaml",
        merge_method="ties",
        base_model=str(family["base"]),
        models=[
            {"model": str(family["a"]), "parameters": {"weight": 1.0, "density": [0.3, 0.1]}},
            {"model": str(family["b"]), "parameters": {"weight": -0.2, "density": 1}},
        ],
        parameters={
            "lambda": 1.0,
            "normalize": True,
            "weight": [{"filter": "self_attn", "value": [0.5, 1.0]}, {"value": 0.8}],
        },
        dtype="bfloat16",
        out_dtype="bfloat16",
        tokenizer_source="base",
    )
    loaded = load_recipe(recipe)
    assert isinstance(loaded, Recipe) and loaded.models[1].parameters["density"] == 1
    result = run_cli("merge", recipe, "-o", tmp_path / "out", "-q")
    assert result.code == 0, result.stderr
