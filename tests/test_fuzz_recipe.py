"""Fuzzing the recipe loader: whatever the text or the parsed structure, a recipe is validated or
refused with a one-line `UserError`, never another exception; a recipe that loads resolves its
parameters for any tensor without a further error (every check happens at load time).

Bounded in CI; `RI_MERGE_FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz_recipe.py` for more.
"""

from __future__ import annotations

import math
import os
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergekit_ri.errors import UserError
from mergekit_ri.methods import all_methods, get_method
from mergekit_ri.plan import resolve_params
from mergekit_ri.recipe import Recipe, parse_recipe, parse_recipe_text

EXAMPLES = int(os.environ.get("RI_MERGE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

VALID = """merge_method: ties
base_model: ./base
models:
  - model: ./a
    parameters: {weight: 1.0, density: [0.3, 0.1]}
  - model: ./b
parameters:
  lambda: 1.0
  normalize: true
  weight:
    - filter: self_attn
      value: [0.5, 1.0]
    - value: 0.8
dtype: bfloat16
out_shard_size: 5GB
"""

TOKENS = [
    "merge_method",
    "models",
    "model",
    "parameters",
    "base_model",
    "weight",
    "density",
    "lambda",
    "normalize",
    "filter",
    "value",
    "trim_scope",
    "solver",
    "iterations",
    "out_shard_size",
    "seed",
    "resolve_interference",
    "auxiliary_data",
    "on_nonfinite",
    "dtype",
    "ties",
    "linear",
    "wudi",
    "dare_ties",
    ": ",
    "- ",
    "\n",
    "\n  ",
    "\n    ",
    "[",
    "]",
    "{",
    "}",
    ", ",
    "&a ",
    "*a",
    "&b ",
    "*b",
    "<<: ",
    "? ",
    "!!binary ",
    "!!python/object:os.system ",
    "!!set ",
    "!!float ",
    "!!str ",
    "!!int ",
    "'",
    '"',
    "#",
    "|",
    ".nan",
    ".inf",
    "-.inf",
    "1e5",
    "1.0e+40",
    "0x1F",
    "~",
    "null",
    "yes",
    "no",
    "0",
    "1",
    "-1",
    "0.5",
    "2.5",
    "2020-01-01",
    "5GB",
    "\t",
    "\\",
    "%YAML 1.1\n",
    "---\n",
    "...\n",
    "\ufeff",
    "\x00",
    "é",
]

yamlish = st.one_of(
    st.lists(st.sampled_from(TOKENS), max_size=40).map("".join),
    st.text(alphabet=st.sampled_from(list(":-[]{}&*!|>'\"#%@,?\n .abcxyz0129") + ["\t", "é"]), max_size=120),
)


@st.composite
def mutated(draw: st.DrawFn) -> str:
    """The valid recipe with a few characters or tokens replaced, inserted or removed."""
    text = VALID
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 6))
        text = text[:at] + draw(st.sampled_from(TOKENS + [""])) + text[at + cut :]
    return text


leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([400, -300, 6000]).map(lambda n: (-1 if n < 0 else 1) * 10 ** abs(n)),  # huge ints
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(["ties", "linear", "wudi", "tensor", "model", "5GB", "base", "warn"]),
    st.binary(max_size=4),
)
keys = st.one_of(st.sampled_from(TOKENS[:28]), st.text(max_size=6), st.integers(-3, 3))
trees = st.recursive(
    leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=25,
)

param_names = sorted({p.name for spec in all_methods().values() for p in spec.params})
param_values = st.one_of(
    leaves,
    st.lists(
        st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3), leaves), max_size=4
    ),
    st.lists(
        st.fixed_dictionaries(
            {"value": st.one_of(leaves, st.lists(st.floats(-2, 2), max_size=3))},
            optional={"filter": st.one_of(st.text(max_size=4), leaves)},
        ),
        max_size=3,
    ),
    trees,
)
parameters = st.dictionaries(st.sampled_from(param_names), param_values, max_size=4)
model_entries = st.fixed_dictionaries(
    {"model": st.sampled_from(["./a", "./b"])}, optional={"parameters": parameters}
)
recipes = st.fixed_dictionaries(
    {
        "merge_method": st.one_of(st.sampled_from(sorted(all_methods())), leaves),
        "models": st.one_of(st.lists(model_entries, max_size=3), trees),
    },
    optional={
        "base_model": st.one_of(st.just("./base"), leaves),
        "parameters": st.one_of(parameters, trees),
        "seed": leaves,
        "out_shard_size": leaves,
        "dtype": leaves,
        "on_nonfinite": leaves,
        "resolve_interference": st.one_of(
            trees,
            st.fixed_dictionaries(
                {"auxiliary_data": st.just("gaussian")}, optional={"lr": leaves, "steps": leaves}
            ),
        ),
    },
)


def load_or_refuse(load: Any, data: Any) -> None:
    """The property: a Recipe whose parameters resolve everywhere, or one UserError line."""
    try:
        recipe = load(data, "fuzz.yaml")
    except UserError as exc:
        message = str(exc)
        assert message.startswith("fuzz.yaml") and "\n" not in message and len(message) < 1000, message
        return
    assert isinstance(recipe, Recipe)
    method = get_method(recipe.merge_method)
    for name, t in [
        ("model.embed_tokens.weight", 0.0),
        ("model.layers.3.self_attn.q_proj.weight", 0.5),
        ("model.layers.9.mlp.up_proj.weight", 1.0),
    ]:
        params = resolve_params(recipe, method, name, t)
        for values in params.per_model.values():
            assert all(math.isfinite(v) for v in values), values
        for value in params.globals.values():
            assert not isinstance(value, float) or math.isfinite(value), value


@FUZZ
@given(yamlish)
def test_yamlish_text_loads_or_is_refused(text):
    load_or_refuse(parse_recipe_text, text)


@FUZZ
@given(mutated())
def test_mutated_recipes_load_or_are_refused(text):
    load_or_refuse(parse_recipe_text, text)


@FUZZ
@given(recipes)
def test_random_structures_load_or_are_refused(data):
    load_or_refuse(parse_recipe, data)


@FUZZ
@given(recipes)
def test_random_structures_as_yaml_text_load_or_are_refused(data):
    try:
        text = yaml.safe_dump(data)
    except (yaml.YAMLError, ValueError):  # not every structure has a YAML text (int > 4300 digits)
        return
    load_or_refuse(parse_recipe_text, text)


@FUZZ
@given(trees)
def test_any_tree_loads_or_is_refused(data):
    load_or_refuse(parse_recipe, data)
