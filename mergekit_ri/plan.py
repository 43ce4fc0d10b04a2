"""The merge plan: everything decided from headers alone, before any weight is read.

Every input's headers are parsed and checked against the base (names, shapes, dtypes); every
parameter is resolved per tensor; every output tensor gets its shard and byte offset. A bad
recipe or input fails here, in seconds, not twenty minutes into a merge. `--dry-run` prints
`MergePlan.summary()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError
from .heads import HeadSelector, head_selector, looks_like_head
from .io.sources import FLOAT_CODES, ST_ITEMSIZE, ModelSource, TensorRef, load_source
from .io.writer import ShardLayout, TensorSlot
from .methods import MethodSpec, TensorParams, get_method
from .params import layer_depths, resolve
from .recipe import ModelEntry, Recipe
from .vocab.plan import VocabPlan, plan_vocabulary

if TYPE_CHECKING:
    from .memory import MemoryPlan

PREFETCH_DEFAULT = 2


@dataclass(frozen=True)
class TensorTask:
    """One output tensor: where its inputs are, how it is merged, where it goes."""

    name: str
    shape: tuple[int, ...]
    out_dtype: str
    reference: TensorRef  # the base's tensor (or the first model's, for base-free methods)
    base: TensorRef | None
    experts: tuple[TensorRef, ...]
    merge: bool  # False: copied from the reference (integer/bool buffers)
    params: TensorParams | None
    shard: int = 0
    offset: int = 0

    @property
    def out_nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * ST_ITEMSIZE[self.out_dtype]

    @property
    def in_nbytes(self) -> int:
        refs = (self.base, *self.experts) if self.merge else (self.reference,)
        return sum(r.nbytes for r in refs if r is not None)


@dataclass
class ShardPlan:
    filename: str
    tensors: list[str] = field(default_factory=list)
    data_bytes: int = 0


@dataclass
class MergePlan:
    recipe: Recipe
    method: MethodSpec
    base: ModelSource | None
    experts: list[ModelSource]
    tasks: list[TensorTask]
    shards: list[ShardPlan]
    warnings: list[str]
    heads: dict[str, dict[str, TensorRef]] = field(default_factory=dict)  # expert label → head tensors
    heads_default: str | None = None
    # paths the output must stay clear of besides the inputs read (the experts as the user gave
    # them, when RI merges adapted copies from its cache)
    protected: list[Path] = field(default_factory=list)
    # the memory cap in bytes (--max-memory, MergeOptions.max_memory or the recipe's max_memory) and
    # where it comes from; None: a share of the available memory (`memory.default_cap`)
    max_memory: int | None = None
    max_memory_source: str = "given"
    prefetch: int = PREFETCH_DEFAULT  # units the engine may read ahead (MergeOptions.prefetch)
    vocab: VocabPlan | None = None  # the output's tokenizer and re-laid vocabulary tensors (vocab/)

    @property
    def config_source(self) -> ModelSource:
        """Whose config.json the output carries: the default head's expert when there are heads."""
        if self.heads_default is not None:
            return next(m for m in self.experts if m.label == self.heads_default)
        return self.reference

    @property
    def reference(self) -> ModelSource:
        return self.base or self.experts[0]

    @property
    def tokenizer_source(self) -> ModelSource | None:
        """Whose tokenizer files are copied: `tokenizer_source` names 'base' or one of the models
        (for `union`, or a `tokenizer:` section, whose extras: generation_config.json, ...)."""
        section = self.recipe.tokenizer
        choice = section.source if section is not None else self.recipe.tokenizer_source
        if choice is None:
            return None
        if choice in ("base", "union"):
            return self.reference
        for model in ([self.base] if self.base else []) + self.experts:
            if choice in (model.reference, model.label):
                return model
        raise UserError(
            f"recipe: tokenizer_source '{choice}' is neither 'base' nor one of the recipe's models "
            f"({', '.join(m.label for m in self.experts)})"
        )

    @property
    def bytes_read(self) -> int:
        return sum(t.in_nbytes for t in self.tasks)

    @property
    def bytes_written(self) -> int:
        return sum(t.out_nbytes for t in self.tasks)

    def shard_layouts(self) -> list[ShardLayout]:
        """The output files as the writer sees them: per shard, its tensors' names, dtypes,
        shapes and offsets, in plan order (which is each shard's header order)."""
        slots: list[list[TensorSlot]] = [[] for _ in self.shards]
        for t in self.tasks:
            slots[t.shard].append(TensorSlot(t.name, t.out_dtype, tuple(t.shape), t.offset, t.out_nbytes))
        return [ShardLayout(s.filename, s.data_bytes, tuple(group)) for s, group in zip(self.shards, slots)]

    def memory(self, device: str | None = None) -> MemoryPlan:
        """How the merge is laid out under its memory cap (`memory.plan_memory`) on `device`
        (default: a GPU's layout when the recipe names `cuda`, else the CPU's: `auto` is not
        resolved here, which would start CUDA); a UserError naming the tensor when the cap is too
        small for it."""
        from .memory import plan_memory  # it builds on reading, which builds on plan

        if device is None:
            device = "cuda" if str(self.recipe.device).startswith("cuda") else "cpu"
        return plan_memory(self, prefetch=self.prefetch, device=device)

    def peak_memory_estimate(self) -> int:
        """Planned peak resident bytes of the merge (on the recipe's device, as `memory`): its
        tensors under the cap, plus the runtime (Python, torch)."""
        return self.memory().total

    def summary(self) -> dict[str, Any]:
        memory = self.memory()
        return {
            "method": self.method.name,
            "base": self.base.reference if self.base else None,
            "models": [m.reference for m in self.experts],
            "tensors": len(self.tasks),
            "tensors_merged": sum(t.merge for t in self.tasks),
            "tensors_copied": sum(not t.merge for t in self.tasks),
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "shards": [
                {"file": s.filename, "tensors": len(s.tensors), "bytes": s.data_bytes} for s in self.shards
            ],
            "peak_memory_estimate": memory.total,
            "memory": memory.summary(),
            "heads": {
                label: {n: list(r.shape) for n, r in refs.items()} for label, refs in self.heads.items()
            },
            "heads_default": self.heads_default,
            **({"vocabulary": self.vocab.summary()} if self.vocab is not None else {}),
            "inputs": {m.label: m.note for m in self.sources if m.note},
            "warnings": self.warnings,
        }

    @property
    def sources(self) -> list[ModelSource]:
        """The base (when there is one) and the experts."""
        return ([self.base] if self.base else []) + self.experts


