"""Where RI's adapted experts live in the cache, worked out without torch or transformers.

An entry's key hashes everything the adapted expert depends on: every expert's and the base's
bytes, the auxiliary data's fingerprint, the RI settings, the seed and the heads. The merge and
`--dry-run` compute it with the same functions, so the dry run tells from file bytes, headers and
`config.json` alone which experts are already adapted and which would be trained, in a process
that never imports torch (`ri-merge --dry-run` is one of the fast, header-only commands). The
auxiliary data's contents are checked against the model when RI runs (`data.py`), before any
training.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..heads import head_selector
from .cache import entry_problem

if TYPE_CHECKING:
    from ..io.sources import ModelSource
    from ..recipe import ModelEntry, Recipe

RI_VERSION = "1"
AUTO_CLASSES = {
    "ForImageClassification": "AutoModelForImageClassification",
    "ForSequenceClassification": "AutoModelForSequenceClassification",
    "ForTokenClassification": "AutoModelForTokenClassification",
    "ForAudioClassification": "AutoModelForAudioClassification",
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass(frozen=True)
class RISettings:
    steps: int
    lr: float
    weight_decay: float
    alpha: float
    batch_size: int


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


def ri_settings(recipe: Recipe) -> RISettings:
    given = recipe.resolve_interference
    assert given is not None
    return RISettings(given.steps, given.lr, given.weight_decay, given.alpha, given.batch_size)


def require_transformers() -> None:
    """RI runs the models through transformers: refused up front when it is not installed (found,
    not imported: importing it imports torch)."""
    if importlib.util.find_spec("transformers") is None:
        raise UserError("resolve_interference needs transformers: pip install 'mergekit-ri[ri]'")


def require_config(source: ModelSource) -> dict:
    config = source.config()
    if config is None:
        raise UserError(
            f"RI runs the models, so model '{source.label}' must be a folder with config.json ({source.reference})"
        )
    return config


def auto_class_name(config: dict, label: str) -> str:
    """The transformers Auto class that loads this classifier (`AutoModelForImageClassification`, ...)."""
    for arch in config.get("architectures") or []:
        for suffix, name in AUTO_CLASSES.items():
            if arch.endswith(suffix):
                return name
    raise UserError(
        f"RI needs classifier experts with per-task heads (*ForImageClassification, "
        f"*ForSequenceClassification, ...); model '{label}' is {config.get('architectures')}"
    )


def check_sources(recipe: Recipe, base: ModelSource | None, experts: list[ModelSource]) -> list[dict]:
    """RI's refusals that headers and config.json decide; the experts' configs."""
    for model in [*([base] if base else []), *experts]:
        if model.note is not None:  # RI runs the models through transformers, from safetensors
            raise UserError(
                f"resolve_interference: model '{model.label}' is {model.note.split(',')[0]}; RI runs "
                "safetensors checkpoints only (merge it without resolve_interference, or convert it)"
            )
    configs = [require_config(m) for m in experts]
    if base is not None:
        require_config(base)
    if len(experts) < 2:
        raise UserError(
            "resolve_interference needs at least two experts (the others' heads define interference)"
        )
    return configs


def ri_heads(recipe: Recipe) -> str:
    section = recipe.resolve_interference
    assert section is not None
    return section.heads or recipe.heads or "auto"


# ---------------------------------------------------------------- the auxiliary data's fingerprint


def aux_path(spec: str, relative_to: Path | None) -> Path:
    """The auxiliary data as given, else beside the recipe."""
    path = Path(spec).expanduser()
    if not path.exists() and relative_to is not None and (relative_to / path).exists():
        path = relative_to / path
    return path


def expected_image_shape(config: Any) -> tuple[int, ...] | None:
    """(channels, height, width) from a model config (transformers' or config.json's dict)."""
    if isinstance(config, dict):
        config = SimpleNamespace(**config)
    size = getattr(config, "image_size", None)
    channels = getattr(config, "num_channels", None)
    if size is None or channels is None:
        return None
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (channels, h, w)


def file_fingerprint(path: Path) -> str:
    """A .safetensors source: its path, size and modification time (it may be large)."""
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()


def text_fingerprint(path: Path, max_length: int) -> str:
    return hashlib.sha256(path.read_bytes() + str(max_length).encode()).hexdigest()


def image_files(folder: Path) -> list[Path]:
    """The images of a folder, searched recursively, in a fixed order."""
    return sorted(
        (p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
        key=lambda p: p.relative_to(folder).as_posix(),
    )


def image_processor(processor_folders: tuple[Path | None, ...]) -> Path | None:
    """The first folder holding the model's `preprocessor_config.json`."""
    return next(
        (f for f in processor_folders if f is not None and (f / "preprocessor_config.json").is_file()), None
    )


