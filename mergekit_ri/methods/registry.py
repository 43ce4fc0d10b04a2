"""The method registry: a name maps to its parameters and one pure tensor function.

A method function receives, for one tensor, the base (fp32, or None), the experts stacked
along a new first axis (fp32, [N, ...]; the function may overwrite it to save memory), the
parameters resolved for this tensor (`TensorParams`) and a `TensorContext` (name, seed, an
optional per-layer `report` callback), and returns the merged fp32 tensor. It never touches
files or devices: the engine does that, so the same function serves CPU and GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import UserError, closest

if TYPE_CHECKING:
    from ..recipe import Recipe


@dataclass(frozen=True)
class Param:
    name: str
    default: Any
    per_model: bool
    doc: str
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class TensorParams:
    """Parameters resolved for one tensor: per-model ones as [N] lists, global ones as scalars."""

    per_model: dict[str, list[float]]
    globals: dict[str, Any]

    def vector(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """A per-model parameter as a [N, 1, 1, ...] tensor that broadcasts against `like`."""
        values = torch.tensor(self.per_model[name], dtype=torch.float32, device=like.device)
        return values.reshape(-1, *([1] * (like.dim() - 1)))

    def __getitem__(self, name: str) -> Any:
        return self.globals[name]


@dataclass(frozen=True)
class TensorContext:
    name: str
    seed: int = 0
    # per-expert magnitude thresholds from a whole-model pre-pass (TIES trim_scope: model)
    thresholds: tuple[float, ...] | None = None
    # flat index of the first entry when the engine passes a block of rows (DARE's counters)
    offset: int = 0
    # dtype the output will be saved in: raw-input kernels may store it directly (one rounding)
    out_dtype: torch.dtype = torch.float32
    # the inputs read on demand, for methods that stream (see MethodSpec.streams); None: in memory
    source: Any = None
    # optional per-layer report (tensor name, figures such as the solver's loss before/after),
    # called by methods that solve a problem per layer; None: nothing is computed for it
    report: Callable[[str, dict[str, float]], None] | None = None


MergeFn = Callable[[torch.Tensor | None, torch.Tensor, TensorParams, TensorContext], torch.Tensor]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: MergeFn
    params: tuple[Param, ...]
    needs_base: bool
    summary: str
    citation: str = ""
    aliases: tuple[str, ...] = field(default=())
    # True when each output entry depends only on the same entry of the inputs: the engine may
    # then feed the function blocks of rows of big tensors instead of whole tensors
    elementwise: bool = False
    # extra working memory (bytes) for one tensor of this shape with N experts, for --dry-run
    workspace: Callable[[tuple[int, ...], int], int] = field(default=lambda shape, n: 0)
    # True when the function takes the inputs in their file dtype (bf16/fp16/fp32) and upcasts
    # itself, block by block (the kernels in `mergekit_ri.kernels`); False: fp32 inputs
    raw_inputs: bool = False
    # True when, for tensors too big to hold N+1 times, the function can take its inputs from
    # ctx.source (a `kernels.Source` reading rows on demand) with base and experts None
    streams: bool = False

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)

    def check_parameters(self, recipe: Recipe, source: str) -> None:
        """Refuse parameter names this method does not take, with the closest spelling."""
        names = {p.name for p in self.params}
        per_model = {p.name for p in self.params if p.per_model}
        places = [("parameters", recipe.parameters, names)]
        places += [(f"models[{i}].parameters", m.parameters, names) for i, m in enumerate(recipe.models)]
        for where, values, allowed in places:
            for key, value in values.items():
                if key not in allowed:
                    raise UserError(
                        f"{source}: {where}: unknown parameter '{key}' for merge_method "
                        f"'{self.name}'{closest(key, allowed)}; it takes: {', '.join(sorted(allowed)) or 'none'}"
                    )
                param = self.param(key)
                for choice in _leaf_values(value) if param.choices else ():
                    if choice not in param.choices:
                        raise UserError(
                            f"{source}: {where}.{key}: '{choice}' is not one of {', '.join(param.choices)}"
                        )
                if where.startswith("models") and key not in per_model:
                    raise UserError(f"{source}: {where}: '{key}' is a global parameter; set it under top-level parameters")


def _leaf_values(value: Any) -> list[Any]:
    """The values a parameter can take: itself, or each filtered entry's value."""
    if isinstance(value, list):
        return [leaf for entry in value for leaf in _leaf_values(getattr(entry, "value", entry))]
    return [value]


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    for name in (spec.name, *spec.aliases):
        _REGISTRY[name] = spec
    return spec


def get_method(name: str, source: str = "recipe") -> MethodSpec:
    if name not in _REGISTRY:
        raise UserError(f"{source}: unknown merge_method '{name}'{closest(name, _REGISTRY)}; "
                        f"known: {', '.join(sorted(all_methods()))}")
    return _REGISTRY[name]


def all_methods() -> dict[str, MethodSpec]:
    return {spec.name: spec for spec in _REGISTRY.values()}
