"""The recipe's records (`mergekit_ri/schema.py`) against pydantic 2 itself: the same values
accepted, the same results, the same messages for what is refused, and the model API the rest of
ri-merge and the library's users call (`model_validate`, `model_copy`, `model_dump`,
`model_fields`, `model_fields_set`, equality, pickling)."""

from __future__ import annotations

import copy
import pickle
from typing import Literal, Optional, Union

import pydantic
import pytest

from mergekit_ri import schema
from mergekit_ri.recipe import ModelEntry, Recipe, parse_recipe
from mergekit_ri.schema import Field, Record, StrictInt, ValidationError
from mergekit_ri.vocab.config import TokenizerConfig

Scalar = Union[bool, int, float, str]

# (annotation in schema's terms, the same in pydantic's, values to try)
CASES = [
    (int, int, [5, True, 5.0, 5.5, "5", " 7 ", "x", None, 2**70, [1], float("inf")]),
    (float, float, [1, 1.5, True, "1.5", "x", None, "inf"]),
    (str, str, ["a", 5, True, None, b"x", [1]]),
    (bool, bool, [True, 1, 0, 2, "yes", "off", "x", None, 1.0]),
    (StrictInt, pydantic.StrictInt, [5, True, 5.0, "5"]),
    (Optional[str], Optional[str], [None, "a", 5]),
    (Union[int, str], Union[int, str], ["5GB", 5, 5.0, "5", None, [1]]),
    (Union[int, str, None], Union[int, str, None], [None, "1GiB", 3]),
    (Scalar, Scalar, [True, 1, 1.0, "a", 0, "1"]),
    (list[Scalar], list[Scalar], [[1, 0.5, "a", True], (1, 2), "ab", 5]),
    (list[str], list[str], [["a"], ("a", "b"), "ab", [1]]),
    (dict[str, Scalar], dict[str, Scalar], [{"a": 1}, {1: 2}, [1], {"a": [1]}]),
    (
        tuple[StrictInt, StrictInt],
        tuple[pydantic.StrictInt, pydantic.StrictInt],
        [[1, 2], (3, 4), [1], [1, 2, 3], [1, 2.0], [1, True], "12"],
    ),
    (Literal["error", "warn"], Literal["error", "warn"], ["error", "warn", "ignore", 1]),
    (Literal["a", "b", "c"], Literal["a", "b", "c"], ["d"]),
]


def _ours(tp, value):
    try:
        return "ok", schema._check(tp, value, (), {}, False)
    except ValidationError as exc:
        return "error", exc.msg


def _pydantic(tp, value):
    try:
        return "ok", pydantic.TypeAdapter(tp).validate_python(value)
    except pydantic.ValidationError as exc:
        return "error", exc.errors()[0]["msg"]


@pytest.mark.parametrize("ours,theirs,values", CASES, ids=[str(c[0]) for c in CASES])
def test_values_are_accepted_and_converted_as_pydantic_does(ours, theirs, values):
    for value in values:
        got, expected = _ours(ours, value), _pydantic(theirs, value)
        assert got[0] == expected[0], (value, got, expected)
        if got[0] == "ok":
            assert got[1] == expected[1] and type(got[1]) is type(expected[1]), (value, got, expected)


@pytest.mark.parametrize(
    "ours,theirs,values",
    [c for c in CASES if not str(c[0]).startswith("typing.Union")],  # unions: our own wording
    ids=[str(c[0]) for c in CASES if not str(c[0]).startswith("typing.Union")],
)
def test_refusals_say_what_pydantic_says(ours, theirs, values):
    """Messages of one type are pydantic's word for word (unions say which types they take)."""
    for value in values:
        got, expected = _ours(ours, value), _pydantic(theirs, value)
        if got[0] == "error" and not isinstance(value, (list, tuple, dict)):
            assert got[1] == expected[1], (value, got, expected)


class _Inner(Record):
    model_config = schema.ConfigDict(extra="forbid", frozen=True)
    kind: Literal["x"]
    n: StrictInt | None = Field(None, ge=0)


class _Outer(Record):
    model_config = schema.ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str = Field(min_length=1)
    steps: int = Field(3, ge=0, lt=10)
    rate: float = Field(0.5, gt=0, le=1)
    items: list[_Inner] = Field(default_factory=list)
    size: Union[int, str] = Field("2", validate_default=True)

    @schema.field_validator("size")
    @classmethod
    def _size(cls, value: int | str) -> int:
        return int(value)


