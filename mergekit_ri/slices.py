"""Slices: mergekit's `slices:` recipes, planned from the headers like whole-model ones.

A slice lists `sources`, each a model and a `layer_range` [start, end). Sources of one slice cover
the same number of layers and are merged layer by layer (the merge method over those layers);
slices in sequence stack their layers (frankenmerges, usually with `passthrough`). This follows
mergekit 0.1.5's `MergePlanner` (mergekit/plan.py) and `ConfigReader` (mergekit/config.py):

- output layers are numbered 0, 1, ... in slice order, whatever the source layer was;
- tensors outside the layers come from the first slice's sources (embeddings, the `pre_weights`)
  or the last slice's sources (final norm, lm_head: the `post_weights`), merged with that slice's
  parameters at t = 0;
- a gradient's `t` runs over each slice on its own: layer i of an n-layer slice has
  t = i / (n - 1), t = 1 when the slice has one layer;
- a parameter is looked up on the source, then the slice, then the top-level `parameters`, each
  falling through when its filters match nothing (mergekit has no `models:` level with slices);
- a slice's `base_model` replaces the top-level one for that slice (mergekit's
  `ConfigReader.base_model`); the embeddings take the first slice's, the final norm and lm_head
  the last slice's; a method that needs a base needs one for every slice, and it must be one of
  the slice's sources (mergekit's `validate_inputs`);
- config.json comes from the top-level base_model, else the first source, with the new layer count.

Everything here reads headers only: a range past a model's layers, sources of different lengths,
a model without numbered layers stop the plan with one line before any weight is read.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import UserError
from .io.sources import FLOAT_CODES, ModelSource, TensorRef, load_source
from .methods import MethodSpec, TensorParams, get_method
from .plan import MergePlan, TensorTask, _label, assign_shards, resolve_params, unused_parameters_warning
from .recipe import FilteredValue, ModelEntry, ParamValue, Recipe, SliceEntry
from .vocab.plan import relay_sources

# the first `.<number>.` of a name is its layer: model.layers.7.mlp.up_proj.weight → layer 7
_LAYER_NAME = re.compile(r"^(.*?\.)(\d+)\.(.+)$")
# tensors outside the layers that come before them (mergekit's pre_weights: token and position
# embeddings); the rest (final norm, lm_head) come after them (post_weights)
_PRE_WEIGHTS = ("embed", "wte", "wpe")
_POST_DESPITE_NAME = ("embed_out",)  # gpt-neox's lm_head
# config.json keys holding the layer count, as architectures name it (mergekit: num_layers_config_key)
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# methods that ignore base_model (mergekit's passthrough takes exactly one tensor)
_BASE_FREE = {"passthrough"}


# ---------------------------------------------------------------- recipe-time checks


def slice_length(entry: SliceEntry) -> int:
    first = entry.sources[0].layer_range
    return first[1] - first[0]


def check_slice_data(data: Any, source: str) -> None:
    """Keys and parameter values of `slices:` as written, before pydantic coerces them: the same
    one-line errors as for `models:` (closest spelling, wrong kinds), naming the slice field."""
    from .recipe import SliceSource, _check_keys, check_parameter_section  # the loader's own checks

    if not isinstance(data, list):
        return  # pydantic says what `slices` should be
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            continue
        _check_keys(entry, SliceEntry, source, f"slices[{i}].")
        check_parameter_section(entry.get("parameters"), f"slices[{i}].parameters", source)
        sources = entry.get("sources")
        for j, src in enumerate(sources if isinstance(sources, list) else []):
            if isinstance(src, dict):
                _check_keys(src, SliceSource, source, f"slices[{i}].sources[{j}].")
                check_parameter_section(src.get("parameters"), f"slices[{i}].sources[{j}].parameters", source)


def check_slices(recipe: Recipe, spec: MethodSpec, source: str) -> None:
    """What a sliced recipe must satisfy before any header is read: ranges, lengths, and each
    slice's models and parameters as the method's own checks see a `models:` recipe."""
    if recipe.heads is not None or recipe.resolve_interference is not None:
        what = "heads" if recipe.heads is not None else "resolve_interference"
        raise UserError(f"{source}: {what} cannot be combined with slices; merge whole models (models:)")
    replace(spec, check_recipe=None).check_parameters(recipe, source)  # top-level parameters
    for i, entry in enumerate(recipe.slices or []):
        _check_ranges(entry, i, source)
        if spec.needs_base and slice_base(recipe, spec, entry) is None:
            raise UserError(
                f"{source}: slices[{i}]: merge_method '{spec.name}' needs base_model "
                f"(top-level, or slices[{i}].base_model)"
            )
        view = slice_recipe(recipe, spec, i)
        own = view.model_copy(update={"parameters": entry.parameters})  # the slice's names, not the top's
        _renamed(i, source, replace(spec, check_recipe=None).check_parameters, own, source)
        _check_base_listed(recipe, spec, entry, i, source)
        if spec.check_recipe is not None:
            _renamed(i, source, spec.check_recipe, view, source)


def _check_ranges(entry: SliceEntry, index: int, source: str) -> None:
    seen: dict[str, int] = {}
    for j, src in enumerate(entry.sources):
        start, end = src.layer_range
        where = f"{source}: slices[{index}].sources[{j}].layer_range"
        if start < 0:
            raise UserError(f"{where}: [{start}, {end}] starts before layer 0")
        if end <= start:
            raise UserError(
                f"{where}: [{start}, {end}] is empty or reversed; write [start, end) with start < end"
            )
        if src.model in seen:
            raise UserError(
                f"{source}: slices[{index}].sources[{j}]: model {src.model} is already "
                f"sources[{seen[src.model]}] of this slice; a slice merges each model once"
            )
        seen[src.model] = j
    first = entry.sources[0].layer_range
    for j, src in enumerate(entry.sources[1:], 1):
        if src.layer_range[1] - src.layer_range[0] != first[1] - first[0]:
            raise UserError(
                f"{source}: slices[{index}].sources: sources[0] covers {first[1] - first[0]} layers "
                f"({list(first)}) but sources[{j}] covers {src.layer_range[1] - src.layer_range[0]} "
                f"({list(src.layer_range)}); every source of a slice covers the same number of layers"
            )


def _check_base_listed(recipe: Recipe, spec: MethodSpec, entry: SliceEntry, index: int, source: str) -> None:
    """mergekit merges a slice from its sources only: a base used by the method must be one."""
    base = slice_base(recipe, spec, entry)
    if base is None or any(s.model == base for s in entry.sources):
        return
    field = f"slices[{index}].base_model" if entry.base_model is not None else "base_model"
    raise UserError(
        f"{source}: slices[{index}].sources: {field} {base} is not a source "
        f"of this slice; merge_method '{spec.name}' merges each slice into the base, "
        "so list it there"
    )


def _renamed(index: int, source: str, check: Callable[..., None], *args: Any) -> None:
    """Run a `models:` check on a slice's view, its message naming the slice's fields instead."""
    try:
        check(*args)
    except UserError as exc:
        head = f"{source}: "
        rest = str(exc).removeprefix(head)
        rest = re.sub(r"^models\[(\d+)\]", rf"slices[{index}].sources[\1]", rest)
        rest = re.sub(r"^models:", f"slices[{index}].sources:", rest)
        rest = re.sub(r"^parameters", f"slices[{index}].parameters", rest)
        raise UserError(f"{head}{rest}") from None


def _uses_base(recipe: Recipe, spec: MethodSpec) -> bool:
    # linear, karcher (base_as_model): mergekit merges a base only where a slice lists it
    return recipe.base_model is not None and not spec.base_as_model and spec.name not in _BASE_FREE


def slice_base(recipe: Recipe, spec: MethodSpec, entry: SliceEntry) -> str | None:
    """The base of one slice: its own `base_model`, else the top-level one (mergekit's
    ConfigReader.base_model); None when there is none or the method merges no base."""
    if spec.base_as_model or spec.name in _BASE_FREE:
        return None
    return entry.base_model if entry.base_model is not None else recipe.base_model


# ---------------------------------------------------------------- parameters


def slice_recipe(recipe: Recipe, spec: MethodSpec, index: int) -> Recipe:
    """Slice `index` as a `models:` recipe: its sources as the models (with their parameters) and
    the slice's parameters in front of the top-level ones, so that `resolve_params` and the
    method's checks see source > slice > top-level, as mergekit's ConfigReader does."""
    entry = (recipe.slices or [])[index]
    models = [ModelEntry(model=s.model, parameters=s.parameters) for s in entry.sources]
    return recipe.model_copy(
        update={
            "models": models,
            "slices": None,
            "parameters": layered(entry.parameters, recipe.parameters),
            "base_model": slice_base(recipe, spec, entry),
        }
    )


def layered(first: dict[str, ParamValue], then: dict[str, ParamValue]) -> dict[str, ParamValue]:
    """`first`'s values in front of `then`'s: a filtered value of `first` that matches no filter
    falls through to `then`'s value (mergekit evaluates each level and goes on when it gets None)."""
    merged = dict(then)
    for name, value in first.items():
        merged[name] = _fall_through(value, then[name]) if name in then else value
    return merged