def _label(reference: str, index: int, taken: set[str]) -> str:
    name = Path(reference.partition("@")[0]).name or f"model{index}"
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    label = name if name not in taken else f"{name}-{index}"
    taken.add(label)
    return label


def load_sources(recipe: Recipe, recipe_dir: Path | None) -> tuple[ModelSource | None, list[ModelSource]]:
    taken = {"base"}
    base = load_source(recipe.base_model, "base", recipe_dir) if recipe.base_model else None
    experts = [
        load_source(m.model, _label(m.model, i, taken), recipe_dir) for i, m in enumerate(recipe.models)
    ]
    return base, experts


def merge_inputs(recipe: Recipe, method: MethodSpec) -> tuple[Recipe, list[str]]:
    """The recipe with `models` set to the models merged, as mergekit 0.1.5 sets them; and warnings.

    mergekit merges a base_model once, listed under `models:` or not. For a method with a base, an
    entry naming it is the base, not one more expert (else it would take a share of the weights and
    shift DARE's masks). Methods without a base (`base_as_model`: linear, ...) merge it as one more
    model, appended when not listed."""
    base = recipe.base_model
    listed = [i for i, m in enumerate(recipe.models) if base is not None and m.model == base]
    if base is None or (method.base_as_model and listed):
        return recipe, []
    if method.base_as_model:
        warning = (
            f"base_model {base} is merged as one more model, as mergekit does for {method.name} "
            "(with the top-level parameters); leave base_model out to merge only the models"
        )
        return recipe.model_copy(update={"models": [*recipe.models, ModelEntry(model=base)]}), [warning]
    kept = [m for m in recipe.models if m.model != base]
    if listed and not kept:
        raise UserError(
            f"recipe: models: lists only the base_model ({base}); merge_method "
            f"'{method.name}' needs other models to merge into it"
        )
    warnings = [
        f"models[{i}] is the base_model: merged as the base, so its parameters "
        f"({', '.join(recipe.models[i].parameters)}) are not used, as in mergekit"
        for i in listed
        if recipe.models[i].parameters
    ]
    return (recipe.model_copy(update={"models": kept}) if listed else recipe), warnings


