"""mergekit 0.1.5 recipes and command lines mean the same here: each former silent divergence
(base listed under models, `filter: "*"`, `5b` shard sizes, parameters of other methods, stepped
gradients, defaults, `tokenizer_source: union`) and mergekit-yaml's command-line form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, read_checkpoint, run_cli, write_recipe

from mergekit_ri.methods import get_method
from mergekit_ri.plan import resolve_params
from mergekit_ri.recipe import parse_recipe, parse_size

EXPERTS = ("a", "b", "c")


def _recipe(
    tmp_path: Path, family: dict, method: str, name: str = "r", base_entry: dict | None = None, **fields
) -> Path:
    """A recipe over the three experts; `base_entry` lists the base under models too, first."""
    models = [{"model": str(family[n])} for n in EXPERTS]
    if base_entry is not None:
        models.insert(0, {"model": str(family["base"]), **base_entry})
    return write_recipe(
        tmp_path / f"{name}.yaml",
        merge_method=method,
        base_model=str(family["base"]),
        models=models,
        **fields,
    )


def _merge(recipe: Path, out: Path, *flags: str) -> dict[str, torch.Tensor]:
    result = run_cli("merge", recipe, "-o", out, "-q", *flags)
    assert result.code == 0, result.stderr
    return read_checkpoint(out)


def _same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


def _warnings(recipe: Path) -> list[str]:
    result = run_cli("validate", recipe)
    assert result.code == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line.startswith("warning:")]


# --- the base listed under models ----------------------------------------------------------------


@pytest.mark.parametrize(
    "method, parameters",
    [
        ("task_arithmetic", {"normalize": True}),
        ("dare_linear", {"normalize": True, "density": 0.5}),
        ("ties", {"density": 0.3}),
    ],
)
@pytest.mark.parametrize("base_entry", [{}, {"parameters": {"weight": 1.0}}], ids=["bare", "with-weight"])
def test_base_listed_under_models_is_the_base_not_an_expert(tmp_path, family, method, parameters, base_entry):
    """mergekit's idiom ("no parameters necessary for base model"): same bytes as without the entry
    (with it as an expert, normalize halved the task vector and DARE's masks shifted)."""
    plain = _merge(
        _recipe(tmp_path, family, method, "plain", parameters=parameters, seed=5), tmp_path / "plain"
    )
    listed = _recipe(tmp_path, family, method, "listed", base_entry, parameters=parameters, seed=5)
    _same(plain, _merge(listed, tmp_path / "listed"))
    warnings = _warnings(listed)
    if base_entry:
        assert any("models[0] is the base_model" in w and "weight" in w for w in warnings), warnings
    else:
        assert not any("base_model" in w for w in warnings), warnings


def test_linear_merges_the_base_as_one_more_model_as_mergekit_does(tmp_path, family):
    """linear has no base in mergekit (BasePolicy.IGNORED): a base_model is one more model."""
    fields = {"parameters": {"weight": 1.0}, "out_dtype": "float32"}
    implicit = _recipe(tmp_path, family, "linear", "implicit", **fields)
    explicit = write_recipe(
        tmp_path / "explicit.yaml",
        merge_method="linear",
        models=[{"model": str(family[n])} for n in (*EXPERTS, "base")],
        **fields,
    )
    _same(_merge(implicit, tmp_path / "implicit"), _merge(explicit, tmp_path / "explicit"))
    assert any("merged as one more model" in w for w in _warnings(implicit))
    listed = _recipe(tmp_path, family, "linear", "listed", {}, **fields)  # listed once: merged once
    assert not _warnings(listed)


def test_models_listing_only_the_base_is_refused(tmp_path, family):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        merge_method="task_arithmetic",
        base_model=str(family["base"]),
        models=[{"model": str(family["base"])}],
    )
    assert_user_error(run_cli("validate", recipe), "lists only the base_model")


# --- filters, gradients --------------------------------------------------------------------------


def test_filter_star_matches_every_tensor(tmp_path, family):
    star = _recipe(
        tmp_path,
        family,
        "task_arithmetic",
        "star",
        parameters={"weight": [{"filter": "*", "value": 0.4}, {"value": 0.9}]},
    )
    scalar = _recipe(tmp_path, family, "task_arithmetic", "scalar", parameters={"weight": 0.4})
    _same(_merge(star, tmp_path / "star"), _merge(scalar, tmp_path / "scalar"))


