"""LoRA adapters as inputs: `base+adapter` is the base with W + scale·B·A applied per tensor.

A PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`, or a pickled
`adapter_model.bin`) is checked from its config and header against the base's headers — every
target present, every shape consistent — before any weight is read. The adapted tensors are then
`LoraTensorRef`s: `TensorReader` reads the base rows and the two factors and returns
W + scale·B·A in fp32 for just those rows, so no merged copy of the model is ever written and
memory stays a few tensors. scale = lora_alpha / r (lora_alpha / √r with `use_rslora`), with
PEFT's `rank_pattern` / `alpha_pattern`; `fan_in_fan_out` (GPT-2's Conv1D) and embedding
adapters (`lora_embedding_A/B`) take the transposed product, as PEFT's `merge_and_unload` does.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .sources import (
    _HUB_ID,
    FLOAT_CODES,
    ModelSource,
    TensorRef,
    _download,
    load_source,
    local_path,
    read_header,
    read_json_object,
)

PREFIX = "base_model.model."
_FACTOR = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_B\.bias)$"
    r"|^(?P<emb>.+)\.lora_embedding_(?P<ekind>[AB])$"
)
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
}


@dataclass(frozen=True)
class LoraTensorRef(TensorRef):
    """A base tensor with a LoRA update: read as fp32 W + scale·(B·A) (transposed when `transpose`),
    or for a bias (`lora_a` None) b + scale·lora_B.bias.

    `path`/`start` are the base tensor's (reads are ordered by them); `dtype` is F32, the dtype
    the adapted tensor is handed to the merge in."""

    weight: TensorRef | None = None
    lora_a: TensorRef | None = None
    lora_b: TensorRef | None = None
    scale: float = 1.0
    transpose: bool = False

    @property
    def nbytes(self) -> int:
        return self.numel * 4


@dataclass(frozen=True)
class LoraConfig:
    r: int
    alpha: float
    rslora: bool
    fan_in_fan_out: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]

    def scale(self, module: str) -> tuple[int, float]:
        """This module's rank and scale, PEFT's way (the first pattern key that matches a suffix)."""
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.alpha)
        return r, alpha / (math.sqrt(r) if self.rslora else r)


def _pattern_key(patterns: dict, module: str) -> str:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def _number(config: dict, key: str, path: Path, default: object = None) -> float:
    value = config.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise UserError(f"{path}: '{key}' must be a positive number, not {value!r}")
    return value


def _pattern(config: dict, key: str, path: Path, integer: bool) -> dict:
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise UserError(f"{path}: '{key}' must map module names to numbers")
    for name, number in value.items():
        _number({key: number}, key, path)
        if integer and not isinstance(number, int):
            raise UserError(f"{path}: '{key}' for '{name}' must be a whole number")
        try:
            re.compile(name)
        except re.error:
            raise UserError(f"{path}: '{key}' has a key '{name}' that is not a valid pattern") from None
    return value


def read_lora_config(path: Path) -> LoraConfig:
    """adapter_config.json, checked: a LoRA (not another PEFT method), with nothing ri-merge cannot
    apply exactly."""
    config = read_json_object(path, "adapter_config.json")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise UserError(f"{path}: peft_type is {kind!r}; ri-merge applies LoRA adapters only")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise UserError(
                f"{path}: {what} is not supported; merge the adapter into its base with PEFT first"
            )
    if config.get("target_parameters"):
        raise UserError(f"{path}: target_parameters is not supported; merge the adapter with PEFT first")
    r = _number(config, "r", path, 8)
    if not isinstance(r, int):
        raise UserError(f"{path}: 'r' must be a whole number, not {r!r}")
    return LoraConfig(
        r=r,
        alpha=_number(config, "lora_alpha", path, 8),
        rslora=bool(config.get("use_rslora", False)),
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        rank_pattern=_pattern(config, "rank_pattern", path, True),
        alpha_pattern=_pattern(config, "alpha_pattern", path, False),
    )


def _adapter_folder(reference: str, relative_to: Path | None) -> Path:
    path = local_path(reference, relative_to)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"LoRA adapter {reference}: expected a PEFT adapter folder, found a file")
        return path
    if _HUB_ID.match(reference) and not reference.startswith((".", "/", "~")):
        return _download(reference)[0]
    raise UserError(f"LoRA adapter path not found: {reference}")


def _adapter_weights(folder: Path) -> tuple[dict[str, TensorRef], bytes, Path]:
    single = folder / "adapter_model.safetensors"
    if single.exists():
        refs, raw = read_header(single)
        return refs, raw, single
    pickled = folder / "adapter_model.bin"
    if pickled.exists():
        from .pickled import read_pickled_header

        refs, raw = read_pickled_header(pickled)
        return refs, raw, pickled
    raise UserError(f"{folder}: LoRA adapter without adapter_model.safetensors (or adapter_model.bin)")


def load_lora_source(reference: str, label: str, relative_to: Path | None = None) -> ModelSource:
    """`model+adapter`: the model's tensors, with the adapter's targets as LoraTensorRefs."""
    parts = reference.split("+")
    if len(parts) != 2 or not all(parts):
        raise UserError(
            f"model '{label}': cannot read '{reference}'; a LoRA'd model is written MODEL+ADAPTER"
        )
    base = load_source(parts[0], label, relative_to)
    folder = _adapter_folder(parts[1], relative_to)
    config_path = folder / "adapter_config.json"
    if not config_path.exists():
        raise UserError(f"{folder}: LoRA adapter without adapter_config.json")
    config = read_lora_config(config_path)
    refs, raw, weights = _adapter_weights(folder)
    tensors = dict(base.tensors)
    factors: dict[str, dict[str, TensorRef]] = {}
    embedding: set[str] = set()
    biases: dict[str, TensorRef] = {}
    replaced = 0
    for key, ref in refs.items():
        if not key.startswith(PREFIX):
            raise UserError(f"{weights}: tensor '{key}' is not PEFT's naming (base_model.model.<name>...)")
        name = key[len(PREFIX) :]
        match = _FACTOR.match(name)
        if match is None:
            if ".lora_" in name:
                raise UserError(f"{weights}: tensor '{key}' is a LoRA part ri-merge cannot apply")
            # modules_to_save, or an embedding PEFT saves whole (`<module>.base_layer.weight`)
            _replace(tensors, name.replace(".base_layer.", "."), ref, weights, base)
            replaced += 1
            continue
        module = match["module"] or match["emb"]
        kind = (match["kind"] or f"lora_{match['ekind']}.weight").replace(".weight", "")
        if kind == "lora_B.bias":
            biases[module] = ref
            continue
        if match["emb"]:
            embedding.add(module)
        factors.setdefault(module, {})[kind] = ref
    for module, pair in factors.items():
        tensors[f"{module}.weight"] = _adapted(
            module, pair, tensors, config, module in embedding, weights, base
        )
    for module, ref in biases.items():  # lora_bias: b + scale·lora_B.bias
        tensors[f"{module}.bias"] = _adapted_bias(module, ref, tensors, config, weights, base)
    if not factors and not replaced:
        raise UserError(f"{weights}: the adapter holds no LoRA weights")
    digest = hashlib.sha256(base.fingerprint.encode() + raw + config_path.read_bytes()).hexdigest()[:16]
    scales = sorted({round(config.scale(m)[1], 6) for m in factors})
    note = (
        f"base {parts[0]} + LoRA adapter {parts[1]} ({len(factors) + len(biases)} tensors adapted, scale "
        f"{', '.join(f'{s:g}' for s in scales)}{f', {replaced} replaced' if replaced else ''}), "
        "applied per tensor while streaming"
    )
    if base.note:
        note += f"; base: {base.note}"
    return ModelSource(
        reference,
        label,
        base.folder,
        tensors,
        digest,
        base.revision,
        note,
        (*base.extra_files, folder, config_path, weights),
    )


def _replace(
    tensors: dict[str, TensorRef], name: str, ref: TensorRef, weights: Path, base: ModelSource
) -> None:
    if name not in tensors:
        raise UserError(
            f"{weights}: tensor '{name}' (modules_to_save) is missing from the base {base.reference}"
        )
    if tensors[name].shape != ref.shape:
        raise UserError(
            f"{weights}: tensor '{name}' has shape {list(ref.shape)} but the base {base.reference} has "
            f"{list(tensors[name].shape)}"
        )
    tensors[name] = ref


def _adapted(
    module: str,
    pair: dict[str, TensorRef],
    tensors: dict[str, TensorRef],
    config: LoraConfig,
    embedding: bool,
    weights: Path,
    base: ModelSource,
) -> LoraTensorRef:
    """The LoraTensorRef of one target, every shape checked against the base's header."""
    name = f"{module}.weight"
    if set(pair) != {"lora_A", "lora_B"}:
        raise UserError(
            f"{weights}: LoRA target '{module}' has {' and '.join(pair)} but not both lora_A and lora_B"
        )
    a, b = pair["lora_A"], pair["lora_B"]
    weight = tensors.get(name)
    if weight is None:
        raise UserError(f"{weights}: LoRA target '{name}' is missing from the base {base.reference}")
    r, scale = config.scale(module)
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != r or b.shape[1] != r:
        raise UserError(
            f"{weights}: LoRA target '{module}' has lora_A {list(a.shape)} and lora_B {list(b.shape)}; "
            f"expected [{r}, in] and [out, {r}] for r={r}"
        )
    if a.dtype not in FLOAT_CODES or b.dtype not in FLOAT_CODES or weight.dtype not in FLOAT_CODES:
        raise UserError(f"{weights}: LoRA target '{module}' is not floating point")
    transpose = embedding or config.fan_in_fan_out
    expected = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
    if weight.shape != expected:
        raise UserError(
            f"{weights}: LoRA target '{module}' makes a {list(expected)} update but the base "
            f"{base.reference} has '{name}' of shape {list(weight.shape)}"
        )
    return LoraTensorRef(
        weight.path, "F32", weight.shape, weight.start, weight.end, name, weight, a, b, scale, transpose
    )


def _adapted_bias(
    module: str,
    ref: TensorRef,
    tensors: dict[str, TensorRef],
    config: LoraConfig,
    weights: Path,
    base: ModelSource,
) -> LoraTensorRef:
    name = f"{module}.bias"
    bias = tensors.get(name)
    if bias is None:
        raise UserError(f"{weights}: LoRA bias of '{module}' has no '{name}' in the base {base.reference}")
    if bias.shape != ref.shape or ref.dtype not in FLOAT_CODES:
        raise UserError(
            f"{weights}: LoRA bias of '{module}' has shape {list(ref.shape)} but the base has "
            f"'{name}' of shape {list(bias.shape)}"
        )
    scale = config.scale(module)[1]
    return LoraTensorRef(bias.path, "F32", bias.shape, bias.start, bias.end, name, bias, None, ref, scale)