def unused_parameters_warning(recipe: Recipe, method: MethodSpec) -> list[str]:
    """One line naming the parameters mergekit knows that this method does not use (ignored)."""
    unused = method.unused_parameters(recipe)
    if not unused:
        return []
    return [
        f"merge_method '{method.name}' does not use {', '.join(unused)} (mergekit parameters of other "
        "methods): ignored"
    ]


def _vocab_hint(name: str, ref: tuple[int, ...], other: tuple[int, ...]) -> str:
    looks_like_vocab = any(k in name for k in ("embed", "lm_head", "wte", "word_embeddings", "output.weight"))
    if looks_like_vocab and len(ref) == len(other) and ref[0] != other[0] and ref[1:] == other[1:]:
        return (
            f"; the vocabularies differ ({other[0]} vs {ref[0]} tokens): set tokenizer_source "
            "(union, base or a model) to merge them into one vocabulary"
        )
    return ""


def check_compatible(
    reference: ModelSource, others: list[ModelSource], skip: HeadSelector | None = None
) -> list[str]:
    """Every model must have the reference's tensors with the same shapes; returns warnings."""
    warnings = []
    ref_label = "the base" if reference.label == "base" else f"model '{reference.label}'"
    for model in others:
        if model is reference:
            continue
        for name, ref in reference.tensors.items():
            if skip is not None and skip(name):
                continue
            mine = model.tensors.get(name)
            if mine is None:
                raise UserError(
                    f"model '{model.label}' ({model.reference}) lacks tensor '{name}' that {ref_label} has"
                )
            if mine.shape != ref.shape:
                hint = (
                    "; these look like task heads: add `heads: auto` to the recipe"
                    if looks_like_head(name)
                    else ""
                )
                raise UserError(
                    f"model '{model.label}': tensor '{name}' has shape {list(mine.shape)} but {ref_label} has "
                    f"{list(ref.shape)}{_vocab_hint(name, ref.shape, mine.shape)}{hint}"
                )
            if (mine.dtype in FLOAT_CODES) != (ref.dtype in FLOAT_CODES):
                raise UserError(
                    f"model '{model.label}': tensor '{name}' is {mine.dtype} but {ref_label} has {ref.dtype}"
                )
        extra = sorted(n for n in set(model.tensors) - set(reference.tensors) if skip is None or not skip(n))
        if extra:
            warnings.append(
                f"model '{model.label}' has {len(extra)} tensor(s) the base lacks, ignored (e.g. '{extra[0]}')"
            )
        stored = {m.dtype for m in model.tensors.values() if getattr(m, "lora_b", None) is None}
        mixed = sorted(stored - {r.dtype for r in reference.tensors.values()})  # LoRA'd tensors come as fp32
        if mixed:
            warnings.append(
                f"model '{model.label}' stores {', '.join(mixed)} tensors where the base differs; all maths is fp32"
            )
    return warnings


def resolve_params(recipe: Recipe, method: MethodSpec, name: str, t: float) -> TensorParams:
    """Every parameter of `method` for one tensor: per-model value, else global, else default.

    Each value is checked again (kind, finite, range): a recipe built in code, or changed with
    `model_copy`, has not been through the loader's checks."""
    per_model: dict[str, list[float]] = {}
    globals_: dict[str, Any] = {}
    for param in method.params:

        def value(model_params: dict, own: str) -> Any:
            for where, source in ((own, model_params), (f"parameters.{param.name}", recipe.parameters)):
                if param.name in source:
                    resolved = resolve(source[param.name], name, t, discrete=param.kind != "number")
                    if resolved is not None:
                        return param.check(resolved, f"{where} for tensor '{name}'")
            return param.default

        if param.per_model:
            per_model[param.name] = [
                float(value(m.parameters, f"models[{i}].parameters.{param.name}"))
                for i, m in enumerate(recipe.models)
            ]
        else:
            globals_[param.name] = value({}, "")
    return TensorParams(per_model, globals_)


