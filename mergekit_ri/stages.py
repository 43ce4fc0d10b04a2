"""Multi-stage recipes, in mergekit-multi's format: several recipes in one YAML file separated by
`---`; each but the final one has a `name`, which later stages use as a model (or base_model).

Stages run in dependency order. Intermediates go to an intermediate folder (by default a hidden
folder beside the output, removed once the final stage is written; kept when the user names it
with `intermediate_dir`, and then reused by the next run when the stage's recipe and inputs are
the same). Everything knowable is checked before the first stage runs: names, references, cycles,
and the headers of every input that is not itself a stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError, closest
from .io.output import check_target, hidden_name
from .io.sources import load_source
from .recipe import Recipe


@dataclass(frozen=True)
class Stage:
    """One stage: its name (None for the final, unnamed one), its recipe as written, and the
    names of the stages it takes as inputs."""

    name: str | None
    recipe: Recipe
    needs: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"stage '{self.name}'" if self.name else "the final stage"


@dataclass
class StagePlan:
    """The stages in the order they run, where each one is written, and what was checked."""

    stages: list[Stage]
    outputs: dict[str | None, Path]  # stage name → folder (None: the final stage → the output)
    intermediate_dir: Path
    keep_intermediates: bool
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> list[dict[str, object]]:
        return [
            {
                "name": s.name,
                "merge_method": s.recipe.merge_method,
                "needs": list(s.needs),
                "output": str(self.outputs[s.name]),
            }
            for s in self.stages
        ]


def _references(recipe: Recipe) -> list[str]:
    """Every model a recipe reads: `models:`, the sources and bases of `slices:`, and `base_model`."""
    sliced = [source.model for entry in recipe.slices or [] for source in entry.sources]
    sliced += [entry.base_model for entry in recipe.slices or [] if entry.base_model is not None]
    return (
        [m.model for m in recipe.models or []] + sliced + ([recipe.base_model] if recipe.base_model else [])
    )


def order_stages(recipes: list[Recipe], source: str) -> list[Stage]:
    """Stages in dependency order (document order among independent ones); the final stage last."""
    names = [r.name for r in recipes if r.name is not None]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise UserError(f"{source}: two stages are named '{duplicate}'")
    unnamed = [i for i, r in enumerate(recipes) if r.name is None]
    if len(unnamed) > 1:
        raise UserError(
            f"{source}: documents {unnamed[0] + 1} and {unnamed[1] + 1} both have no name; "
            "only the final stage may leave its name out"
        )
    stages = {
        r.name: Stage(r.name, r, tuple(dict.fromkeys(x for x in _references(r) if x in names)))
        for r in recipes
    }
    ordered: list[Stage] = []
    state: dict[str | None, str] = {}

    def visit(stage: Stage, path: list[str | None]) -> None:
        if state.get(stage.name) == "done":
            return
        if state.get(stage.name) == "active":
            cycle = " → ".join(str(n) for n in path[path.index(stage.name) :] + [stage.name])
            raise UserError(f"{source}: stages depend on each other in a cycle: {cycle}")
        state[stage.name] = "active"
        for name in stage.needs:
            visit(stages[name], path + [stage.name])
        state[stage.name] = "done"
        ordered.append(stage)

    for recipe in recipes:
        visit(stages[recipe.name], [])
    final = _final_stage(ordered, source)
    return [s for s in ordered if s is not final] + [final]


def _final_stage(stages: list[Stage], source: str) -> Stage:
    unnamed = [s for s in stages if s.name is None]
    if unnamed:
        return unnamed[0]
    used = {n for s in stages for n in s.needs}
    sinks = [s for s in stages if s.name not in used]
    if len(sinks) > 1:
        raise UserError(
            f"{source}: stages {', '.join(repr(s.name) for s in sinks)} are all final (no stage uses "
            "them); leave the name out of the one to write to the output"
        )
    return sinks[0]


def plan_stages(
    recipes: list[Recipe],
    source: str,
    folder: Path | None,
    out: Path | None,
    intermediate_dir: Path | None,
    force: bool,
) -> StagePlan:
    """Order, place and check the stages before any runs: every model that is not a stage must
    load from its headers, and the output may not touch any input (`out` None: a dry run)."""
    stages = order_stages(recipes, source)
    names = {s.name for s in stages if s.name is not None}
    keep = intermediate_dir is not None
    if out is None:
        out = Path("(output)")
        where = Path(intermediate_dir) if keep else Path("(intermediates)")
    else:
        where = Path(intermediate_dir) if keep else out.parent / hidden_name(out, "stages")
    outputs: dict[str | None, Path] = {s.name: where / s.name for s in stages if s.name is not None}
    outputs[stages[-1].name] = out
    inputs: list[Path] = []
    for stage in stages:
        for reference in _references(stage.recipe):
            if reference in names:
                continue
            try:
                model = load_source(reference, reference, folder)
            except UserError as exc:
                hint = closest(reference, names).replace("(did you mean", "(a stage name? did you mean")
                raise UserError(f"{source}, {stage.label}: {exc}{hint}") from None
            inputs += model.files() + ([model.folder] if model.folder else [])
    if out.name != "(output)":
        check_target(out, inputs + [p for p in outputs.values() if p != out], force)
        if keep:
            check_target(where, inputs, force=True)
    return StagePlan(stages, outputs, where, keep)


def input_marks(recipe: Recipe, folder: Path | None, stage_names: tuple[str, ...]) -> list[str]:
    """Size and modification time of every file of the inputs that are not stages: a rewritten
    checkpoint (same names and shapes, new weights) makes an intermediate stale."""
    marks = []
    for reference in _references(recipe):
        if reference in stage_names:
            continue
        model = load_source(reference, reference, folder)
        for path in model.files():
            if path.is_file():
                info = path.stat()
                marks.append(f"{path}:{info.st_size}:{info.st_mtime_ns}")
    return marks


def stage_recipe(plan: StagePlan, stage: Stage) -> Recipe:
    """The stage's recipe with earlier stages' names replaced by the folders they were written to."""

    def place(reference: str | None) -> str | None:
        if reference is not None and reference in plan.outputs:
            return str(plan.outputs[reference])
        return reference

    recipe = stage.recipe
    models = [m.model_copy(update={"model": place(m.model)}) for m in recipe.models or []]
    slices = (
        None
        if recipe.slices is None
        else [
            entry.model_copy(
                update={
                    "sources": [s.model_copy(update={"model": place(s.model)}) for s in entry.sources],
                    "base_model": place(entry.base_model),
                }
            )
            for entry in recipe.slices
        ]
    )
    tokenizer = recipe.tokenizer_source
    tokenizer = place(tokenizer) if tokenizer not in (None, "base", "union") else tokenizer
    update = {"models": models, "slices": slices, "base_model": place(recipe.base_model)}
    if "tokenizer_source" in recipe.model_fields_set:  # unnamed stays unnamed (vocab/plan.py)
        update["tokenizer_source"] = tokenizer
    return recipe.model_copy(update=update)


def stamp(recipe: Recipe, fingerprints: list[str]) -> str:
    """What a finished intermediate was made from: its recipe and its inputs' header hashes."""
    digest = hashlib.sha256(recipe.to_yaml().encode())
    for fingerprint in fingerprints:
        digest.update(fingerprint.encode())
    return digest.hexdigest()


def stamp_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.ri-merge-stage.json"


def reusable(folder: Path, expected: str) -> bool:
    """A finished intermediate from an earlier run with the same recipe and inputs."""
    try:
        recorded = json.loads(stamp_path(folder).read_text()).get("stamp")
    except (OSError, ValueError, AttributeError):
        return False
    return recorded == expected and (folder / "model.safetensors.index.json").is_file()


def record(folder: Path, value: str) -> None:
    path = stamp_path(folder)
    temporary = path.with_name(path.name + f".{os.getpid()}")
    temporary.write_text(json.dumps({"stamp": value}) + "\n")
    os.replace(temporary, path)


def remove_intermediates(plan: StagePlan) -> None:
    if not plan.keep_intermediates:
        shutil.rmtree(plan.intermediate_dir, ignore_errors=True)