def images_fingerprint(
    folder: Path, files: list[Path], shape: tuple[int, ...], processor: Path | None
) -> str:
    """An image folder: the input shape, the preprocessing, and each file's name, size and time."""
    digest = hashlib.sha256(repr(shape).encode())
    digest.update(
        (processor / "preprocessor_config.json").read_bytes() if processor else b"resize, mean=std=0.5"
    )
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(folder).as_posix()}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def aux_fingerprint(
    spec: str,
    config: dict,
    relative_to: Path | None,
    max_length: int,
    processor_folders: tuple[Path | None, ...],
) -> str:
    """The fingerprint `data.load_auxiliary` gives the same source, without reading it into
    tensors; refuses what it refuses by its name alone (missing, of no known kind)."""
    if spec == "gaussian":
        return "gaussian"
    path = aux_path(spec, relative_to)
    if path.is_dir():
        shape = expected_image_shape(config)
        if shape is None:
            raise UserError(
                f"auxiliary data {path}: images need image_size and num_channels in the model's config.json"
            )
        files = image_files(path)
        if not files:
            raise UserError(
                f"auxiliary data {path} holds no images ({', '.join(IMAGE_SUFFIXES)}, searched recursively)"
            )
        return images_fingerprint(path, files, shape, image_processor(processor_folders))
    if not path.is_file():
        raise UserError(f"auxiliary_data: file not found: {spec}")
    if path.suffix == ".safetensors":
        return file_fingerprint(path)
    if path.suffix in (".txt", ".jsonl"):
        return text_fingerprint(path, max_length)
    raise UserError(
        f"auxiliary_data {path}: use a .safetensors file (key 'inputs'), a folder of images, "
        "a .txt/.jsonl text file, or 'gaussian'"
    )


# ---------------------------------------------------------------- cache entries


def entry_keys(
    recipe: Recipe,
    base: ModelSource,
    experts: list[ModelSource],
    heads: str,
    aux_print: str,
    settings: RISettings,
) -> tuple[dict[str, str], dict[str, int]]:
    """Each expert's cache key (a hash of everything its adapted weights depend on) and training
    seed. A Ray worker computes them again from what it sees: a different key is a node that sees
    other inputs than the driver."""
    hashes = [content_hash(m) for m in experts]
    base_hash = content_hash(base)
    keys, seeds = {}, {}
    for model, own in zip(experts, hashes):
        keys[model.label] = hashlib.sha256(
            json.dumps(
                {
                    "version": RI_VERSION,
                    "expert": own,
                    "others": sorted(h for h in hashes if h != own),
                    "base": base_hash,
                    "aux": aux_print,
                    "settings": asdict(settings),
                    "seed": recipe.seed,
                    "heads": heads,
                },
                sort_keys=True,
            ).encode()
        ).hexdigest()[:24]
        seeds[model.label] = (recipe.seed * 1_000_003 + int(own[:8], 16)) % (1 << 62)
    return keys, seeds


def entry_folders(recipe: Recipe, keys: dict[str, str]) -> tuple[Path, dict[str, Path]]:
    """The cache root and each expert's entry folder, `<root>/<key>/<expert>`."""
    section = recipe.resolve_interference
    assert section is not None
    root = cache_root(section.cache_dir)
    return root, {label: root / key / label for label, key in keys.items()}


def is_cached(folder: Path) -> bool:
    """A complete entry whose files match its manifest (each file hashed: a cache hit costs a read)."""
    return entry_problem(folder) is None


def require_base(recipe: Recipe) -> None:
    if recipe.base_model is None:
        raise UserError(
            "resolve_interference needs base_model: experts are pulled toward it through the other heads"
        )


def dry_run_status(recipe: Recipe, recipe_dir: Path | None) -> tuple[Recipe, RIStatus]:
    """What RI would do, from headers, config.json and file bytes (no torch, nothing trained): the
    recipe to plan (the original experts: the adapted ones have the same names and shapes) and
    which experts are cached and which would be trained."""
    from ..plan import load_sources

    require_base(recipe)
    require_transformers()
    section = recipe.resolve_interference
    assert section is not None
    base, experts = load_sources(recipe, recipe_dir)
    assert base is not None
    configs = check_sources(recipe, base, experts)
    heads = ri_heads(recipe)
    head_selector(heads, configs[0], "resolve_interference")
    auto_class_name(configs[0], experts[0].label)
    aux_print = aux_fingerprint(
        section.auxiliary_data,
        configs[0],
        recipe_dir,
        section.max_length,
        (experts[0].folder, base.folder),
    )
    keys, _ = entry_keys(recipe, base, experts, heads, aux_print, ri_settings(recipe))
    _, folders = entry_folders(recipe, keys)
    hits = [label for label, folder in folders.items() if is_cached(folder)]
    status = RIStatus({k: str(v) for k, v in folders.items()}, hits, [], [])
    return recipe.model_copy(update={"heads": heads}), status