def _resolved(parameters: dict, method: str = "ties") -> dict[float, dict]:
    recipe = parse_recipe(
        {"merge_method": method, "base_model": "base", "models": [{"model": "a"}], "parameters": parameters}
    )
    spec = get_method(method)
    return {
        t: resolve_params(recipe, spec, "model.layers.1.mlp.up_proj.weight", t).globals
        for t in (0.0, 0.4, 0.5, 0.7, 1.0)
    }


def test_gradients_of_booleans_and_names_are_stepped_not_interpolated():
    """mergekit: a list holding true/false or text (or any list for such a parameter) takes the
    point at ⌊t·(n − 1)⌋; numbers are still interpolated."""
    got = _resolved(
        {"normalize": [True, False, True], "trim_scope": ["tensor", "model"], "lambda": [0.0, 1.0]}
    )
    assert [got[t]["normalize"] for t in sorted(got)] == [True, True, False, False, True]
    assert [got[t]["trim_scope"] for t in sorted(got)] == ["tensor", "tensor", "tensor", "tensor", "model"]
    assert [got[t]["lambda"] for t in sorted(got)] == pytest.approx([0.0, 0.4, 0.5, 0.7, 1.0])
    as_numbers = _resolved({"normalize": [1, 0]})  # 0/1 for a true/false parameter: stepped, never 0.5
    assert [as_numbers[t]["normalize"] for t in sorted(as_numbers)] == [True, True, True, True, False]


def test_a_stepped_gradient_merges(tmp_path, family):
    recipe = _recipe(tmp_path, family, "task_arithmetic", parameters={"normalize": [True, False]})
    assert run_cli("merge", recipe, "-o", tmp_path / "out", "-q").code == 0


# --- sizes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, size",
    [
        ("5b", 5 * 10**9),
        ("5B", 5 * 10**9),
        ("2k", 2000),
        ("3M", 3 * 10**6),
        ("123", 123),
        ("2GB", 2 * 10**9),
        ("1GiB", 2**30),
        (4000, 4000),
    ],
)
def test_shard_sizes_read_like_mergekit(text, size):
    assert parse_size(text) == size


def test_out_shard_size_5b_is_one_shard_not_one_tensor_per_shard(tmp_path, family):
    _merge(_recipe(tmp_path, family, "task_arithmetic", out_shard_size="5b"), tmp_path / "out")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}


# --- parameters of other methods -----------------------------------------------------------------


@pytest.mark.parametrize(
    "method, parameters, per_model, unused",
    [
        ("ties", {"int8_mask": True, "rescale": False, "density": 0.5}, {}, ["int8_mask", "rescale"]),
        (
            "task_arithmetic",
            {"int8_mask": True},
            {"density": 0.5},
            ["int8_mask", "models[0].parameters.density"],
        ),
        ("model_stock", {"normalize": True, "int8_mask": True}, {"weight": 1.0}, ["normalize", "weight"]),
        ("dare_ties", {"int8_mask": True, "density": 0.5}, {}, ["int8_mask"]),
    ],
)
def test_parameters_mergekit_knows_are_taken_with_one_warning(
    tmp_path, family, method, parameters, per_model, unused
):
    recipe = _recipe(tmp_path, family, method, parameters=parameters)
    data = (
        recipe.read_text().replace(
            f"model: {family['a']}\n", f"model: {family['a']}\n  parameters: " + json.dumps(per_model) + "\n"
        )
        if per_model
        else recipe.read_text()
    )
    recipe.write_text(data)
    warnings = [w for w in _warnings(recipe) if "does not use" in w]
    assert len(warnings) == 1, warnings
    for name in unused:
        assert name in warnings[0], warnings[0]
    assert run_cli("merge", recipe, "-o", tmp_path / "out", "-q").code == 0


def test_names_mergekit_does_not_know_either_are_still_refused(tmp_path, family):
    recipe = _recipe(tmp_path, family, "ties", parameters={"densty": 0.5})
    assert_user_error(run_cli("validate", recipe), "unknown parameter 'densty'", "did you mean 'density'")


