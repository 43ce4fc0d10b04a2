"""Recipe-level rules shared by methods: how many models they merge, whether a base is needed,
and the values a parameter may take over a whole recipe.

They run at recipe-check time (`MethodSpec.check_recipe`, called by `check_parameters`), so a
slerp recipe with three models stops before any header is read, with one line naming the field.
A model listed both as `base_model` and under `models:` counts once, as the base (mergekit's rule).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import UserError

if TYPE_CHECKING:
    from ..recipe import Recipe

RecipeCheck = Callable[["Recipe", str], None]


def others(recipe: Recipe) -> list[int]:
    """Indices of the `models:` entries that are not the base model."""
    return [i for i, m in enumerate(recipe.models) if m.model != recipe.base_model]


def _counted(recipe: Recipe) -> str:
    n = len(others(recipe))
    plural = "s" if n != 1 else ""
    if recipe.base_model is None:
        return f"got {n} model{plural} and no base_model"
    return f"got base_model + {n} other model{plural} in models"


def pair_with_base(method: str) -> RecipeCheck:
    """Exactly two models, one of them `base_model` (slerp, nearswap, arcee_fusion)."""

    def check(recipe: Recipe, source: str) -> None:
        if recipe.base_model is None or len(others(recipe)) != 1:
            raise UserError(
                f"{source}: models: merge_method '{method}' needs exactly 2 models, one of them "
                f"base_model (the other listed under models); {_counted(recipe)}"
            )

    return check


def exactly(method: str, count: int, base: str) -> RecipeCheck:
    """`count` models besides the base; `base` is 'optional' or 'none' (passthrough, nuslerp)."""

    def check(recipe: Recipe, source: str) -> None:
        if base == "none" and recipe.base_model is not None and len(others(recipe)) > 0:
            raise UserError(
                f"{source}: base_model: merge_method '{method}' takes exactly {count} model "
                f"and no base_model; {_counted(recipe)}"
            )
        n = len(others(recipe)) if base != "none" else len({m.model for m in recipe.models})
        if n != count:
            extra = " (plus an optional base_model)" if base == "optional" else ""
            raise UserError(
                f"{source}: models: merge_method '{method}' needs exactly {count} "
                f"model{'s' if count != 1 else ''}{extra}; {_counted(recipe)}"
            )

    return check


def at_least(method: str, count: int) -> RecipeCheck:
    """`count` or more models besides the base (model_stock, ram)."""

    def check(recipe: Recipe, source: str) -> None:
        if len(others(recipe)) < count:
            raise UserError(
                f"{source}: models: merge_method '{method}' needs base_model and at least "
                f"{count} other model{'s' if count != 1 else ''}; {_counted(recipe)}"
            )

    return check


def requires(method: str, name: str) -> RecipeCheck:
    """A global parameter that mergekit marks required (slerp's `t`): refused when absent."""

    def check(recipe: Recipe, source: str) -> None:
        if name not in recipe.parameters:
            raise UserError(f"{source}: parameters: merge_method '{method}' needs parameters.{name}")

    return check


def all_of(*checks: RecipeCheck) -> RecipeCheck:
    def check(recipe: Recipe, source: str) -> None:
        for one in checks:
            one(recipe, source)

    return check


def leaves(value: Any) -> tuple[list[float], bool]:
    """Every number a parameter value can give (gradient points, filtered values) and whether
    some tensor may get no value from it (filters without a catch-all entry)."""
    if isinstance(value, list) and value and all(hasattr(entry, "value") for entry in value):
        numbers = [x for entry in value for x in leaves(entry.value)[0]]
        return numbers, not any(entry.filter is None for entry in value)
    if isinstance(value, list):
        return [float(x) for x in value], False
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return [], False
    return [float(value)], False


def model_values(recipe: Recipe, index: int, name: str, default: float) -> list[float]:
    """The numbers a per-model parameter can take for model `index` over all tensors: its own
    value, else the global one, else the default (each also when the one before may not match)."""
    values: list[float] = []
    for place in (recipe.models[index].parameters, recipe.parameters):
        if name in place:
            numbers, partial = leaves(place[name])
            values += numbers
            if not partial:
                return values
    return values + [default]
