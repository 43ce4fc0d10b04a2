"""RI in front of any merge: adapt every expert (or find it in the cache), then point the recipe
at the adapted checkpoints so the streaming merge reads them like any expert.

Adapted experts are cached under `cache_dir/<key>/<expert>/`, the key hashing everything the
result depends on (all experts' and the base's bytes, the auxiliary data, the RI settings and
seed), so merging again with another method does not retrain. Training and publishing an entry
happen under a file lock on it (`train.py`): concurrent merges train each expert once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..heads import head_selector
from ..io.sources import ModelSource
from ..plan import load_sources
from ..recipe import ModelEntry, Recipe
from . import keys as cache_keys
from .adapt import StepReport
from .data import AuxiliaryData, load_auxiliary
from .keys import (  # noqa: F401 (RI_VERSION, RISettings, RIProvenance, RIStatus, cache_root, content_hash: kept importable here)
    RI_VERSION,
    RIProvenance,
    RISettings,
    RIStatus,
    auto_class_name,
    cache_root,
    check_sources,
    content_hash,
    dry_run_status,
    entry_folders,
    is_cached,
    require_base,
    require_transformers,
    ri_heads,
    ri_settings,
)
from .train import TrainJob, train_experts, train_parallel

if TYPE_CHECKING:
    from ..distributed import Distributed

ReportFactory = Callable[[str, int], StepReport]


def auto_class(config: dict, label: str):
    import transformers

    return getattr(transformers, auto_class_name(config, label))


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@dataclass
class RIContext:
    """The inputs of RI, resolved and checked: sources, heads, model class, auxiliary data."""

    base: ModelSource
    experts: list[ModelSource]
    heads: str
    is_head: Callable[[str], bool]
    model_class: object
    aux: AuxiliaryData


def ri_context(recipe: Recipe, recipe_dir: Path | None) -> RIContext:
    settings = recipe.resolve_interference
    _quiet_transformers()
    base, experts = load_sources(recipe, recipe_dir)
    configs = check_sources(recipe, base, experts)
    heads = ri_heads(recipe)
    is_head = head_selector(heads, configs[0], "resolve_interference")
    model_class = auto_class(configs[0], experts[0].label)
    aux = load_auxiliary(
        settings.auxiliary_data,
        main_input_name(configs[0]),
        transformers_config(experts[0].folder),
        base.folder,
        recipe_dir,
        settings.max_length,
        processor_folders=(experts[0].folder, base.folder),
    )
    return RIContext(base, experts, heads, is_head, model_class, aux)


def entry_keys(recipe: Recipe, ctx: RIContext, settings: RISettings) -> tuple[dict[str, str], dict[str, int]]:
    """`keys.entry_keys` for a resolved context: each expert's cache key and training seed. A Ray
    worker computes them again from what it sees (`remote.py`)."""
    return cache_keys.entry_keys(recipe, ctx.base, ctx.experts, ctx.heads, ctx.aux.fingerprint, settings)


def resolve_interference(
    recipe: Recipe,
    recipe_dir: Path | None,
    device: torch.device,
    report: ReportFactory | None = None,
    dry_run: bool = False,
    cluster: Distributed | None = None,
) -> tuple[Recipe, RIStatus]:
    """The recipe with its models replaced by their RI-adapted versions (trained or cached), and
    what RI did (`RIStatus`, with the provenance the model card reports). With `cluster`, the
    experts not in the cache are adapted as Ray tasks (`remote.py`) instead of here. A dry run
    trains nothing and is `keys.dry_run_status`: the same cache keys, from headers and file bytes."""
    settings_in = recipe.resolve_interference
    assert settings_in is not None
    if dry_run:
        return dry_run_status(recipe, recipe_dir)
    require_base(recipe)
    require_transformers()
    ctx = ri_context(recipe, recipe_dir)
    base, experts, heads, model_class, aux = ctx.base, ctx.experts, ctx.heads, ctx.model_class, ctx.aux
    settings = ri_settings(recipe)
    keys, seeds = entry_keys(recipe, ctx, settings)
    root, folders = entry_folders(recipe, keys)
    hits = [label for label, folder in folders.items() if is_cached(folder)]
    todo = [m.label for m in experts if m.label not in hits]
    trained, devices = [], []
    if todo:
        job = TrainJob(experts, base, model_class, heads, aux, settings, folders, seeds)
        if cluster is not None:
            from .remote import train_on_ray

            done, places = train_on_ray(cluster, recipe, recipe_dir, job, todo, report)
            devices = [places[label] for label in todo if done[label]]  # one per trained expert
        else:
            devices = ri_devices(settings_in.devices, recipe.device, device)
            if len(devices) > 1 and len(todo) > 1:
                devices = devices[: len(todo)]
                done = train_parallel(job, todo, devices, report)
            else:
                done = train_experts(job, todo, devices[0], report)
                devices = devices[:1]
        trained = [label for label in todo if done[label]]
        hits += [label for label in todo if not done[label]]  # another merge cached them while we waited
    status = RIStatus({k: str(v) for k, v in folders.items()}, hits, trained, [str(d) for d in devices])
    models = [
        ModelEntry(model=str(folders[m.label]), parameters=entry.parameters)
        for m, entry in zip(experts, recipe.models)
    ]
    status.provenance = RIProvenance(
        list(recipe.models),
        {m.label: m.reference for m in experts},
        {k: str(v) for k, v in folders.items()},
        str(root),
        aux.fingerprint,
    )
    return recipe.model_copy(update={"models": models, "heads": heads}), status


def ri_devices(listed: list[str] | None, recipe_device: str, device: torch.device) -> list[torch.device]:
    """Where to adapt: the RI section's `devices`, else every visible GPU when the recipe's device
    is auto/cuda and there are several, else the one merge device (sequential)."""
    from ..engine import resolve_device

    if listed:
        return [resolve_device(name) for name in listed]
    if recipe_device in ("auto", "cuda") and device.type == "cuda" and torch.cuda.device_count() > 1:
        return [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    return [device]


def transformers_config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def main_input_name(config: dict) -> str:
    """What the architecture's forward takes first (pixel_values, input_ids, ...)."""
    import transformers

    arch = getattr(transformers, (config.get("architectures") or [""])[0], None)
    return getattr(arch, "main_input_name", "input_ids")
