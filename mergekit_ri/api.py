"""The Python API: `load_recipe`, `plan` and `merge`, the steps the `ri-merge` command runs.

    import mergekit_ri as m
    result = m.merge("recipe.yaml", "out")          # or a YAML string, or a dict
    print(result.seconds, [f.name for f in result.files])

A merge is: read the recipe → RI, when the recipe asks for it (adapt each expert or find it in
the cache) → plan from the headers → stream the weights → write, then optionally the ξ report.
Progress and per-layer figures go to a `MergeEvents` object (ignore them: pass nothing). Bad
input raises `UserError` with the one-line message the CLI prints after "error: ".
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from .errors import UserError
from .events import MergeEvents

if TYPE_CHECKING:
    from .engine import MergeResult
    from .plan import MergePlan
    from .recipe import Recipe
    from .ri.keys import RIStatus

RecipeInput = Union[str, "os.PathLike[str]", Mapping[str, Any], "Recipe"]

__all__ = ["MergeOptions", "PlanReport", "load_recipe", "plan", "merge"]


@dataclass(frozen=True)
class MergeOptions:
    """How to run a merge; the recipe says what to merge.

    device: auto | cpu | cuda | cuda:N, overriding the recipe's (None: the recipe's).
    threads: CPU threads for the maths during the merge (None: torch's default, all cores).
    prefetch: tensors read ahead of the merge (memory ↔ overlap).
    max_memory: cap on the bytes of tensors the merge holds, as bytes or text ('512MiB', '2G' =
        2 GiB, '1.5GB' = 1.5·10⁹), overriding the recipe's max_memory (None: the recipe's, else
        half the machine's memory). The planner fits read-ahead, writer queue and row chunks
        under it, or refuses the merge up front naming the tensor that cannot fit (`memory.py`).
    force: replace a non-empty output folder.
    report_layers: per solved layer figures (WUDI's loss before → after) in `MergeResult.layers`
        and `MergeEvents.on_layer`; costs a loss evaluation per layer, so off by default.
    interference: for RI recipes, ξ with and without RI in `MergeResult.interference`; costs a
        second merge, into a temporary folder.
    checksums: sha256 of every written file in `MergeResult.files` (shards hashed as written).
    intermediate_dir: multi-stage recipes: where the named stages are written, kept and reused by
        the next run when a stage's recipe and inputs are unchanged (None: a hidden folder beside
        the output, removed once the final stage is written).

    Overrides of the recipe, as mergekit-yaml's flags set them (None: the recipe's):
    seed: the seed of random methods (DARE's masks); --random-seed.
    out_shard_size: bytes per output shard, or mergekit's text ('5B' = 5·10⁹); --out-shard-size.
    copy_tokenizer: False writes no tokenizer files unless the recipe names a tokenizer_source.
    write_model_card: False leaves out README.md and mergekit_config.yml.
    fingerprint_inputs: the card lists each input by a sha256 of its tensor bytes as the merge read
        them (`content_fingerprint`), not only by its header's; costs about one sha256 pass over
        the inputs, on the reader threads.

    Scale-out and faults (docs/scale-out.md):
    resume: continue the merge an earlier run of the same recipe into the same output left
        unfinished (interrupted, killed, crashed, a lost machine): its finished work units are verified by
        hash and kept; a different recipe or changed inputs are refused.
    ray: run the work units as tasks on a Ray cluster (needs the `ray` extra): its address
        (host:port, ray://host:port, auto) or local (Ray's default: RAY_ADDRESS, a cluster on
        this machine, else a new one); overrides the recipe's `distributed: {ray: ...}`.
    unit_size: output bytes per work unit, or text as out_shard_size takes it (None: 1/64 of the
        output, between 16 MiB and 1 GiB).
    devices: several local devices of one kind ("cuda:0,cuda:1" or a tuple), one worker process
        each, without Ray.
    """

    device: str | None = None
    threads: int | None = None
    prefetch: int = 2
    max_memory: int | str | None = None
    force: bool = False
    report_layers: bool = False
    interference: bool = False
    checksums: bool = True
    intermediate_dir: str | os.PathLike[str] | None = None
    seed: int | None = None
    out_shard_size: int | str | None = None
    copy_tokenizer: bool | None = None
    write_model_card: bool = True
    fingerprint_inputs: bool = False
    resume: bool = False
    ray: str | None = None
    unit_size: int | str | None = None
    devices: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.prefetch <= 64:
            raise UserError(f"prefetch must be between 1 and 64, not {self.prefetch}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"threads must be at least 1, not {self.threads}")
        if self.device is not None and not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise UserError(f"unknown device '{self.device}'; use auto, cpu, cuda or cuda:N")
        if self.ray is not None and not self.ray.strip():
            raise UserError("ray: give a Ray address (host:port, ray://host:port, auto) or local")
        if self.devices is not None:
            from .devices import parse_devices

            object.__setattr__(self, "devices", parse_devices(self.devices))
            if self.ray is not None:
                raise UserError(
                    "--devices and --ray: choose one (a Ray cluster spreads units over its own GPUs)"
                )
        if self.unit_size is not None:
            from .recipe import parse_size

            try:
                object.__setattr__(self, "unit_size", parse_size(self.unit_size))
            except ValueError as exc:
                raise UserError(f"unit size: {str(exc).replace('out_shard_size', 'unit size')}") from None
        if self.max_memory is not None:
            from .memory import parse_memory

            parse_memory(self.max_memory, "max memory")


@dataclass(frozen=True)
class PlanReport:
    """What a merge would do, from headers alone: the plan and, for RI recipes, which experts are
    already adapted in the cache (`ri.cache_hits`) and which would be trained first."""

    plan: MergePlan
    recipe: Recipe  # as given (with the device override), before RI points it at the cache
    ri: RIStatus | None = None
    stages: list[dict[str, Any]] | None = None  # multi-stage recipes: the stages in the order they run

    @property
    def warnings(self) -> list[str]:
        return list(self.plan.warnings)

    def summary(self) -> dict[str, Any]:
        """The JSON form (`ri-merge --dry-run --json`, without its "dry_run" key)."""
        return {
            **self.plan.summary(),
            **({"ri": self.ri.summary()} if self.ri is not None else {}),
            **({"stages": self.stages} if self.stages is not None else {}),
        }


@dataclass(frozen=True)
class _Source:
    """A recipe as read, and the folder its relative model paths are resolved against."""

    recipe: Recipe
    folder: Path | None
    stages: list[Recipe] | None = None  # every document of a multi-stage recipe (`recipe`: the last)
    name: str = "recipe"


def load_recipe(recipe: RecipeInput) -> Recipe:
    """A validated `Recipe` from a file path, YAML text or a dict (a `Recipe` passes through).

    A string is YAML text when it holds a newline or a ':' and names no existing file; anything
    else is a path."""
    return _read(recipe).recipe


def plan(recipe: RecipeInput, *, options: MergeOptions = MergeOptions()) -> PlanReport:
    """Validate and plan without reading any weight or writing anything (`--dry-run`).

    With RI, nothing is trained, but finding the cache entries hashes the experts' bytes."""
    source = _read(recipe)
    if source.stages is not None:
        return _plan_stages(source, options)
    original = _with_overrides(source.recipe, options)
    adapted, status = _resolve_interference(original, source.folder, MergeEvents(), dry_run=True)
    from .plan import build_plan

    return PlanReport(_with_memory(build_plan(adapted, source.folder), options), original, status)


def merge(
    recipe: RecipeInput,
    out: str | os.PathLike[str],
    *,
    options: MergeOptions = MergeOptions(),
    events: MergeEvents | None = None,
) -> MergeResult:
    """Merge the recipe's models into the folder `out` and describe what was written.

    `out` is written atomically: a hidden staging folder beside it is renamed into place at the
    end, so a failed merge leaves nothing that looks like a checkpoint. A KeyboardInterrupt once
    a work unit is finished keeps that folder and raises `MergeInterrupted` (a KeyboardInterrupt):
    the same call with `resume=True` computes only the rest."""
    events = events or MergeEvents()
    source = _read(recipe)
    if source.stages is not None:
        return _merge_stages(source, Path(out), options, events)
    return _merge_one(source, Path(out), options, events)


def _merge_one(source: _Source, out: Path, options: MergeOptions, events: MergeEvents) -> MergeResult:
    original = _with_overrides(source.recipe, options)
    with _threads(options.threads):
        from .engine import input_paths, run_merge, total_work_bytes
        from .io.output import check_target
        from .plan import build_plan

        protected = _ri_inputs(original, source.folder, out, options.force)
        distributed = _distributed(original, source.folder, options)  # RI's experts may train on it too
        try:
            adapted, status = _resolve_interference(
                original, source.folder, events, dry_run=False, distributed=distributed
            )
            if distributed is not None:
                distributed.recipe = adapted  # the merge's tasks plan from the adapted experts
            merge_plan = _with_memory(build_plan(adapted, source.folder), options)
            merge_plan.memory()  # a cap too small for a tensor: refused before anything is read or written
            merge_plan.protected.extend(protected)
            check_target(out, input_paths(merge_plan), options.force)  # a refused output: its one line alone
            events.on_plan(merge_plan, total_work_bytes(merge_plan))
            for warning in merge_plan.warnings:
                events.on_warning(warning)
            announced = len(merge_plan.warnings)
            layers: dict[str, dict[str, float]] | None = {} if options.report_layers else None
            result = run_merge(
                merge_plan,
                out,
                device=original.device,
                force=options.force,
                prefetch=options.prefetch,
                progress=events.on_progress,
                report=_layer_collector(layers, events) if layers is not None else None,
                checksums=options.checksums,
                provenance=status.provenance if status is not None else None,
                model_card=options.write_model_card,
                fingerprint_inputs=options.fingerprint_inputs,
                resume=options.resume,
                distributed=distributed,
                unit_bytes=options.unit_size,
            )
        finally:
            if distributed is not None:
                distributed.close()
        for warning in result.warnings[announced:]:  # found while merging (e.g. non-finite inputs)
            events.on_warning(warning)
        xi = None
        if options.interference and status is not None:
            from .ri.report import interference_report

            xi = interference_report(original, source.folder, result.out, original.device)
    return replace(result, ri=status, layers=layers, interference=xi)


# ---------------------------------------------------------------- steps


def _read(recipe: RecipeInput) -> _Source:
    from . import recipe as schema

    if isinstance(recipe, schema.Recipe):
        return _Source(recipe, None)
    if isinstance(recipe, Mapping):
        return _Source(schema.parse_recipe(dict(recipe), source="recipe"), None)
    if isinstance(recipe, str) and _looks_like_yaml(recipe):
        return _documents(schema.parse_recipe_documents(recipe, source="recipe"), None, "recipe")
    if not isinstance(recipe, (str, os.PathLike)):
        raise UserError(f"a recipe is a path, YAML text or a dict, not {type(recipe).__name__}")
    path = Path(recipe)
    loaded = schema.load_recipe_documents(path)
    from .demo import demo_models_for

    return _documents(loaded, demo_models_for(path) or path.resolve().parent, str(path))


def _documents(recipes: list[Recipe], folder: Path | None, name: str) -> _Source:
    """One recipe, or the stages of a multi-stage one (more than one YAML document)."""
    return _Source(recipes[-1], folder, recipes if len(recipes) > 1 else None, name)


def _looks_like_yaml(text: str) -> bool:
    if "\n" not in text and ":" not in text:
        return False
    try:
        return not Path(text).exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte: not a path
        return True


def _merge_stages(source: _Source, out: Path, options: MergeOptions, events: MergeEvents) -> MergeResult:
    """Each stage in dependency order, the named ones into the intermediate folder (or reused from
    it), the final one into `out`; the final stage's result."""
    from . import stages as staging

    recipes = [_with_overrides(r, options) for r in source.stages or []]
    where = Path(options.intermediate_dir) if options.intermediate_dir is not None else None
    stage_plan = staging.plan_stages(recipes, source.name, source.folder, out, where, options.force)
    stamps: dict[str, str] = {}
    result = None
    for index, stage in enumerate(stage_plan.stages):
        target = stage_plan.outputs[stage.name]
        recipe = staging.stage_recipe(stage_plan, stage)
        events.on_stage(stage.name, index, len(stage_plan.stages), target)
        if stage.name is None or target == out:
            result = _merge_one(_Source(recipe, source.folder), out, options, events)
            continue
        stamps[stage.name] = staging.stamp(
            recipe, [stamps[n] for n in stage.needs] + staging.input_marks(recipe, source.folder, stage.needs)
        )
        if stage_plan.keep_intermediates and staging.reusable(target, stamps[stage.name]):
            events.on_warning(f"stage '{stage.name}': reusing {target} (same recipe and inputs)")
            continue
        _merge_one(
            _Source(recipe, source.folder), target, replace(options, force=True, checksums=False), events
        )
        staging.record(target, stamps[stage.name])
    staging.remove_intermediates(stage_plan)
    assert result is not None
    return result


def _plan_stages(source: _Source, options: MergeOptions) -> PlanReport:
    """A multi-stage recipe checked as far as headers allow: every stage's order, references and
    non-stage inputs; the plan shown is the first stage's (later ones read what it writes)."""
    from . import stages as staging
    from .plan import build_plan

    recipes = [_with_overrides(r, options) for r in source.stages or []]
    stage_plan = staging.plan_stages(recipes, source.name, source.folder, None, None, options.force)
    first = stage_plan.stages[0]
    recipe = staging.stage_recipe(stage_plan, first)
    plan = _with_memory(build_plan(recipe, source.folder), options)
    return PlanReport(plan, recipe, None, stage_plan.summary())


def _with_memory(plan: MergePlan, options: MergeOptions) -> MergePlan:
    """The plan with the memory cap (the option's, else the recipe's) and read-ahead to plan for."""
    from .memory import parse_memory

    if options.max_memory is not None:
        plan.max_memory, plan.max_memory_source = (
            parse_memory(options.max_memory, "max memory"),
            "--max-memory",
        )
    elif plan.recipe.max_memory is not None:
        plan.max_memory, plan.max_memory_source = int(plan.recipe.max_memory), "the recipe's max_memory"
    plan.prefetch = options.prefetch
    return plan


def _with_overrides(recipe: Recipe, options: MergeOptions) -> Recipe:
    """The recipe with what `options` override (device, seed, shard size, tokenizer), each checked
    as the recipe's own field is."""
    update: dict[str, Any] = {}
    if options.device is not None:
        update["device"] = options.device
    if options.seed is not None:
        update["seed"] = options.seed
    if options.out_shard_size is not None:
        update["out_shard_size"] = options.out_shard_size
    if options.copy_tokenizer is False and "tokenizer_source" not in recipe.model_fields_set:
        update["tokenizer_source"] = None  # as in mergekit: a tokenizer_source the recipe names is kept
    if not update:
        return recipe
    from .schema import ValidationError

    try:  # validated as a whole: model_copy would take an unchecked seed or shard size
        given = {name: getattr(recipe, name) for name in recipe.model_fields_set}  # what the recipe names
        return type(recipe).model_validate({**given, **update})  # stays named (tokenizer_source: vocab/)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]) if error["loc"] else "option"
        message = " ".join(error["msg"].removeprefix("Value error, ").split())
        raise UserError(f"{_OPTION_NAMES.get(name, name)}: {message}") from None


_OPTION_NAMES = {"seed": "random seed", "out_shard_size": "out shard size", "device": "device"}


def _ri_inputs(recipe: Recipe, folder: Path | None, out: Path, force: bool) -> list[Path]:
    """With RI the merge reads adapted copies from the cache, yet the experts as given, the base
    and the auxiliary data must stay out of the output's way too: checked here, before hours of
    adaptation, and kept for the engine's own check."""
    if recipe.resolve_interference is None:
        return []
    from .engine import source_paths
    from .io.output import check_target
    from .plan import load_sources

    base, experts = load_sources(recipe, folder)
    paths = source_paths(([base] if base else []) + experts)
    aux = Path(recipe.resolve_interference.auxiliary_data).expanduser()
    for candidate in (aux, (folder / aux) if folder is not None else aux):
        if candidate.exists():
            paths.append(candidate)
    check_target(out, paths, force)
    return paths


def _resolve_interference(
    recipe: Recipe, folder: Path | None, events: MergeEvents, dry_run: bool, distributed: Any = None
) -> tuple[Recipe, RIStatus | None]:
    """RI as a step in front of the merge: the recipe pointed at the adapted experts, and what RI
    did. Recipes without `resolve_interference` pass through. A merge on Ray (`distributed`, the
    cluster its units run on) adapts its experts there too (`ri/remote.py`)."""
    if recipe.resolve_interference is None:
        return recipe, None
    if dry_run:  # header-only, no torch: which experts are cached, which would be trained
        from .ri.keys import dry_run_status

        return dry_run_status(recipe, folder)
    from .engine import resolve_device
    from .ri.prepare import resolve_interference

    def start(label: str, steps: int):
        events.on_ri_start(label, steps)
        return lambda step, l1, l2: events.on_ri_step(label, step, l1, l2)

    if distributed is not None and _on_ray(distributed):
        device = distributed.device(recipe.device)  # the workers' kind: the driver may have no GPU
        return resolve_interference(recipe, folder, device, report=start, cluster=distributed)
    return resolve_interference(recipe, folder, resolve_device(recipe.device), report=start)


def _on_ray(distributed: Any) -> bool:
    from .distributed import Distributed

    return isinstance(distributed, Distributed)


def _distributed(original: Recipe, folder: Path | None, options: MergeOptions):
    """Where the work units run: the --ray address, else the recipe's `distributed`; None: here.
    Made from the recipe as given (nothing connects yet); the caller points it at the adapted
    recipe once RI has run."""
    if options.devices is not None:
        from .devices import LocalDevices

        return LocalDevices(options.devices, original, folder or Path.cwd())
    spec = original.distributed
    address = options.ray if options.ray is not None else (spec.ray if spec is not None else None)
    if address is None:
        return None
    from .distributed import Distributed

    knobs = {}
    if spec is not None:
        knobs = {
            "cpus_per_task": spec.cpus_per_task,
            "gpus_per_task": spec.gpus_per_task,
            "retries": spec.retries,
        }
    return Distributed(address.strip(), original, folder or Path.cwd(), **knobs)


def _layer_collector(layers: dict[str, dict[str, float]], events: MergeEvents):
    def report(name: str, figures: Mapping[str, float]) -> None:
        layers[name] = dict(figures)
        events.on_layer(name, layers[name])

    return report


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """torch's CPU threads for the duration of the merge, restored after (a library call should
    not change the caller's process for good)."""
    if count is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