def _is_filtered(value: ParamValue) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], FilteredValue)


def _fall_through(value: ParamValue, then: ParamValue) -> ParamValue:
    if not _is_filtered(value):
        return value  # a scalar or gradient always gives a value
    rest = list(then) if _is_filtered(then) else [FilteredValue(value=then)]
    return [*value, *rest]


def gradient_t(offset: int, length: int) -> float:
    """mergekit's t for layer `offset` of a slice of `length` layers (1 for a one-layer slice)."""
    return offset / (length - 1) if length > 1 else 1.0


def _params(view: Recipe, spec: MethodSpec, out_name: str, in_names: list[str], t: float) -> TensorParams:
    """Parameters for one output tensor: global ones by the output name, per-model ones by each
    model's input name (mergekit's ConfigReader filters them on the tensor read from that model)."""
    params = resolve_params(view, spec, out_name, t)
    for i, name in enumerate(in_names):
        if name != out_name and params.per_model:
            own = resolve_params(view, spec, name, t)
            for key, values in params.per_model.items():
                values[i] = own.per_model[key][i]
    return params


# ---------------------------------------------------------------- headers


@dataclass(frozen=True)
class Stack:
    """A model's numbered layers as its headers show them: layer → suffix → tensor name."""

    prefix: str
    layers: dict[int, dict[str, str]]

    @property
    def count(self) -> int:
        return max(self.layers) + 1


