"""mergekit's `slices:`: layer ranges merged within a slice and stacked across slices.

What mergekit 0.1.5 does (mergekit/plan.py MergePlanner, mergekit/config.py ConfigReader,
mergekit/merge.py _model_out_config) is the reference: output layers renumbered from 0 in slice
order, embeddings from the first slice's sources, final norm and lm_head from the last slice's,
t = i / (n - 1) within each slice, parameters looked up source > slice > top level, config.json
with the new layer count.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, assert_nothing_written, assert_user_error, read_checkpoint, run_cli, write_recipe

from mergekit_ri import api
from mergekit_ri.synthetic import save_checkpoint

LAYER_SUFFIXES = [
    name.removeprefix("model.layers.0.")
    for name in TINY.tensor_shapes()
    if name.startswith("model.layers.0.")
]


def _source(folder: Path, start: int, end: int, **parameters) -> dict:
    entry: dict = {"model": str(folder), "layer_range": [start, end]}
    if parameters:
        entry["parameters"] = parameters
    return entry


def _merge(recipe: Path, out: Path) -> dict[str, torch.Tensor]:
    result = run_cli("merge", recipe, "-o", out)
    assert result.code == 0, result.stderr
    return read_checkpoint(out)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )


def _tasks(recipe: Path) -> dict:
    return {t.name: t for t in api.plan(recipe).plan.tasks}


# ---------------------------------------------------------------- merging within a slice


def test_one_slice_over_all_layers_equals_the_models_recipe(tmp_path, family):
    """gradient-slerp.yml says the slices: form and the models: form are equivalent."""
    t = [
        {"filter": "self_attn", "value": [0, 0.5, 1]},
        {"filter": "mlp", "value": [1, 0.3, 0]},
        {"value": 0.5},
    ]
    common = {"merge_method": "slerp", "base_model": str(family["base"]), "parameters": {"t": t}}
    plain = write_recipe(
        tmp_path / "plain.yaml",
        models=[{"model": str(family["base"])}, {"model": str(family["a"])}],
        **common,
    )
    sliced = write_recipe(
        tmp_path / "sliced.yaml",
        slices=[{"sources": [_source(family["base"], 0, TINY.layers), _source(family["a"], 0, TINY.layers)]}],
        **common,
    )
    want, got = _merge(plain, tmp_path / "plain"), _merge(sliced, tmp_path / "sliced")
    assert set(got) == set(want)
    for name in want:
        assert _same_bytes(got[name], want[name]), name
    config = json.loads((tmp_path / "sliced" / "config.json").read_text())
    assert config["num_hidden_layers"] == TINY.layers


# ---------------------------------------------------------------- stacking (frankenmerges)


def _frankenmerge(tmp_path: Path, family) -> Path:
    """orcamini-platy-44layer.yml in small: layers [0, 2) of a, then [1, 3) of b."""
    return write_recipe(
        tmp_path / "franken.yaml",
        merge_method="passthrough",
        slices=[{"sources": [_source(family["a"], 0, 2)]}, {"sources": [_source(family["b"], 1, 3)]}],
    )


def test_passthrough_stacks_layers_renumbered_with_the_source_bytes(tmp_path, family):
    out = tmp_path / "out"
    got = _merge(_frankenmerge(tmp_path, family), out)
    a, b = read_checkpoint_any(family["a"]), read_checkpoint_any(family["b"])
    layer_from = {0: (a, 0), 1: (a, 1), 2: (b, 1), 3: (b, 2)}
    for index, (model, source_layer) in layer_from.items():
        for suffix in LAYER_SUFFIXES:
            want = model[f"model.layers.{source_layer}.{suffix}"]
            assert _same_bytes(got[f"model.layers.{index}.{suffix}"], want)
    # mergekit: pre_weights from the first slice's sources, post_weights from the last slice's
    assert _same_bytes(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert _same_bytes(got["model.norm.weight"], b["model.norm.weight"])
    assert _same_bytes(got["lm_head.weight"], b["lm_head.weight"])
    assert len(got) == 3 + 4 * len(LAYER_SUFFIXES)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4


def test_frankenmerge_loads_and_runs_in_transformers(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "out"
    _merge(_frankenmerge(tmp_path, family), out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 3]])).logits
    assert logits.shape == (1, 4, TINY.vocab) and torch.isfinite(logits).all()


def read_checkpoint_any(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


# ---------------------------------------------------------------- parameters


def test_parameter_precedence_source_then_slice_then_top_level(tmp_path, family):
    """mergekit's ConfigReader.parameter: the source's value, else the slice's, else the top
    level's; a filtered value that matches nothing falls through to the next level."""
    recipe = write_recipe(
        tmp_path / "r.yaml",
        merge_method="task_arithmetic",
        base_model=str(family["base"]),
        parameters={"weight": 0.1},
        slices=[
            {
                "parameters": {"weight": [{"filter": "self_attn", "value": 0.7}]},
                "sources": [
                    _source(family["base"], 0, 3),
                    _source(family["a"], 0, 3, weight=[{"filter": "mlp", "value": 0.3}]),
                    _source(family["b"], 0, 3),
                ],
            }
        ],
    )
    tasks = _tasks(recipe)
    weights = {name: task.params.per_model["weight"] for name, task in tasks.items()}
    assert weights["model.layers.1.mlp.up_proj.weight"] == pytest.approx([0.3, 0.1])  # source; top level
    assert weights["model.layers.1.self_attn.q_proj.weight"] == pytest.approx([0.7, 0.7])  # slice
    assert weights["model.layers.1.input_layernorm.weight"] == pytest.approx([0.1, 0.1])  # top level
    assert weights["model.embed_tokens.weight"] == pytest.approx([0.1, 0.1])
    # and the merge uses them: base + Σ wᵢ τᵢ for an mlp tensor
    got = _merge(recipe, tmp_path / "out")
    base, a, b = (read_checkpoint_any(family[n]) for n in ("base", "a", "b"))
    name = "model.layers.1.mlp.up_proj.weight"
    tau_a, tau_b = a[name].float() - base[name].float(), b[name].float() - base[name].float()
    want = base[name].float() + 0.3 * tau_a + 0.1 * tau_b
    torch.testing.assert_close(got[name].float(), want.to(torch.bfloat16).float(), rtol=0, atol=1e-2)


