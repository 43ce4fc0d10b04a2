"""RI in front of any merge: adapt every expert (or find it in the cache), then point the recipe
at the adapted checkpoints so the streaming merge reads them like any expert.

Adapted experts are cached under `cache_dir/<key>/<expert>/`, the key hashing everything the
result depends on (all experts' and the base's bytes, the auxiliary data, the RI settings and
seed), so merging again with another method does not retrain. Training and publishing an entry
happen under a file lock on it (`train.py`): concurrent merges train each expert once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import UserError
from ..heads import head_selector
from ..io.sources import ModelSource
from ..plan import load_sources
from ..recipe import ModelEntry, Recipe
from .adapt import RISettings, StepReport
from .data import AuxiliaryData, load_auxiliary
from .train import TrainJob, is_cached, train_experts, train_parallel

if TYPE_CHECKING:
    from ..distributed import Distributed

RI_VERSION = "1"
AUTO_CLASSES = {
    "ForImageClassification": "AutoModelForImageClassification",
    "ForSequenceClassification": "AutoModelForSequenceClassification",
    "ForTokenClassification": "AutoModelForTokenClassification",
    "ForAudioClassification": "AutoModelForAudioClassification",
}

ReportFactory = Callable[[str, int], StepReport]


@dataclass(frozen=True)
class RIProvenance:
    """Where the merged experts came from, for the model card: the experts as the user gave them
    and the adapted checkpoints that replaced them."""

    models: list[ModelEntry]  # the recipe's models before RI pointed them at the cache
    references: dict[str, str]  # expert label → its original reference
    adapted: dict[str, str]  # expert label → adapted checkpoint (cache entry)
    cache_root: str
    aux_fingerprint: str


@dataclass
class RIStatus:
    """What RI did or would do, per expert (for --dry-run, -v and the JSON summary)."""

    adapted: dict[str, str]  # expert label → cached folder
    cache_hits: list[str]
    trained: list[str]
    # where the experts were trained: one entry per local worker, or on Ray one per trained expert
    # (in the order of `trained`) naming its node and device, e.g. "ray:10.0.0.7/cuda:3"
    devices: list[str] = field(default_factory=list)
    provenance: RIProvenance | None = None  # None for a dry run: nothing was adapted

    def summary(self) -> dict[str, object]:
        """The JSON form (`--json`'s "ri")."""
        return {
            "adapted": dict(self.adapted),
            "cache_hits": list(self.cache_hits),
            "trained": list(self.trained),
            "devices": list(self.devices),
        }


def cache_root(setting: str | None) -> Path:
    root = setting or os.environ.get("RI_MERGE_CACHE") or Path.home() / ".cache" / "ri-merge"
    return Path(root).expanduser() / "ri"


def content_hash(source: ModelSource) -> str:
    """sha256 over every byte of a model's safetensors files (RI depends on the weights, not just headers)."""
    digest = hashlib.sha256()
    for path in sorted({ref.path for ref in source.tensors.values()}):
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def auto_class(config: dict, label: str):
    import transformers

    for arch in config.get("architectures") or []:
        for suffix, name in AUTO_CLASSES.items():
            if arch.endswith(suffix):
                return getattr(transformers, name)
    raise UserError(
        f"RI needs classifier experts with per-task heads (*ForImageClassification, "
        f"*ForSequenceClassification, ...); model '{label}' is {config.get('architectures')}"
    )


def _require_config(source: ModelSource) -> dict:
    config = source.config()
    if config is None:
        raise UserError(
            f"RI runs the models, so model '{source.label}' must be a folder with config.json ({source.reference})"
        )
    return config


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
    for model in [base, *experts]:
        if model.note is not None:  # RI runs the models through transformers, from safetensors
            raise UserError(
                f"resolve_interference: model '{model.label}' is {model.note.split(',')[0]}; RI runs "
                "safetensors checkpoints only (merge it without resolve_interference, or convert it)"
            )
    configs = [_require_config(m) for m in experts]
    _require_config(base)
    if len(experts) < 2:
        raise UserError(
            "resolve_interference needs at least two experts (the others' heads define interference)"
        )
    heads = settings.heads or recipe.heads or "auto"
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


def ri_settings(recipe: Recipe) -> RISettings:
    given = recipe.resolve_interference
    assert given is not None
    return RISettings(given.steps, given.lr, given.weight_decay, given.alpha, given.batch_size)


def entry_keys(recipe: Recipe, ctx: RIContext, settings: RISettings) -> tuple[dict[str, str], dict[str, int]]:
    """Each expert's cache key (a hash of everything its adapted weights depend on) and training
    seed. A Ray worker computes them again from what it sees: a different key is a node that sees
    other inputs than the driver."""
    hashes = [content_hash(m) for m in ctx.experts]
    base_hash = content_hash(ctx.base)
    keys, seeds = {}, {}
    for model, own in zip(ctx.experts, hashes):
        keys[model.label] = hashlib.sha256(
            json.dumps(
                {
                    "version": RI_VERSION,
                    "expert": own,
                    "others": sorted(h for h in hashes if h != own),
                    "base": base_hash,
                    "aux": ctx.aux.fingerprint,
                    "settings": asdict(settings),
                    "seed": recipe.seed,
                    "heads": ctx.heads,
                },
                sort_keys=True,
            ).encode()
        ).hexdigest()[:24]
        seeds[model.label] = (recipe.seed * 1_000_003 + int(own[:8], 16)) % (1 << 62)
    return keys, seeds


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
    experts not in the cache are adapted as Ray tasks (`remote.py`) instead of here."""
    settings_in = recipe.resolve_interference
    assert settings_in is not None
    if recipe.base_model is None:
        raise UserError(
            "resolve_interference needs base_model: experts are pulled toward it through the other heads"
        )
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("resolve_interference needs transformers: pip install 'mergekit-ri[ri]'") from None
    ctx = ri_context(recipe, recipe_dir)
    base, experts, heads, model_class, aux = ctx.base, ctx.experts, ctx.heads, ctx.model_class, ctx.aux
    settings = ri_settings(recipe)
    keys, seeds = entry_keys(recipe, ctx, settings)
    root = cache_root(settings_in.cache_dir)
    folders = {label: root / key / label for label, key in keys.items()}
    hits = [label for label, folder in folders.items() if is_cached(folder)]
    todo = [m.label for m in experts if m.label not in hits]
    trained, devices = [], []
    if todo and not dry_run:
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
    if dry_run:  # plan over the original experts: the adapted ones have the same names and shapes
        return recipe.model_copy(update={"heads": heads}), status
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