# --- defaults ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear"])
def test_density_defaults_to_mergekits_one(tmp_path, family, method):
    """A mergekit recipe without density: no trimming, no drop (was 0.2 here: 78.7 % of entries
    differed from mergekit's TIES)."""
    omitted = _merge(_recipe(tmp_path, family, method, "omitted", seed=1), tmp_path / "omitted")
    explicit = _recipe(tmp_path, family, method, "explicit", parameters={"density": 1.0}, seed=1)
    _same(omitted, _merge(explicit, tmp_path / "explicit"))


def test_methods_listing_recommends_the_papers_density():
    listed = json.loads(run_cli("methods", "--json").stdout)
    for method, paper in (("ties", "0.2"), ("dare_ties", "0.1"), ("dare_linear", "0.1")):
        density = next(p for p in listed[method]["parameters"] if p["name"] == "density")
        assert density["default"] == 1.0 and "paper" in density["doc"] and paper in density["doc"], density


# --- tokenizer_source ----------------------------------------------------------------------------


def test_tokenizer_source_union_without_tokenizer_files_is_refused_with_the_plan(tmp_path, family):
    """union builds a tokenizer from every model's files (tests/test_vocab.py): a folder with none
    is named when the recipe is checked, before any weight is read."""
    recipe = _recipe(tmp_path, family, "ties", tokenizer_source="union")
    for command in (("validate", recipe), ("merge", recipe, "-o", tmp_path / "out", "--dry-run")):
        assert_user_error(run_cli(*command), "model 'base'", str(family["base"]), "no tokenizer files")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("choice", ["base", "base-path", "b"])
def test_tokenizer_source_base_or_a_model_copies_that_tokenizer(tmp_path, family, choice):
    for name in ("base", *EXPERTS):
        (family[name] / "tokenizer_config.json").write_text(json.dumps({"from": name}))
    source = {"base": "base", "base-path": str(family["base"]), "b": str(family["b"])}[choice]
    _merge(_recipe(tmp_path, family, "ties", tokenizer_source=source), tmp_path / "out")
    copied = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert copied == {"from": "b" if choice == "b" else "base"}


# --- mergekit-yaml's command line ----------------------------------------------------------------


def test_positional_output_and_mergekit_flags_run_unchanged(tmp_path, family):
    """A mergekit-yaml command line from a user's shell history."""
    recipe = _recipe(tmp_path, family, "ties", parameters={"density": 0.5})
    flags = [
        "--copy-tokenizer",
        "--allow-crimes",
        "--lazy-unpickle",
        "--low-cpu-memory",
        "--read-to-gpu",
        "--async-write",
        "--write-threads",
        "2",
        "--clone-tensors",
        "--safe-serialization",
        "--trust-remote-code",
        "--no-multi-gpu",
        "--transformers-cache",
        str(tmp_path / "hf"),
        "-j",
        "1",
        "--write-model-card",
        "-v",
    ]
    result = run_cli("merge", recipe, tmp_path / "out", *flags)
    assert result.code == 0, result.stderr
    _same(read_checkpoint(tmp_path / "out"), _merge(recipe, tmp_path / "plain"))
    assert (tmp_path / "out" / "README.md").is_file()


def test_positional_output_through_the_entry_point(tmp_path, family, monkeypatch):
    """`ri-merge recipe.yaml OUT` (no subcommand), as mergekit-yaml is typed."""
    from mergekit_ri.cli import main

    recipe = _recipe(tmp_path, family, "task_arithmetic")
    with pytest.raises(SystemExit) as done:
        main([str(recipe), str(tmp_path / "out"), "--num-threads", "1", "--quiet"])
    assert done.value.code == 0 and (tmp_path / "out" / "model.safetensors.index.json").is_file()


def test_output_given_twice_or_never_is_one_line(tmp_path, family):
    recipe = _recipe(tmp_path, family, "ties")
    assert_user_error(run_cli("merge", recipe, tmp_path / "a", "-o", tmp_path / "b"), "two output folders")
    assert_user_error(run_cli("merge", recipe), "no output folder")
    assert run_cli("merge", recipe, tmp_path / "same", "-o", tmp_path / "same", "-q").code == 0
    assert run_cli("merge", recipe, "--dry-run").code == 0