def test_slice_parameters_apply_to_their_slice_only(tmp_path, family):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        merge_method="slerp",
        base_model=str(family["base"]),
        parameters={"t": 0.5},
        slices=[
            {
                "parameters": {"t": 0.2},
                "sources": [_source(family["base"], 0, 1), _source(family["a"], 0, 1)],
            },
            {"sources": [_source(family["base"], 1, 3), _source(family["a"], 1, 3)]},
        ],
    )
    tasks = _tasks(recipe)
    assert tasks["model.layers.0.mlp.up_proj.weight"].params["t"] == pytest.approx(0.2)
    assert tasks["model.layers.1.mlp.up_proj.weight"].params["t"] == pytest.approx(0.5)
    assert tasks["model.embed_tokens.weight"].params["t"] == pytest.approx(0.2)  # first slice's
    assert tasks["model.norm.weight"].params["t"] == pytest.approx(0.5)  # last slice's


def test_gradients_run_over_each_slice(tmp_path, family):
    """mergekit's plan_slice: layer i of an n-layer slice has t = i / (n - 1), t = 1 for a
    one-layer slice; tensors outside the layers take t = 0."""
    recipe = write_recipe(
        tmp_path / "r.yaml",
        merge_method="slerp",
        base_model=str(family["base"]),
        parameters={"t": [0.0, 0.4, 1.0]},
        slices=[
            {"sources": [_source(family["base"], 0, 1), _source(family["a"], 0, 1)]},
            {"sources": [_source(family["base"], 0, 3), _source(family["a"], 0, 3)]},
        ],
    )
    tasks = _tasks(recipe)
    t = {i: tasks[f"model.layers.{i}.self_attn.q_proj.weight"].params["t"] for i in range(4)}
    assert t == pytest.approx({0: 1.0, 1: 0.0, 2: 0.4, 3: 1.0})
    assert tasks["model.embed_tokens.weight"].params["t"] == 0.0
    assert tasks["lm_head.weight"].params["t"] == 0.0
    # layer 2 is layer 1 of each source: its inputs are read from there
    assert tasks["model.layers.2.mlp.up_proj.weight"].experts[0].name == "model.layers.1.mlp.up_proj.weight"


# ---------------------------------------------------------------- a base per slice


def _per_slice_base(tmp_path: Path, family, top_base: bool = True) -> Path:
    """Layer 0 merged into the base, layers 1-2 into a (its own base_model): mergekit's
    ConfigReader.base_model takes a slice's base_model before the top-level one."""
    a, b, base = (str(family[n]) for n in ("a", "b", "base"))
    fields: dict = {"base_model": base} if top_base else {}
    return write_recipe(
        tmp_path / "per-slice.yaml",
        merge_method="task_arithmetic",
        parameters={"weight": 0.5},
        out_dtype="float32",
        slices=[
            {
                "sources": [_source(base, 0, 1), _source(a, 0, 1)],
                **({} if top_base else {"base_model": base}),
            },
            {"sources": [_source(a, 1, 3), _source(b, 1, 3)], "base_model": a},
        ],
        **fields,
    )


