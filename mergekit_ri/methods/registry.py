"""The method registry: a name maps to its parameters and one pure tensor function.

A method function receives, for one tensor, the base (fp32, or None), the experts stacked
along a new first axis (fp32, [N, ...]; the function may overwrite it to save memory), the
parameters resolved for this tensor (`TensorParams`) and a `TensorContext` (name, seed, an
optional per-layer `report` callback), and returns the merged fp32 tensor. It never touches
files or devices: the engine does that, so the same function serves CPU and GPU.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..errors import UserError, hint, shown
from ..lazy import torch

if TYPE_CHECKING:
    from ..recipe import Recipe


FLOAT32_MAX = 3.4028234663852886e38  # parameters become fp32 tensors: larger would be inf


@dataclass(frozen=True)
class Param:
    """One parameter of a method. Its kind follows its default (a bool is true/false, a name has
    `choices`, anything else is a number); numbers may carry a range, checked at load time."""

    name: str
    default: Any
    per_model: bool
    doc: str
    choices: tuple[str, ...] = ()
    low: float | None = None  # inclusive bounds of a number
    high: float | None = None
    integer: bool = False  # a whole number (no gradient: interpolation would make fractions)

    @property
    def kind(self) -> str:
        if self.choices:
            return "choice"
        return "bool" if isinstance(self.default, bool) else "number"

    def range_text(self) -> str:
        """'in [0, 1]', '>= 0', or '' for any finite number."""
        if self.low is not None and self.high is not None:
            return f"in [{self.low:g}, {self.high:g}]"
        if self.low is not None:
            return f">= {self.low:g}"
        return f"<= {self.high:g}" if self.high is not None else ""

    def check(self, value: Any, where: str) -> Any:
        """`value` (one scalar, or a gradient's list) if this parameter takes it, else a one-line
        UserError naming `where`; 0 and 1 are read as false and true, as mergekit does."""
        if isinstance(value, list) and not self.integer:  # a gradient: each point (integers have none)
            return [self.check(point, f"{where}[{i}]") for i, point in enumerate(value)]
        if self.kind == "bool":
            if isinstance(value, bool) or (type(value) is int and value in (0, 1)):
                return bool(value)
            raise UserError(f"{where}: expected true or false, got {_described(value)}")
        if self.kind == "choice":
            if isinstance(value, str) and value in self.choices:
                return value
            if isinstance(value, str):
                raise UserError(f"{where}: '{shown(value)}' is not one of {', '.join(self.choices)}")
            raise UserError(f"{where}: expected one of {', '.join(self.choices)}, got {_described(value)}")
        return self._check_number(value, where)

    def _check_number(self, value: Any, where: str) -> float | int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            what = "a whole number" if self.integer else "a number"
            raise UserError(f"{where}: expected {what}, got {_described(value)}{_exponent_hint(value)}")
        if abs(value) > FLOAT32_MAX or not math.isfinite(value):  # in this order: a huge int has no float
            raise UserError(f"{where}: {shown(value)} is not a finite float32 number")
        if self.integer and value != int(value):
            raise UserError(f"{where}: expected a whole number, got {shown(value)}")
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise UserError(
                f"{where}: {shown(value)} is outside the range of {self.name} ({self.range_text()})"
            )
        return int(value) if self.integer else value


def _described(value: Any) -> str:
    if isinstance(value, str):
        return f"'{shown(value)}'"
    if isinstance(value, list):
        return "a gradient (a list)"
    return shown(value)


def _exponent_hint(value: Any) -> str:
    """YAML 1.1 (PyYAML, mergekit) reads 1e5 or 1.0e5 as text: only 1.0e+5 is a number."""
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE]\d+", value.strip()):
        return " (YAML reads an exponent without a sign as text: write e.g. 1.0e+5)"
    return ""


# Ranges of the parameters by name (every method means the same by them): filled into a method's
# Param at registration when it declares none, so `ri-merge methods` shows them.
RANGES: dict[str, dict[str, Any]] = {
    "density": {"low": 0.0, "high": 1.0},
    "rank_ratio": {"low": 0.0, "high": 1.0},
    "common_space_fraction": {"low": 0.0, "high": 1.0},
    "momentum": {"low": 0.0, "high": 1.0},
    "lr": {"low": 0.0},
    "t": {"low": 0.0},
    "iterations": {"low": 0.0, "integer": True},
    "epsilon": {"low": 0.0, "high": 1.0},
    "gamma": {"low": 0.0, "high": 1.0},
    "select_topk": {"low": 0.0, "high": 1.0},
    "max_iter": {"low": 0.0, "integer": True},
    "tol": {"low": 0.0},
    "eps": {"low": 0.0},
}


def with_range(param: Param) -> Param:
    """`param` with its range from RANGES (unless it has one), said in its doc."""
    bounds = RANGES.get(param.name)
    if param.kind != "number" or not bounds or param.low is not None or param.high is not None:
        return param
    ranged = replace(param, **bounds)
    suffix = "; a whole number" if ranged.integer else ""
    return replace(ranged, doc=f"{param.doc} ({ranged.range_text()}{suffix})")


# Every parameter name some merge method of mergekit 0.1.5 declares: a recipe written for mergekit
# may set any of them whatever its method (mergekit ignores those its method lacks); ri-merge takes
# them with a plan warning when the method does not use them, and refuses other unknown names.
MERGEKIT_PARAMETERS = frozenset(
    {
        "weight",
        "density",
        "lambda",
        "normalize",
        "rescale",
        "int8_mask",
        "gamma",
        "epsilon",  # task arithmetic
        "t",
        "nuslerp_row_wise",
        "nuslerp_flatten",
        "normalize_weights",
        "eps",
        "max_iter",
        "tol",  # slerp family
        "filter_wise",
        "scale",
        "select_topk",
        "r",
        "alpha",  # model_stock, passthrough, sce, ram
    }
)


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
    # what the method's whole-model pre-pass found (MethodSpec.prepass; e.g. TIES's per-expert
    # thresholds for trim_scope: model), or None when it has none
    prepass: tuple[float, ...] | None = None
    # flat index of the first entry when the engine passes a block of rows (counter-based draws)
    offset: int = 0
    # dtype the output will be saved in: raw-input kernels may store it directly (one rounding)
    out_dtype: torch.dtype = field(default_factory=lambda: torch.float32)
    # the inputs read on demand, for methods that stream (see MethodSpec.streams); None: in memory
    source: Any = None
    # what the method's `block_stats` found over the whole tensor when the engine passes a block
    # of its rows (TIES: thresholds and election balance), or None when it passes the whole tensor
    block_stats: Any = None
    # optional per-layer report (tensor name, figures such as the solver's loss before/after),
    # called by methods that solve a problem per layer; None: nothing is computed for it
    report: Callable[[str, dict[str, float]], None] | None = None


MergeFn = Callable[["torch.Tensor | None", "torch.Tensor", TensorParams, TensorContext], "torch.Tensor"]
# one read of every merged tensor, each as flat base [n] and experts [N, n] in the file dtype
PassMap = Callable[["torch.Tensor", "torch.Tensor"], Any]  # one tensor's (base [n], experts [N, n]) → a part
PassFold = Callable[[Any, Any], Any]  # two parts → one (associative and commutative)
# scan(part, fold): `part` of every merged tensor, folded; None when there is none. The tensors may
# be visited in any order and on other machines (Ray tasks), so `part` must pickle (a module-level
# function or a functools.partial of one) and return CPU-movable values.
PassScan = Callable[[PassMap, PassFold], Any]


@dataclass(frozen=True)
class Prepass:
    """A pass over the whole model that a method needs before it merges any tensor (TIES's
    `trim_scope: model` thresholds). Given the parameters of every merged tensor, `reads` says how
    many times it reads the inputs (0: not needed for these parameters; the progress bar counts
    them) and `run(params, scan)` computes what each tensor's merge gets as `ctx.prepass`, calling
    `scan` once per read. A pass is a map and a fold, so the engine can run it in this process or
    spread over a Ray cluster's tasks (each folds its tensors, the driver folds their parts); the
    method owns the maths."""

    reads: Callable[[Sequence[TensorParams]], int]
    run: Callable[[Sequence[TensorParams], PassScan], tuple[float, ...]]


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
    # for a method that streams: what it needs of a whole tensor to merge it block by block like an
    # elementwise method, computed from a `kernels.Source` of the whole tensor (rows read on
    # demand) before its first block and handed to each block as ctx.block_stats (TIES: each
    # expert's threshold and the election's balance, which decides the zero-sum entries); None:
    # the method merges each tensor whole (streamed when it is big)
    block_stats: Callable[[Any, TensorParams, TensorContext], Any] | None = None
    # recipe-level rules of this method beyond single values (how many models, base or not, pairs
    # of parameters): a one-line UserError naming the field, run by `check_parameters`
    check_recipe: Callable[[Recipe, str], None] | None = None
    # a whole-model pass to run before the merge (see Prepass); None: tensors merge independently
    prepass: Prepass | None = None

    # mergekit's BasePolicy.IGNORED (linear, karcher, passthrough): a base_model is one more model
    # merged like the others, not a base; the plan adds it to the models when not listed there
    base_as_model: bool = False

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)

    def unused_parameters(self, recipe: Recipe) -> list[str]:
        """Where the recipe sets a parameter that mergekit knows but this method does not use."""
        names = {p.name for p in self.params}
        return [
            f"{where}.{key}"
            for where, values in _places(recipe)
            for key in values
            if key not in names and key in MERGEKIT_PARAMETERS
        ]

    def check_parameters(self, recipe: Recipe, source: str) -> None:
        """Refuse parameter names this method does not take (with the closest spelling), global
        parameters set per model, and values of the wrong kind or out of range."""
        names = {p.name for p in self.params}
        for where, values in _places(recipe):
            for key, value in values.items():
                if key not in names and key in MERGEKIT_PARAMETERS:
                    continue  # mergekit's, unused here: a plan warning (`unused_parameters`)
                if key not in names:
                    raise UserError(
                        f"{source}: {where}: unknown parameter '{shown(key)}' for merge_method "
                        f"'{self.name}'{hint(key, names)}; it takes: {', '.join(sorted(names)) or 'none'}"
                    )
                param = self.param(key)
                if where.startswith("models") and not param.per_model:
                    raise UserError(
                        f"{source}: {where}: '{key}' is a global parameter; set it under top-level parameters"
                    )
                for leaf, entry in _leaves(value):
                    try:
                        param.check(leaf, f"{source}: {where}.{key}")
                    except UserError as exc:
                        raise UserError(f"{exc}{entry}") from None
        if self.check_recipe is not None:
            self.check_recipe(recipe, source)


def _places(recipe: Recipe) -> list[tuple[str, dict[str, Any]]]:
    """(field, parameters) of the recipe's global and per-model parameter sections."""
    places = [("parameters", recipe.parameters)]
    return places + [(f"models[{i}].parameters", m.parameters) for i, m in enumerate(recipe.models)]


def _leaves(value: Any) -> list[tuple[Any, str]]:
    """(value, which entry) of a parameter: itself, or each filtered entry's value."""
    if isinstance(value, list) and value and all(hasattr(entry, "value") for entry in value):
        return [(entry.value, f" (entry {i}, {_filter_text(entry.filter)})") for i, entry in enumerate(value)]
    return [(value, "")]


def _filter_text(name: str | None) -> str:
    return "no filter" if name is None else f"filter '{shown(name)}'"


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    spec = replace(spec, params=tuple(with_range(p) for p in spec.params))
    for name in (spec.name, *spec.aliases):
        _REGISTRY[name] = spec
    return spec


def get_method(name: str, source: str = "recipe") -> MethodSpec:
    if name not in _REGISTRY:
        raise UserError(
            f"{source}: unknown merge_method '{shown(name)}'{hint(name, _REGISTRY)}; "
            f"known: {', '.join(sorted(all_methods()))}"
        )
    return _REGISTRY[name]


def all_methods() -> dict[str, MethodSpec]:
    return {spec.name: spec for spec in _REGISTRY.values()}