class _PInner(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    kind: Literal["x"]
    n: pydantic.StrictInt | None = pydantic.Field(None, ge=0)


class _POuter(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str = pydantic.Field(min_length=1)
    steps: int = pydantic.Field(3, ge=0, lt=10)
    rate: float = pydantic.Field(0.5, gt=0, le=1)
    items: list[_PInner] = pydantic.Field(default_factory=list)
    size: Union[int, str] = pydantic.Field("2", validate_default=True)

    @pydantic.field_validator("size")
    @classmethod
    def _size(cls, value: int | str) -> int:
        return int(value)


RECORDS = [
    {"name": "a"},
    {"name": "a", "steps": 9, "rate": 1, "items": [{"kind": "x", "n": 2}], "size": 7},
    {"name": ""},
    {},
    {"name": "a", "steps": 10},
    {"name": "a", "steps": -1},
    {"name": "a", "rate": 0},
    {"name": "a", "rate": float("nan")},
    {"name": "a", "rate": 2},
    {"name": "a", "items": [{"kind": "y"}]},
    {"name": "a", "items": [{"kind": "x", "n": -1}]},
    {"name": "a", "items": [{"kind": "x", "m": 1}]},
    {"name": "a", "other": 1},
    {"name": "a", "size": "x"},
]


@pytest.mark.parametrize("data", RECORDS, ids=[str(d) for d in RECORDS])
def test_records_validate_as_pydantic_models_do(data):
    try:
        theirs = ("ok", _POuter.model_validate(data).model_dump())
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        theirs = ("error", error["loc"], error["msg"])
    try:
        ours = ("ok", _Outer.model_validate(data).model_dump())
    except ValidationError as exc:
        ours = ("error", exc.loc, exc.msg)
    if theirs[0] == "error" and theirs[2].startswith("Value error"):
        assert ours[:2] == theirs[:2] and ours[2].startswith("Value error")
    else:
        assert ours == theirs


def test_the_model_api_of_a_recipe():
    recipe = parse_recipe(
        {
            "merge_method": "ties",
            "base_model": "b",
            "models": [{"model": "x", "parameters": {"density": 0.5}}, {"model": "y"}],
            "seed": 3,
        }
    )
    assert recipe.model_fields_set == {"merge_method", "base_model", "models", "seed"}
    assert "max_memory" in Recipe.model_fields and "model" in ModelEntry.model_fields
    dumped = recipe.model_dump(mode="json", exclude_defaults=True, exclude={"seed"})
    assert dumped == {
        "merge_method": "ties",
        "models": [{"model": "x", "parameters": {"density": 0.5}}, {"model": "y"}],
        "base_model": "b",
        "out_shard_size": 5_000_000_000,  # validated from its default "5GB", as pydantic dumps it
    }
    changed = recipe.model_copy(update={"seed": 4})
    assert (changed.seed, recipe.seed) == (4, 3) and changed != recipe
    assert changed.model_copy(update={"seed": 3}) == recipe
    assert pickle.loads(pickle.dumps(recipe)) == recipe and copy.deepcopy(recipe) == recipe
    assert pickle.loads(pickle.dumps(recipe)).model_fields_set == recipe.model_fields_set
    assert Recipe.model_validate(recipe) is recipe
    assert Recipe.model_validate(recipe.model_dump()) == recipe
    with pytest.raises(ValidationError) as refused:
        Recipe.model_validate({**recipe.model_dump(), "seed": 2**63})
    assert refused.value.errors()[0]["loc"] == ("seed",)
    entry = ModelEntry(model="z")
    assert entry.parameters == {} and entry.model_fields_set == {"model"}
    with pytest.raises(ValidationError, match="Field required"):
        ModelEntry()


def test_frozen_records_are_hashable_and_refuse_changes():
    config = TokenizerConfig.model_validate({"source": "base", "pad_to_multiple_of": 8})
    assert hash(config) == hash(TokenizerConfig(source="base", pad_to_multiple_of=8))
    with pytest.raises(TypeError, match="frozen"):
        config.source = "union"
    with pytest.raises(TypeError, match="unhashable"):
        hash(ModelEntry(model="a"))