def test_flags_map_onto_merge_options(tmp_path, family, monkeypatch):
    import mergekit_ri.api as api

    seen = {}

    def fake_merge(recipe, out, *, options, events=None):
        seen.update(out=Path(out), options=options)
        raise KeyboardInterrupt  # stop here: the options are what is tested

    monkeypatch.setattr(api, "merge", fake_merge)
    run_cli(
        "merge",
        _recipe(tmp_path, family, "ties"),
        tmp_path / "o",
        "--cuda",
        "-j",
        "3",
        "--random-seed",
        "7",
        "--out-shard-size",
        "2b",
        "--no-copy-tokenizer",
        "--no-write-model-card",
    )
    options = seen["options"]
    assert seen["out"] == tmp_path / "o" and options.device == "cuda" and options.threads == 3
    assert (options.seed, options.out_shard_size, options.copy_tokenizer, options.write_model_card) == (
        7,
        "2b",
        False,
        False,
    )
    run_cli("merge", _recipe(tmp_path, family, "ties"), tmp_path / "o", "--gpu-rich", "--device", "cpu")
    assert seen["options"].device == "cpu"  # --device wins, as mergekit's device does over --cuda


def test_random_seed_overrides_the_recipes_seed(tmp_path, family):
    parameters = {"density": 0.5}
    flagged = _merge(
        _recipe(tmp_path, family, "dare_linear", "flag", parameters=parameters, seed=1),
        tmp_path / "flag",
        "--random-seed",
        "7",
    )
    seeded = _merge(
        _recipe(tmp_path, family, "dare_linear", "seed", parameters=parameters, seed=7), tmp_path / "seed"
    )
    _same(flagged, seeded)
    other = _merge(
        _recipe(tmp_path, family, "dare_linear", "one", parameters=parameters, seed=1), tmp_path / "one"
    )
    assert any(not torch.equal(other[n], seeded[n]) for n in other)


def test_out_shard_size_flag_overrides_the_recipe(tmp_path, family):
    recipe = _recipe(tmp_path, family, "task_arithmetic", out_shard_size="5B")
    _merge(recipe, tmp_path / "out", "--out-shard-size", "4k")
    assert (
        len(
            set(
                json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())[
                    "weight_map"
                ].values()
            )
        )
        > 1
    )
    assert_user_error(
        run_cli("merge", recipe, tmp_path / "bad", "--out-shard-size", "5 parsecs"),
        "out shard size",
        "cannot read size",
    )
    assert not (tmp_path / "bad").exists()


def test_no_copy_tokenizer_and_no_model_card(tmp_path, family):
    (family["base"] / "tokenizer_config.json").write_text("{}")
    recipe = _recipe(tmp_path, family, "ties")
    _merge(recipe, tmp_path / "out", "--no-copy-tokenizer", "--no-write-model-card")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert not names & {"tokenizer_config.json", "README.md", "mergekit_config.yml"}, names
    assert "config.json" in names
    named = _recipe(tmp_path, family, "ties", "named", tokenizer_source="base")  # named: still copied
    _merge(named, tmp_path / "named", "--no-copy-tokenizer")
    assert (tmp_path / "named" / "tokenizer_config.json").is_file()


def test_flags_that_would_change_the_model_are_refused(tmp_path, family):
    recipe = _recipe(tmp_path, family, "ties")
    assert_user_error(
        run_cli("merge", recipe, tmp_path / "out", "--unsafe-truncate-embeddings"),
        "--unsafe-truncate-embeddings",
        "not supported",
    )
    assert not (tmp_path / "out").exists()


def test_help_says_which_mergekit_flags_do_nothing():
    text = " ".join(run_cli("merge", "--help").stdout.split())
    for flag in (
        "--lazy-unpickle",
        "--low-cpu-memory",
        "--read-to-gpu",
        "--async-write",
        "--cuda",
        "--copy-tokenizer",
        "--out-shard-size",
        "--random-seed",
        "--num-threads",
        "--allow-crimes",
        "--write-model-card",
        "OUT_PATH",
    ):
        assert flag in text, flag
    assert text.count("No effect") >= 4