def layer_stack(model: ModelSource) -> Stack:
    """The model's one stack of numbered layers; a model without one cannot be sliced."""
    layers: dict[str, dict[int, dict[str, str]]] = {}
    for name in model.tensors:
        match = _LAYER_NAME.match(name)
        if match:
            prefix, index, suffix = match.group(1), int(match.group(2)), match.group(3)
            layers.setdefault(prefix, {}).setdefault(index, {})[suffix] = name
    if not layers:
        raise UserError(
            f"model '{model.label}' ({model.reference}) has no numbered layers "
            "(such as model.layers.0.*): slices need a model made of layers"
        )
    if len(layers) > 1:
        raise UserError(
            f"model '{model.label}' has several stacks of layers ({', '.join(sorted(layers))}): "
            "slices work on models with one (as mergekit without modules:)"
        )
    prefix, stack = next(iter(layers.items()))
    return Stack(prefix, stack)


def is_pre_weight(name: str) -> bool:
    """Tensors outside the layers that come before them (embeddings), from the first slice."""
    return any(k in name for k in _PRE_WEIGHTS) and not any(k in name for k in _POST_DESPITE_NAME)


@dataclass(frozen=True)
class OutputLayer:
    """One layer of the output: which slice made it, from which source layers, at which t."""

    index: int
    slice: int
    t: float
    sources: tuple[tuple[str, int], ...]  # (model reference, layer) per source of the slice


def layer_map(recipe: Recipe) -> list[OutputLayer]:
    """Output layers in order, renumbered from 0 (mergekit's running `_current_module_layers`)."""
    layers: list[OutputLayer] = []
    for i, entry in enumerate(recipe.slices or []):
        length = slice_length(entry)
        for offset in range(length):
            sources = tuple((s.model, s.layer_range[0] + offset) for s in entry.sources)
            layers.append(OutputLayer(len(layers), i, gradient_t(offset, length), sources))
    return layers


# ---------------------------------------------------------------- the plan


@dataclass
class SlicedPlan(MergePlan):
    """A plan for a sliced recipe: the layer map rides along (`--dry-run`, config.json)."""

    layers: list[dict[str, Any]] = field(default_factory=list)
    layer_count_key: str = "num_hidden_layers"

    @property
    def config_updates(self) -> dict[str, Any]:
        """What config.json changes: the new number of layers (mergekit's _model_out_config)."""
        return {self.layer_count_key: len(self.layers)}

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "num_hidden_layers": len(self.layers), "layers": self.layers}


@dataclass
class _Slice:
    """One slice, resolved against the headers: the models of its sources and how they merge."""

    view: Recipe  # the slice as a models: recipe (base first when the method uses one)
    models: list[ModelSource]  # per source
    stacks: list[Stack]
    base: int | None  # which source is the base
    experts: list[int]  # which sources are merged as models