@pytest.mark.parametrize("top_base", [True, False])
def test_a_slice_base_model_replaces_the_top_level_one_for_that_slice(tmp_path, family, top_base):
    got = _merge(_per_slice_base(tmp_path, family, top_base), tmp_path / "out")
    base, a, b = (
        {n: t.float() for n, t in read_checkpoint_any(family[m]).items()} for m in ("base", "a", "b")
    )

    def ta(into, other, name, other_name=None):  # θ₀ + 0.5·(θ₁ − θ₀)
        return into[name] + 0.5 * (other[other_name or name] - into[name])

    expected = {"model.embed_tokens.weight": ta(base, a, "model.embed_tokens.weight")}
    for suffix in LAYER_SUFFIXES:
        expected[f"model.layers.0.{suffix}"] = ta(base, a, f"model.layers.0.{suffix}")
        for layer in (1, 2):  # output layers 1, 2 = layers 1, 2 of a (the base) and b
            expected[f"model.layers.{layer}.{suffix}"] = ta(a, b, f"model.layers.{layer}.{suffix}")
    for name in ("model.norm.weight", "lm_head.weight"):  # the last slice's: into a
        expected[name] = ta(a, b, name)
    assert set(got) == set(expected)
    for name, want in expected.items():
        torch.testing.assert_close(got[name], want, rtol=1e-6, atol=1e-6, msg=name)
    plan = api.plan(_per_slice_base(tmp_path, family, top_base)).plan
    assert (plan.base is not None) == top_base  # config.json: the top-level base, else the first source


def test_a_slice_without_any_base_is_refused_naming_it(tmp_path, family):
    a, b, base = (str(family[n]) for n in ("a", "b", "base"))
    recipe = write_recipe(
        tmp_path / "r.yaml",
        merge_method="ties",
        slices=[
            {"sources": [_source(base, 0, 1), _source(a, 0, 1)], "base_model": base},
            {"sources": [_source(a, 1, 3), _source(b, 1, 3)]},
        ],
    )
    assert_user_error(run_cli("validate", recipe), "slices[1]", "needs base_model", "slices[1].base_model")
    assert_nothing_written(tmp_path / "out")


def test_a_slice_base_model_must_be_one_of_its_sources(tmp_path, family):
    a, b, c = (str(family[n]) for n in ("a", "b", "c"))
    recipe = write_recipe(
        tmp_path / "r.yaml",
        merge_method="task_arithmetic",
        slices=[{"sources": [_source(a, 0, 1), _source(b, 0, 1)], "base_model": c}],
    )
    out = tmp_path / "out"
    assert_user_error(run_cli("merge", recipe, "-o", out), "slices[0].base_model", "not a source")
    assert_nothing_written(out)


def test_residual_weight_is_accepted_and_said_to_do_nothing(tmp_path, family):
    a = str(family["a"])
    recipe = write_recipe(
        tmp_path / "r.yaml",
        merge_method="passthrough",
        slices=[{"sources": [_source(a, 0, 2)], "residual_weight": 0.5}],
    )
    result = run_cli("merge", recipe, "-o", tmp_path / "out", "--dry-run", "--json")
    assert result.code == 0, result.stderr
    assert any("slices[0].residual_weight has no effect" in w for w in json.loads(result.stdout)["warnings"])


def test_modules_recipes_are_refused_in_one_line(tmp_path, family):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        merge_method="linear",
        modules={"text_decoder": {"models": [{"model": str(family["a"])}, {"model": str(family["b"])}]}},
    )
    out = tmp_path / "out"
    assert_user_error(run_cli("merge", recipe, "-o", out), "modules:", "not supported", "models: or slices:")
    assert_nothing_written(out)


# ---------------------------------------------------------------- bad input


def _no_layers(tmp_path: Path) -> Path:
    weights = {
        "model.embed_tokens.weight": torch.zeros(TINY.vocab, TINY.hidden),
        "model.norm.weight": torch.ones(TINY.hidden),
    }
    return save_checkpoint(tmp_path / "flat", weights, TINY.config("bfloat16"))


