"""`ri-merge extract-lora`: a fine-tuned (or merged) model as a PEFT LoRA adapter of its base.

As mergekit-extract-lora 0.1.5 does: per 2-D weight, the truncated SVD of τ = model − base
(fp32) gives A = √S·Vᴴ and B = U·√S (or A = S·Vᴴ, B = U without `distribute_scale`) at rank
min(max_rank, #singular values), fewer when `sv_epsilon` drops small singular values — and,
ours, the smallest rank keeping `energy` of ‖τ‖² when that is set. Embeddings are saved whole
(`modules_to_save`) unless `embed_lora`; the input embedding is then decomposed transposed,
as PEFT's `lora_embedding_A/B`. Tensors that are not a 2-D weight (norms, ...) are saved whole
unless `skip_undecomposable`; a decomposed module's bias goes in as `lora_B.bias` (lora_bias).
The config sets r to the largest rank, alpha = r and per-module rank/alpha patterns, so every
scale is 1.

Everything is checked from headers first; tensors are read one at a time, and the adapter file
is written as it goes (its data to a scratch file, the header once the ranks are known), so
memory is a tensor and its SVD, whatever the model's size. The output is staged and renamed into
place like a merge's.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError
from .io.output import OutputLock, check_space, check_target, clean_stale, make_staging, output_error, publish
from .io.sources import FLOAT_CODES, ST_DTYPES, ModelSource, TensorReader, TensorRef, load_source

PREFIX = "base_model.model."
_INPUT_EMBEDDING = re.compile(r"(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings)$")
_OUTPUT_EMBEDDING = re.compile(r"(lm_head|embed_out|output)$")


@dataclass(frozen=True)
class ExtractOptions:
    """mergekit-extract-lora's options (same names and defaults), and `energy` (ours)."""

    max_rank: int = 128
    distribute_scale: bool = True
    embed_lora: bool = False
    modules_to_save: tuple[str, ...] = ()
    exclude_regexes: tuple[str, ...] = ()
    include_regexes: tuple[str, ...] = ()
    sv_epsilon: float = 0.0
    energy: float | None = None  # keep the fewest singular values holding this share of ‖τ‖²
    skip_undecomposable: bool = False

    def check(self) -> None:
        if self.max_rank < 1:
            raise UserError(f"--max-rank must be at least 1, not {self.max_rank}")
        if not math.isfinite(self.sv_epsilon) or self.sv_epsilon < 0:
            raise UserError(f"--sv-epsilon must be a finite number ≥ 0, not {self.sv_epsilon}")
        if self.energy is not None and not (0 < self.energy <= 1):
            raise UserError(f"--energy must be in (0, 1], not {self.energy}")
        for option, patterns in (
            ("--exclude-regex", self.exclude_regexes),
            ("--include-regex", self.include_regexes),
        ):
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise UserError(
                        f"{option} '{pattern}' is not a valid regular expression ({exc})"
                    ) from None


@dataclass
class Module:
    """One module of the model: its tensors by parameter name ('weight', 'bias', ...)."""

    name: str
    tensors: dict[str, TensorRef] = field(default_factory=dict)


@dataclass
class ExtractPlan:
    model: ModelSource
    base: ModelSource
    decompose: list[tuple[Module, bool]]  # module, transposed (an input embedding)
    save: list[tuple[str, TensorRef]]  # tensors saved whole, by their model name
    modules_to_save: list[str]
    bytes_read: int