def build_sliced_plan(recipe: Recipe, recipe_dir: Path | None = None) -> SlicedPlan:
    """One TensorTask per output tensor of a sliced recipe, every range and shape checked first."""
    method = get_method(recipe.merge_method)
    sources = _load_models(recipe, recipe_dir)
    vocab, sources = relay_sources(recipe, sources)  # different vocabularies: re-laid refs (vocab/)
    slices = [_resolve_slice(recipe, method, i, sources) for i in range(len(recipe.slices or []))]
    out_code = recipe.output_dtype_code()
    first, last = slices[0], slices[-1]
    tasks = _outside_tasks(first, method, out_code, pre=True, slice_index=0)
    mapping = layer_map(recipe)
    for layer in mapping:
        tasks += _layer_tasks(slices[layer.slice], layer, method, out_code)
    tasks += _outside_tasks(last, method, out_code, pre=False, slice_index=len(slices) - 1)
    _check_unique(tasks)
    tasks, shards = assign_shards(tasks, recipe.shard_size_bytes)
    base = sources[recipe.base_model] if _uses_base(recipe, method) and recipe.base_model else None
    experts = [m for m in sources.values() if m is not base]
    bases = {s.view.base_model for s in slices}
    _check_whole_model_scope(tasks, len(experts) if len(bases) == 1 else -1)
    plan = SlicedPlan(
        recipe,
        method,
        base,
        experts,
        tasks,
        shards,
        _warnings(recipe, method, slices),
        layers=[_layer_entry(layer, sources) for layer in mapping],
        vocab=vocab,
    )
    config = plan.config_source.config() or {}
    plan.layer_count_key = next((k for k in LAYER_COUNT_KEYS if k in config), "num_hidden_layers")
    plan.tokenizer_source  # noqa: B018 -- checked with the plan, not after the merge
    return plan


def _load_models(recipe: Recipe, recipe_dir: Path | None) -> dict[str, ModelSource]:
    """Every model once, the base first (its config.json is the output's, as in mergekit)."""
    taken = {"base"}
    models: dict[str, ModelSource] = {}
    if recipe.base_model is not None:
        models[recipe.base_model] = load_source(recipe.base_model, "base", recipe_dir)
    for entry in recipe.slices or []:
        for src in entry.sources:
            if src.model not in models:
                models[src.model] = load_source(src.model, _label(src.model, len(models), taken), recipe_dir)
    return models


def _resolve_slice(recipe: Recipe, method: MethodSpec, index: int, models: dict[str, ModelSource]) -> _Slice:
    entry = (recipe.slices or [])[index]
    view = slice_recipe(recipe, method, index)
    listed = [models[s.model] for s in entry.sources]
    stacks = [layer_stack(m) for m in listed]
    for j, (src, stack) in enumerate(zip(entry.sources, stacks)):
        start, end = src.layer_range
        if end > stack.count:
            raise UserError(
                f"slices[{index}].sources[{j}].layer_range: [{start}, {end}] is outside model "
                f"'{listed[j].label}', which has {stack.count} layers (0..{stack.count - 1})"
            )
    base = next((j for j, s in enumerate(entry.sources) if s.model == view.base_model), None)
    experts = [j for j in range(len(entry.sources)) if j != base]
    view = view.model_copy(update={"models": [view.models[j] for j in experts]})
    return _Slice(view, listed, stacks, base, experts)


def _layer_tasks(
    piece: _Slice, layer: OutputLayer, method: MethodSpec, out_code: str | None
) -> list[TensorTask]:
    """The tensors of one output layer: the first source's layer names, renumbered."""
    names = [stack.layers.get(at, {}) for stack, (_, at) in zip(piece.stacks, layer.sources)]
    if not names[0]:
        raise UserError(f"model '{piece.models[0].label}' has no tensors for layer {layer.sources[0][1]}")
    out_prefix = f"{piece.stacks[0].prefix}{layer.index}."
    tasks = []
    for suffix in names[0]:
        in_names = []
        for j, found in enumerate(names):
            if suffix not in found:
                raise UserError(
                    f"slices[{layer.slice}]: model '{piece.models[j].label}' has no tensor "
                    f"'{piece.stacks[j].prefix}{layer.sources[j][1]}.{suffix}' that "
                    f"'{piece.models[0].label}' has in the same place of the slice"
                )
            in_names.append(found[suffix])
        tasks.append(_task(piece, out_prefix + suffix, in_names, layer.t, method, out_code, layer.slice))
    return tasks


def _outside_tasks(
    piece: _Slice, method: MethodSpec, out_code: str | None, pre: bool, slice_index: int
) -> list[TensorTask]:
    """Embeddings from the first slice's sources, the rest outside the layers from the last's."""
    first = piece.models[0]
    names = [n for n in first.tensors if not _LAYER_NAME.match(n) and is_pre_weight(n) == pre]
    names.sort(key=lambda n: (str(first.tensors[n].path), first.tensors[n].start))
    tasks = []
    for name in names:
        for model in piece.models[1:]:
            if name not in model.tensors:
                raise UserError(
                    f"model '{model.label}' ({model.reference}) lacks tensor '{name}' "
                    f"that '{first.label}' has"
                )
        tasks.append(_task(piece, name, [name] * len(piece.models), 0.0, method, out_code, slice_index))
    return tasks


