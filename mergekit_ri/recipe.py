"""The recipe: YAML in, a validated `Recipe` out.

We accept mergekit's syntax for everything we share (`base_model`, `models`, `merge_method`,
`parameters` with per-model overrides, filtered values and layer gradients, `dtype`,
`out_dtype`, `tokenizer_source`) so users can bring their mergekit recipes unchanged. Unknown
keys, methods and parameters are refused with the closest valid spelling, before any weight
is read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from .errors import UserError, closest

Scalar = Union[bool, int, float, str]


class FilteredValue(BaseModel):
    """One entry of a filtered parameter: `value` applies to tensors whose name contains `filter`."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Union[Scalar, list[float]]


ParamValue = Union[Scalar, list[float], list[FilteredValue]]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, ParamValue] = Field(default_factory=dict)


DTYPES = {
    "float32": "F32", "fp32": "F32", "float": "F32",
    "float16": "F16", "fp16": "F16", "half": "F16",
    "bfloat16": "BF16", "bf16": "BF16",
}


class ResolveInterference(BaseModel):
    """RI (Resolving Interference): adapt each expert on unlabeled auxiliary data before merging.

    Defaults are the paper's (CLIP ViT scale); tiny models want a larger lr (see README).
    """

    model_config = ConfigDict(extra="forbid")
    auxiliary_data: str  # a .safetensors file (key "inputs"), a folder of images, a .txt/.jsonl file, or "gaussian"
    steps: int = Field(2500, ge=0)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1.0e-6, ge=0)
    weight_decay: float = Field(1.0e-4, ge=0)
    alpha: float = Field(1.0, ge=0)
    heads: str | None = None  # default: the recipe's heads, else auto
    max_length: int = Field(128, ge=1)  # text auxiliary data: tokens per example
    cache_dir: str | None = None  # default: $RI_MERGE_CACHE or ~/.cache/ri-merge
    devices: list[str] | None = None  # adapt experts in parallel, one worker process per entry (default: every GPU)

    @field_validator("devices")
    @classmethod
    def _known_devices(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
                raise ValueError(f"unknown device '{name}'; use cpu, cuda or cuda:N")
        if value is not None and not value:
            raise ValueError("give at least one device, or leave devices out")
        return value
    # set by mergekit_ri.ri once the experts are adapted (not a recipe key): what the model card reports
    _applied: Any = PrivateAttr(default=None)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    merge_method: str
    models: list[ModelEntry] = Field(min_length=1)
    base_model: str | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = "base"
    # task heads (classifier experts): kept per expert, never merged
    heads: str | None = None
    heads_default: str | None = None
    resolve_interference: ResolveInterference | None = None
    # ours, on top of mergekit's syntax
    device: str = "auto"
    seed: int = 0
    out_shard_size: Union[int, str] = Field("5GB", validate_default=True)

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is not None and value not in DTYPES:
            raise ValueError(f"unknown dtype '{value}'{closest(value, DTYPES)}; use one of float32, float16, bfloat16")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"unknown device '{value}'; use auto, cpu, cuda or cuda:N")
        return value

    @field_validator("out_shard_size")
    @classmethod
    def _parse_size(cls, value: int | str) -> int:
        return parse_size(value)

    @property
    def shard_size_bytes(self) -> int:
        return int(self.out_shard_size)

    def output_dtype_code(self) -> str | None:
        """The safetensors dtype code of merged float tensors, or None to keep the base's."""
        name = self.out_dtype or self.dtype
        return DTYPES[name] if name else None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=True), sort_keys=False)


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_size(value: int | str) -> int:
    """Bytes from 123, '500MB', '2GiB' or mergekit's '5B' (five billion)."""
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(value))
        unit = match.group(2).lower() if match else "?"
        if not match or unit not in _SIZE_UNITS and unit != "b":
            raise ValueError(f"cannot read size '{value}'; write e.g. 2GB, 500MB or 1GiB")
        if match.group(2) == "B" and float(match.group(1)) < 1000:  # mergekit: '5B' = 5 billion
            size = int(float(match.group(1)) * 10**9)
        else:
            size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError("out_shard_size must be positive")
    return size


_MERGEKIT_ONLY = {
    "slices": "slice-wise merges (slices) are not supported yet; merge whole models",
    "tokenizer": "the 'tokenizer' section is not supported; use tokenizer_source",
    "chat_template": "chat_template is not supported; the tokenizer files are copied as they are",
}


def load_recipe(path: Path) -> Recipe:
    """Read and validate a recipe file; every problem is a one-line `UserError`."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"recipe file not found: {path}") from None
    except OSError as exc:
        raise UserError(f"cannot read recipe {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}: malformed YAML{where}: {problem}") from None
    return parse_recipe(data, source=str(path))


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise UserError(f"{source}: a recipe is a YAML mapping with merge_method, models, ...")
    _check_keys(data, Recipe, source, "")
    for i, entry in enumerate(data.get("models") or []):
        if isinstance(entry, dict):
            _check_keys(entry, ModelEntry, source, f"models[{i}].")
    if isinstance(data.get("resolve_interference"), dict):
        _check_keys(data["resolve_interference"], ResolveInterference, source, "resolve_interference.")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "recipe"
        message = err["msg"].removeprefix("Value error, ")
        raise UserError(f"{source}: field '{field}': {message}") from None
    from .methods import get_method  # late import: methods import nothing from here at load

    spec = get_method(recipe.merge_method, source)
    spec.check_parameters(recipe, source)
    if spec.needs_base and recipe.base_model is None:
        raise UserError(f"{source}: merge_method '{spec.name}' needs base_model")
    return recipe


def _check_keys(data: dict, model: type[BaseModel], source: str, prefix: str) -> None:
    known = set(model.model_fields)
    for key in data:
        if key in known:
            continue
        if key in _MERGEKIT_ONLY and not prefix:
            raise UserError(f"{source}: {_MERGEKIT_ONLY[key]}")
        raise UserError(f"{source}: unknown key '{prefix}{key}'{closest(str(key), known)}")