@dataclass
class ExtractResult:
    out: Path
    ranks: dict[str, int]
    relative_error: dict[str, float]  # ‖τ − B·A‖ / ‖τ‖ per decomposed module, from the singular values
    saved_whole: int
    bytes_written: int

    def summary(self) -> dict:
        ranks = sorted(self.ranks.values())
        return {
            "out": str(self.out),
            "modules": len(ranks),
            "rank_min": ranks[0] if ranks else 0,
            "rank_max": ranks[-1] if ranks else 0,
            "rank_median": ranks[len(ranks) // 2] if ranks else 0,
            "worst_relative_error": max(self.relative_error.values(), default=0.0),
            "saved_whole": self.saved_whole,
            "bytes_written": self.bytes_written,
        }


def _modules(source: ModelSource) -> dict[str, Module]:
    modules: dict[str, Module] = {}
    for name, ref in source.tensors.items():
        module, _, param = name.rpartition(".")
        modules.setdefault(module, Module(module)).tensors[param] = ref
    return modules


def _is_embedding(module: Module, vocab: int | None) -> bool:
    """An input or output embedding (mergekit asks the model; we go by config.json's vocab_size
    when it has one, else by the usual names)."""
    weight = module.tensors.get("weight")
    if weight is None or len(weight.shape) != 2:
        return False
    if _INPUT_EMBEDDING.search(module.name):
        return True
    return weight.shape[0] == vocab if vocab is not None else bool(_OUTPUT_EMBEDDING.search(module.name))


def _vocab_rows(source: ModelSource) -> int | None:
    return next(
        (r.shape[0] for n, r in source.tensors.items() if _INPUT_EMBEDDING.search(n.removesuffix(".weight"))),
        None,
    )


def plan_extraction(model_ref: str, base_ref: str, options: ExtractOptions) -> ExtractPlan:
    """Which modules are decomposed and which saved whole, checked from headers only."""
    options.check()
    model = load_source(model_ref, "model")
    base = load_source(base_ref, "base")
    vocab = (model.config() or {}).get("vocab_size")
    vocab = vocab if isinstance(vocab, int) else None
    to_save = list(options.modules_to_save)
    decompose: list[tuple[Module, bool]] = []
    save: list[tuple[str, TensorRef]] = []
    embed_lora = options.embed_lora and _vocab_rows(base) == _vocab_rows(
        model
    )  # mergekit: resized vocabularies go whole
    for module in _modules(model).values():
        key = module.name.rpartition(".")[2]
        floats = {p: r for p, r in module.tensors.items() if r.dtype in FLOAT_CODES}
        if not floats:
            continue
        excluded = any(re.search(r, module.name) for r in options.exclude_regexes)
        if not embed_lora and _is_embedding(module, vocab) and not excluded and key not in to_save:
            to_save.append(key)
        if module.name in to_save or key in to_save:
            save += [(f"{module.name}.{p}", r) for p, r in floats.items()]
            continue
        if options.include_regexes and not any(re.search(r, module.name) for r in options.include_regexes):
            continue
        if excluded:
            continue
        weight = floats.get("weight")
        if weight is not None and len(weight.shape) == 2 and set(floats) <= {"weight", "bias"}:
            for param, ref in floats.items():
                other = base.tensors.get(f"{module.name}.{param}")
                if other is None:
                    raise UserError(
                        f"base {base.reference} lacks tensor '{module.name}.{param}' that the model has; "
                        "add the module to --save-module or --exclude-regex"
                    )
                if other.shape != ref.shape:
                    raise UserError(
                        f"model tensor '{module.name}.{param}' has shape {list(ref.shape)} but the base "
                        f"{base.reference} has {list(other.shape)}"
                    )
            transposed = bool(_INPUT_EMBEDDING.search(module.name))
            decompose.append((module, transposed))
        elif not options.skip_undecomposable:
            if key not in to_save:
                to_save.append(key)
            save += [(f"{module.name}.{p}", r) for p, r in floats.items()]
    if not decompose and not save:
        raise UserError(f"nothing to extract from {model.reference}: no tensor is selected")
    read = sum(r.nbytes for _, r in save)
    for module, _ in decompose:
        read += sum(r.nbytes + base.tensors[f"{module.name}.{p}"].nbytes for p, r in module.tensors.items())
    return ExtractPlan(model, base, decompose, save, to_save, read)


def _rank(s: torch.Tensor, options: ExtractOptions) -> int:
    """mergekit's rule (max_rank, then sv_epsilon), then the energy share; at least 1."""
    rank = min(options.max_rank, s.shape[0])
    if options.sv_epsilon > 0:
        rank = min(int((s > options.sv_epsilon).sum()), rank)
    if options.energy is not None:
        energy = s.double().square()
        total = float(energy.sum())
        share = energy.cumsum(0) / total if total > 0 else torch.ones_like(energy)  # τ = 0: rank 1
        rank = min(rank, int((share < options.energy - 1e-12).sum()) + 1)
    return max(rank, 1)


def decompose(tau: torch.Tensor, options: ExtractOptions) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A [r, in], B [out, r] with B·A the best rank-r approximation of τ [out, in], and the
    relative error ‖τ − B·A‖ / ‖τ‖ (0 for τ = 0), from τ's singular values."""
    u, s, vh = torch.linalg.svd(tau.float(), full_matrices=False)
    rank = _rank(s.cpu(), options)
    root = s[:rank].sqrt()
    if options.distribute_scale:
        lora_a, lora_b = root[:, None] * vh[:rank], u[:, :rank] * root[None, :]
    else:
        lora_a, lora_b = s[:rank, None] * vh[:rank], u[:, :rank]
    total = float(s.double().square().sum())
    error = math.sqrt(max(float(s[rank:].double().square().sum()), 0.0) / total) if total > 0 else 0.0
    return lora_a, lora_b, error


class _AdapterWriter:
    """adapter_model.safetensors written as tensors come: the bytes to a scratch file beside it,
    then the header and the bytes copied after it in blocks."""

    BLOCK = 16 * 2**20

    def __init__(self, path: Path) -> None:
        self.path = path
        self.scratch = path.with_name(path.name + ".data")
        self._file = open(self.scratch, "wb")  # noqa: SIM115 -- closed in finish()
        self.header: dict = {"__metadata__": {"format": "pt", "producer": "ri-merge extract-lora"}}
        self.offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        code = next(c for c, d in ST_DTYPES.items() if d == tensor.dtype)
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self._file.write(data.tobytes())
        self.header[name] = {
            "dtype": code,
            "shape": list(tensor.shape),
            "data_offsets": [self.offset, self.offset + data.nbytes],
        }
        self.offset += data.nbytes

    def finish(self) -> int:
        self._file.close()
        raw = json.dumps(self.header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(self.path, "wb") as out, open(self.scratch, "rb") as data:
            out.write(struct.pack("<Q", len(raw)) + raw)
            shutil.copyfileobj(data, out, self.BLOCK)
        self.scratch.unlink()
        return 8 + len(raw) + self.offset


def _config(plan: ExtractPlan, ranks: dict[str, int], biases: bool) -> dict:
    """mergekit's adapter_config.json: r the largest rank, alpha = r, per-module patterns."""
    top = max(ranks.values(), default=1)
    different = {k: v for k, v in ranks.items() if v != top}
    config = {
        "base_model_name_or_path": plan.base.reference,
        "peft_type": "LORA",
        "use_rslora": False,
        "target_modules": sorted({k.rpartition(".")[2] for k in ranks}),
        "modules_to_save": plan.modules_to_save,
        "task_type": "CAUSAL_LM",
        "r": top,
        "lora_alpha": top,
        "rank_pattern": different,
        "alpha_pattern": different,
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    if biases:
        config["lora_bias"] = True
    return config


def _card(plan: ExtractPlan, result: ExtractResult) -> str:
    summary = result.summary()
    return f"""---
base_model: {json.dumps(plan.base.reference)}
library_name: peft
tags:
- ri-merge
- lora
---
# LoRA adapter extracted with ri-merge

The difference between `{plan.model.reference}` and its base `{plan.base.reference}`, as a PEFT
LoRA adapter (`ri-merge extract-lora`): {summary["modules"]} modules by truncated SVD (rank
{summary["rank_min"]}–{summary["rank_max"]}, median {summary["rank_median"]}; worst relative
error ‖τ − B·A‖/‖τ‖ {summary["worst_relative_error"]:.3g}), {summary["saved_whole"]} tensors saved
whole (`modules_to_save`: {", ".join(plan.modules_to_save) or "none"}).
"""


def extract_lora(
    model_ref: str,
    base_ref: str,
    out: Path,
    options: ExtractOptions = ExtractOptions(),
    device: str = "cpu",
    force: bool = False,
) -> ExtractResult:
    """Plan from headers, then decompose tensor by tensor into a staged folder renamed to `out`."""
    plan = plan_extraction(model_ref, base_ref, options)
    from .engine import resolve_device

    target = resolve_device(device)
    out = Path(out)
    inputs = plan.model.files() + plan.base.files()
    staging = None
    try:
        check_target(out, inputs, force)
        out.parent.mkdir(parents=True, exist_ok=True)
        with OutputLock(out):
            clean_stale(out)
            check_target(out, inputs, force)
            check_space(out, sum(r.nbytes for _, r in plan.save))
            staging = make_staging(out)
            result = _write(plan, staging, target, options)
            (staging / "adapter_config.json").write_text(
                json.dumps(_config(plan, result.ranks, result.bias_written), indent=4) + "\n"
            )
            final = ExtractResult(out, result.ranks, result.errors, len(plan.save), result.nbytes)
            (staging / "README.md").write_text(_card(plan, final))
            publish(staging, out, force)
            staging = None
    except OSError as exc:
        raise output_error(exc, out, staging, plan.bytes_read) from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return final


@dataclass
class _Written:
    ranks: dict[str, int]
    errors: dict[str, float]
    bias_written: bool
    nbytes: int


def _write(plan: ExtractPlan, folder: Path, device: torch.device, options: ExtractOptions) -> _Written:
    writer = _AdapterWriter(folder / "adapter_model.safetensors")
    ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    bias = False
    with TensorReader() as reader:
        for module, transposed in plan.decompose:
            weight = module.tensors["weight"]
            dtype = ST_DTYPES[weight.dtype]
            tau = (
                reader.read(weight).to(device).float()
                - reader.read(plan.base.tensors[weight.name]).to(device).float()
            )
            lora_a, lora_b, error = decompose(tau.T if transposed else tau, options)
            del tau
            kind, suffix = ("lora_embedding", "") if transposed else ("lora", ".weight")
            writer.add(f"{PREFIX}{module.name}.{kind}_A{suffix}", lora_a.to(dtype))
            writer.add(f"{PREFIX}{module.name}.{kind}_B{suffix}", lora_b.to(dtype))
            ranks[module.name], errors[module.name] = lora_a.shape[0], error
            if "bias" in module.tensors:
                ref = module.tensors["bias"]
                delta = reader.read(ref).float() - reader.read(plan.base.tensors[ref.name]).float()
                writer.add(f"{PREFIX}{module.name}.lora_B.bias", delta.to(ST_DTYPES[ref.dtype]))
                bias = True
        for name, ref in plan.save:
            writer.add(f"{PREFIX}{name}", reader.read(ref))
    nbytes = writer.finish()
    return _Written(ranks, errors, bias, nbytes)