def _task(
    piece: _Slice,
    out_name: str,
    in_names: list[str],
    t: float,
    method: MethodSpec,
    out_code: str | None,
    slice_index: int,
) -> TensorTask:
    refs = [model.tensors[name] for model, name in zip(piece.models, in_names)]
    _check_shapes(piece, refs, in_names, slice_index)
    base = refs[piece.base] if piece.base is not None else None
    experts = tuple(refs[j] for j in piece.experts)
    reference = base or experts[0]
    merge = reference.dtype in FLOAT_CODES
    params = _params(piece.view, method, out_name, [in_names[j] for j in piece.experts], t) if merge else None
    return TensorTask(
        out_name,
        reference.shape,
        (out_code or reference.dtype) if merge else reference.dtype,
        reference,
        base,
        experts,
        merge,
        params,
    )


def _check_shapes(piece: _Slice, refs: list[TensorRef], names: list[str], slice_index: int) -> None:
    for j in range(1, len(refs)):
        if refs[j].shape != refs[0].shape:
            raise UserError(
                f"slices[{slice_index}]: model '{piece.models[j].label}' tensor '{names[j]}' has "
                f"shape {list(refs[j].shape)} but '{piece.models[0].label}' has "
                f"{list(refs[0].shape)} for '{names[0]}'"
            )
        if (refs[j].dtype in FLOAT_CODES) != (refs[0].dtype in FLOAT_CODES):
            raise UserError(
                f"slices[{slice_index}]: model '{piece.models[j].label}' tensor '{names[j]}' is "
                f"{refs[j].dtype} but '{piece.models[0].label}' has {refs[0].dtype}"
            )


def _check_whole_model_scope(tasks: list[TensorTask], count: int) -> None:
    """TIES `trim_scope: model` ranks each model's entries over the whole output: every merged
    tensor must then come from all of the recipe's models into one base, which slices of other
    models or with their own bases break (`count` -1: the slices' bases differ)."""
    merged = [t for t in tasks if t.merge and t.params is not None]
    if any(t.params.globals.get("trim_scope") == "model" for t in merged) and any(
        len(t.experts) != count for t in merged
    ):
        raise UserError(
            "trim_scope: model needs every slice to merge the same models into the same base; "
            "use trim_scope: tensor (the default) with these slices"
        )


def _check_unique(tasks: list[TensorTask]) -> None:
    """Two output tensors with one name would make a broken checkpoint (a model naming a tensor
    outside its layers with a number, say): refused."""
    seen: set[str] = set()
    for task in tasks:
        if task.name in seen:
            raise UserError(f"slices: the output would hold tensor '{task.name}' twice")
        seen.add(task.name)


def _layer_entry(layer: OutputLayer, models: dict[str, ModelSource]) -> dict[str, Any]:
    return {
        "layer": layer.index,
        "slice": layer.slice,
        "t": layer.t,
        "sources": [{"model": models[ref].label, "layer": at} for ref, at in layer.sources],
    }


def _warnings(recipe: Recipe, method: MethodSpec, slices: list[_Slice]) -> list[str]:
    warnings = unused_parameters_warning(recipe, method)
    for i, entry in enumerate(recipe.slices or []):
        if entry.residual_weight is not None:
            warnings.append(f"slices[{i}].residual_weight has no effect (mergekit 0.1.5 ignores it too)")
        view = recipe.model_copy(
            update={
                "parameters": entry.parameters,
                "slices": None,
                "models": [ModelEntry(model=s.model, parameters=s.parameters) for s in entry.sources],
            }
        )
        for line in unused_parameters_warning(view, method):
            line = re.sub(r"\bmodels\[(\d+)\]", rf"slices[{i}].sources[\1]", line)
            warnings.append(re.sub(r"(?<![.\w])parameters\.", f"slices[{i}].parameters.", line))
    if len(slices[-1].models) != len(slices[0].models):
        warnings.append(
            f"the final norm and lm_head are merged from the last slice's "
            f"{len(slices[-1].models)} source(s), the embeddings from the first slice's "
            f"{len(slices[0].models)}"
        )
    return warnings


__all__ = [
    "SlicedPlan",
    "build_sliced_plan",
    "check_slice_data",
    "check_slices",
    "gradient_t",
    "layer_map",
    "layer_stack",
    "layered",
    "slice_recipe",
]