def assign_shards(tasks: list[TensorTask], shard_size: int) -> tuple[list[TensorTask], list[ShardPlan]]:
    """Greedy, in input order: a new shard when the next tensor would overflow this one."""
    groups: list[list[TensorTask]] = [[]]
    used = 0
    for task in tasks:
        if groups[-1] and used + task.out_nbytes > shard_size:
            groups.append([])
            used = 0
        groups[-1].append(task)
        used += task.out_nbytes
    total = len(groups)
    placed, shards = [], []
    for index, group in enumerate(groups):
        shard = ShardPlan(f"model-{index + 1:05d}-of-{total:05d}.safetensors")
        for task in group:
            placed.append(replace(task, shard=index, offset=shard.data_bytes))
            shard.tensors.append(task.name)
            shard.data_bytes += task.out_nbytes
        shards.append(shard)
    return placed, shards


def find_heads(
    experts: list[ModelSource], is_head: HeadSelector, default: str | None, source: str = "recipe"
) -> tuple[dict[str, dict[str, TensorRef]], str]:
    """Each expert's head tensors, and which expert's head goes into the merged checkpoint."""
    heads = {}
    for model in experts:
        refs = {name: ref for name, ref in model.tensors.items() if is_head(name)}
        if not refs:
            raise UserError(
                f"model '{model.label}' ({model.reference}) has no tensor matching the recipe's heads filter"
            )
        heads[model.label] = refs
    labels = {m.label: m.label for m in experts} | {m.reference: m.label for m in experts}
    if default is None:
        return heads, experts[0].label
    if default not in labels:
        raise UserError(f"{source}: heads_default '{default}' is not one of the models: {', '.join(heads)}")
    return heads, labels[default]


def build_plan(recipe: Recipe, recipe_dir: Path | None = None) -> MergePlan:
    if recipe.slices is not None:  # mergekit's slices: layer ranges merged and stacked (slices.py)
        from .slices import build_sliced_plan

        return build_sliced_plan(recipe, recipe_dir)
    method = get_method(recipe.merge_method)
    written = recipe  # as the user wrote it: the plan keeps it (model card, mergekit_config.yml)
    recipe, notes = merge_inputs(recipe, method)
    notes = unused_parameters_warning(written, method) + notes
    base, experts = load_sources(recipe, recipe_dir)
    vocab, base, experts = plan_vocabulary(recipe, base, experts)  # before the shape checks: re-laid refs
    reference = base or experts[0]
    is_head = head_selector(recipe.heads, experts[0].config())  # experts are the classifiers
    if recipe.heads_default is not None and is_head is None:
        raise UserError("recipe: heads_default needs heads (e.g. heads: auto)")
    heads, heads_default = find_heads(experts, is_head, recipe.heads_default) if is_head else ({}, None)
    warnings = notes + (vocab.warnings if vocab else []) + check_compatible(reference, experts, is_head)
    out_code = recipe.output_dtype_code()
    backbone = {n: r for n, r in reference.tensors.items() if is_head is None or not is_head(n)}
    ordered = sorted(backbone.items(), key=lambda item: (str(item[1].path), item[1].start))
    depths = layer_depths(backbone)
    tasks = []
    for name, ref in ordered:
        merge = ref.dtype in FLOAT_CODES
        tasks.append(
            TensorTask(
                name=name,
                shape=ref.shape,
                out_dtype=(out_code or ref.dtype) if merge else ref.dtype,
                reference=ref,
                base=base.tensors[name] if base else None,
                experts=tuple(m.tensors[name] for m in experts),
                merge=merge,
                params=resolve_params(recipe, method, name, depths[name]) if merge else None,
            )
        )
    if heads_default is not None:  # the default expert's head rides along, copied as it is
        for name, ref in heads[heads_default].items():
            tasks.append(TensorTask(name, ref.shape, ref.dtype, ref, None, (), False, None))
    tasks, shards = assign_shards(tasks, recipe.shard_size_bytes)
    plan = MergePlan(
        written, method, base, experts, tasks, shards, warnings, heads, heads_default, vocab=vocab
    )
    plan.tokenizer_source  # noqa: B018 -- what is written beside the weights is checked with the plan,
    plan.config_source.config()  # not after hours of merging
    return plan