@pytest.mark.parametrize(
    "case, needles",
    [
        ("outside", ["slices[1].sources[0].layer_range", "[1, 5]", "3 layers"]),
        ("reversed", ["slices[0].sources[0].layer_range", "[2, 1]", "reversed"]),
        ("lengths", ["slices[0].sources", "same number of layers"]),
        ("no_layers", ["no numbered layers"]),
        ("both", ["models or slices"]),
        ("two_for_passthrough", ["slices[0].sources", "passthrough"]),
        ("base_missing", ["slices[0].sources", "base_model", "not a source"]),
        ("duplicate", ["slices[0].sources[1]", "already"]),
        ("unknown_key", ["slices[0].sources[0]", "layer_rnge", "layer_range"]),
        ("trim_scope", ["trim_scope: model", "same models"]),
        ("trim_scope_bases", ["trim_scope: model", "same base"]),
    ],
)
def test_bad_slices_are_one_line_exit_2_nothing_written(tmp_path, family, case, needles):
    a, b, base = str(family["a"]), str(family["b"]), str(family["base"])
    fields: dict = {"merge_method": "passthrough"}
    if case == "outside":
        fields["slices"] = [{"sources": [_source(a, 0, 2)]}, {"sources": [_source(b, 1, 5)]}]
    elif case == "reversed":
        fields["slices"] = [{"sources": [_source(a, 2, 1)]}]
    elif case == "lengths":
        fields.update(merge_method="linear", slices=[{"sources": [_source(a, 0, 2), _source(b, 0, 3)]}])
    elif case == "no_layers":
        fields["slices"] = [{"sources": [_source(_no_layers(tmp_path), 0, 1)]}]
    elif case == "both":
        fields.update(models=[{"model": a}], slices=[{"sources": [_source(a, 0, 1)]}])
    elif case == "two_for_passthrough":
        fields["slices"] = [{"sources": [_source(a, 0, 1), _source(b, 0, 1)]}]
    elif case == "base_missing":
        fields.update(
            merge_method="task_arithmetic",
            base_model=base,
            slices=[{"sources": [_source(a, 0, 1), _source(b, 0, 1)]}],
        )
    elif case == "duplicate":
        fields.update(merge_method="linear", slices=[{"sources": [_source(a, 0, 1), _source(a, 1, 2)]}])
    elif case == "unknown_key":
        fields["slices"] = [{"sources": [{"model": a, "layer_rnge": [0, 1]}]}]
    elif case == "trim_scope":
        fields.update(
            merge_method="ties",
            base_model=base,
            parameters={"trim_scope": "model"},
            slices=[
                {"sources": [_source(base, 0, 1), _source(a, 0, 1)]},
                {"sources": [_source(base, 1, 3), _source(b, 1, 3)]},
            ],
        )
    elif case == "trim_scope_bases":  # the same sources, but slice 1 merges into a
        fields.update(
            merge_method="ties",
            base_model=base,
            parameters={"trim_scope": "model"},
            slices=[
                {"sources": [_source(base, 0, 1), _source(a, 0, 1)]},
                {"sources": [_source(base, 1, 3), _source(a, 1, 3)], "base_model": a},
            ],
        )
    recipe = write_recipe(tmp_path / "bad.yaml", **fields)
    out = tmp_path / "out"
    assert_user_error(run_cli("merge", recipe, "-o", out), *needles)
    assert_nothing_written(out)


# ---------------------------------------------------------------- --dry-run


def test_dry_run_json_shows_the_layer_map(tmp_path, family):
    out = tmp_path / "out"
    result = run_cli("merge", _frankenmerge(tmp_path, family), "-o", out, "--dry-run", "--json")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["num_hidden_layers"] == 4
    assert [(e["layer"], e["slice"], e["sources"]) for e in summary["layers"]] == [
        (0, 0, [{"model": "a", "layer": 0}]),
        (1, 0, [{"model": "a", "layer": 1}]),
        (2, 1, [{"model": "b", "layer": 1}]),
        (3, 1, [{"model": "b", "layer": 2}]),
    ]
    assert summary["tensors"] == 3 + 4 * len(LAYER_SUFFIXES)
    assert not out.exists()


def test_dry_run_prints_the_layer_map(tmp_path, family):
    result = run_cli("merge", _frankenmerge(tmp_path, family), "-o", tmp_path / "out", "--dry-run")
    assert result.code == 0, result.stderr
    text = " ".join(result.stdout.split())  # the table may wrap; compare word by word
    assert "0 ← a[0] (slice 0, t 0.00)" in text and "3 ← b[2] (slice 1, t 1.00)" in text
