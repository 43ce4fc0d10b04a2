#!/usr/bin/env python
"""Does `ri-merge` give mergekit's model? Both tools on the same recipes, tensor by tensor.

    python scripts/parity_mergekit.py [--markdown] [--out docs/parity.md] [--only NAME,...]  # --out: rows into the page
                                      [--workdir bench-data/parity] [--venv /work/mk-venv]

1. Installs mergekit 0.1.5 into its own venv when missing (scripts/mergekit_venv.py; one-time,
   a few minutes) — or uses `--mergekit PATH`.
2. Generates tiny Llama-style models (a bf16 base and three experts, 40 layers like the 13B
   models of mergekit's examples, ~3 MB each) with a real config.json.
3. Runs mergekit's own example recipes (scripts/parity/*.yml: model names replaced by the
   generated models, nothing else changed) and one recipe per method both tools have, through
   `mergekit-yaml RECIPE OUT --no-copy-tokenizer --allow-crimes` (`mergekit-multi` for the
   multi-stage one) and `ri-merge merge RECIPE -o OUT`.
4. Compares the outputs tensor by tensor and prints one row per recipe (see `VERDICTS`).

How a row is judged (deterministic methods): entry by entry, |ri − mk| must stay within
TOL_STEPS steps (ulps) of the output dtype at the largest magnitude that entry involves (the
two outputs, the base and each input). ri-merge computes in fp32 and rounds once; mergekit
computes in the recipe's dtype and rounds after every operation (difference, weighting, sum,
division, adding back: at most ~8 roundings of half a step each), so honest agreement is a few
steps, while any real divergence (a dropped or doubled task vector, another default) moves
entries by a sizeable part of the task vector. Entries beyond that are "differs on purpose" only
when every one of them is explained by a documented difference (ON_PURPOSE), else "DIFFERS".

Random methods (dare_*, della*) cannot agree entry by entry with mergekit's torch RNG: per
tensor, the fraction of entries the merge changed, the mean and the mean |.| of the merged task
vector are compared between the tools as statistics (z-scores; |z| ≤ Z_MAX on every tensor).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mergekit_venv import DEFAULT_VENV, MERGEKIT_VERSION, ensure_mergekit, find_mergekit, sibling_tool  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = Path(__file__).resolve().parent / "parity"
EXPERTS = ("expert1", "expert2", "expert3")
LORA = "lora1"  # a LoRA adapter of the base: experts written `$base+$lora1`
LORA_EXPERT = "base+lora1"  # that expert, merged by the formula (for tolerances and explanations)
DTYPE = "bfloat16"
TOL_STEPS = 4  # output-dtype steps allowed between the tools (see the module docstring)
Z_MAX = 5.0  # random methods: largest |z| of a per-tensor statistic that still agrees
MIN_STAT_ENTRIES = 1024  # random methods: tensors smaller than this are not tested statistically
RANDOM_METHODS = {"dare_linear", "dare_ties", "della", "della_linear"}
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}

# Documented, deliberate differences (README.md, docs/methods.md "Where ri-merge differs from
# mergekit on purpose", `ri-merge methods`). A row is "differs on purpose" only when every
# entry beyond tolerance is explained by the method's rule below; otherwise it is "DIFFERS".
ON_PURPOSE = {
    "magnitude_cut": "entries at a magnitude cut: ri-merge keeps every entry tied with the k-th "
    "magnitude (TIES paper) and computes τ in fp32, mergekit keeps exactly k of the "
    "bf16-rounded τ by sort order",
    "sce_cut": "entries at the variance cut of select_topk (ties broken by position in ri-merge, by "
    "sort order in mergekit)",
    "epsilon_cut": "entries where some |τᵢ| lies within a bf16 step of epsilon: mergekit compares the "
    "bf16-rounded τ with ε, ri-merge the exact τ (fp32)",
    "sign_zero": "sign election where Σ wᵢτᵢ is within bf16 rounding of 0 (|Σ| ≤ 2⁻⁵·max|wᵢτᵢ|): mergekit "
    "sums bf16-rounded deltas and elects + at ≥ 0, ri-merge sums in fp32 and breaks an exact 0 "
    "by the tensor's majority sign",
}
CONSENSUS_METHODS = {"ties", "breadcrumbs_ties", "sce"}
SIGN_ZONE = 2**-5  # two bf16 roundings (2⁻⁸ each) of a partial sum up to 2·max|wᵢτᵢ|, doubled
CUT_METHODS = {
    "ties": "magnitude_cut",
    "breadcrumbs": "magnitude_cut",
    "breadcrumbs_ties": "magnitude_cut",
    "sce": "sce_cut",
    "ram": "epsilon_cut",
    "ramplus_tl": "epsilon_cut",
}


# ---------------------------------------------------------------- models


def model_shape():
    """40 layers like the 13B models of mergekit's examples (their layer_ranges stay valid); tiny width."""
    from mergekit_ri.synthetic import LlamaShape

    return LlamaShape(vocab=256, hidden=64, intermediate=128, layers=40, heads=4, kv_heads=2)


def ensure_models(root: Path) -> dict[str, Path]:
    """The base and three experts under `root` (generated once; bf16, one shard, config.json)."""
    from mergekit_ri.synthetic import make_family

    folders = {name: root / name for name in ("base", *EXPERTS)}
    mark = root / ".complete"
    if not mark.exists():
        if root.exists():
            shutil.rmtree(root)
        make_family(root, list(EXPERTS), model_shape(), DTYPE, shards=1, seed=0)
        mark.touch()
    folders[LORA] = ensure_adapter(root / LORA, folders["base"])
    return folders


def ensure_adapter(folder: Path, base: Path) -> Path:
    """A PEFT LoRA adapter (r 8, alpha 16) on the base's attention and MLP projections."""
    from mergekit_ri.synthetic import save_lora_adapter

    if not (folder / "adapter_model.safetensors").exists():
        weights = load_all(base)
        layers = model_shape().layers
        targets = [
            f"model.layers.{i}.{m}"
            for i in range(layers)
            for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
        ]
        save_lora_adapter(folder, weights, targets, r=8, alpha=16.0, seed=11)
    return folder


VOCAB_MODELS = ("vbase", "vexpert1", "vexpert2")
VOCAB_ADDED = ("<tool>", "<think>", "</think>")


def ensure_vocab_models(root: Path) -> dict[str, Path]:
    """Models with real tokenizers for the vocabulary recipes: vbase and vexpert1 share a 200-token
    BPE tokenizer; vexpert2 has another one (trained on other text) plus 3 added tokens, 203 rows.
    Their width (48) differs from the main family's, so no tensor is mistaken for one of its."""
    from mergekit_ri.synthetic import (
        LlamaShape,
        base_weights,
        expert_weights,
        save_checkpoint,
        tiny_tokenizer,
    )

    folders = {name: root / name for name in VOCAB_MODELS}
    mark = root / ".complete"
    if mark.exists():
        return folders
    if root.exists():
        shutil.rmtree(root)
    shape = LlamaShape(vocab=200, hidden=48, intermediate=96, layers=4, heads=4, kv_heads=2)
    wide = LlamaShape(vocab=203, hidden=48, intermediate=96, layers=4, heads=4, kv_heads=2)
    base = base_weights(shape, 0)
    first = tiny_tokenizer("abcdefghijklmnop", 0)
    second = tiny_tokenizer("efghijklmnopqrstuvwxyz", 1, VOCAB_ADDED)
    own = base_weights(wide, 7)  # vexpert2's embedding and head: its own rows, its own vocabulary
    second_weights = {
        **expert_weights(base, 2),
        **{n: own[n] for n in ("model.embed_tokens.weight", "lm_head.weight")},
    }
    for name, weights, tok, config in (
        ("vbase", base, first, shape.config(DTYPE)),
        ("vexpert1", expert_weights(base, 1), first, shape.config(DTYPE)),
        ("vexpert2", second_weights, second, wide.config(DTYPE)),
    ):
        save_checkpoint(folders[name], weights, config, DTYPE)
        tok.save_pretrained(folders[name])
    mark.touch()
    return folders


# ---------------------------------------------------------------- recipes


def method_recipes() -> dict[str, str]:
    """One recipe per method (placeholders $base, $expert1..3), plus a few mergekit idioms.

    Parameters are chosen so each method does something (a cut that bites, uneven weights).
    """
    b, e1, e2, e3 = "$base", "$expert1", "$expert2", "$expert3"

    def experts(params_per_model: list[dict | None], names=(e1, e2, e3)) -> list[dict]:
        return [{"model": m, **({"parameters": p} if p else {})} for m, p in zip(names, params_per_model)]

    def r(method: str, models: list[dict], base: str | None = b, params: dict | None = None) -> dict:
        out = {"merge_method": method}
        if base:
            out["base_model"] = base
        out["models"] = models
        if params:
            out["parameters"] = params
        out["dtype"] = DTYPE
        return out

    w3 = [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.7}]
    recipes = {
        "linear": r("linear", experts(w3), base=None),
        "task_arithmetic": r("task_arithmetic", experts(w3), params={"lambda": 0.8}),
        "ties": r("ties", experts([{"weight": 1.0, "density": 0.5}] * 3)),
        "dare_linear": r("dare_linear", experts([{"weight": 1.0, "density": 0.5}] * 3)),
        "dare_ties": r("dare_ties", experts([{"weight": 1.0, "density": 0.5}] * 3)),
        "breadcrumbs": r("breadcrumbs", experts([{"weight": 1.0, "density": 0.8, "gamma": 0.05}] * 3)),
        "breadcrumbs_ties": r(
            "breadcrumbs_ties", experts([{"weight": 1.0, "density": 0.8, "gamma": 0.05}] * 3)
        ),
        "della": r("della", experts([{"weight": 1.0, "density": 0.5, "epsilon": 0.1}] * 3)),
        "della_linear": r("della_linear", experts([{"weight": 1.0, "density": 0.5, "epsilon": 0.1}] * 3)),
        "sce": r("sce", experts([None] * 3), params={"select_topk": 0.5}),
        "slerp": r("slerp", [{"model": b}, {"model": e1}], params={"t": 0.3}),
        "nuslerp": r("nuslerp", experts([{"weight": 0.3}, {"weight": 0.7}], (e1, e2))),
        "nuslerp-no-base": r("nuslerp", experts([{"weight": 0.3}, {"weight": 0.7}], (e1, e2)), base=None),
        "multislerp": r(
            "multislerp", experts([{"weight": 1.0}, {"weight": 2.0}, {"weight": 3.0}]), base=None
        ),
        "karcher": r("karcher", experts([None] * 3), base=None),
        "model_stock": r("model_stock", experts([None] * 3)),
        "nearswap": r("nearswap", [{"model": b}, {"model": e1}], params={"t": 0.005}),
        "arcee_fusion": r("arcee_fusion", [{"model": b}, {"model": e1}]),
        "passthrough": r("passthrough", [{"model": e1, "parameters": {"scale": 0.5}}], base=None),
        "ram": r("ram", experts([None] * 3)),
        "ram-epsilon": r("ram", experts([None] * 3), params={"epsilon": 0.004}),
        "ramplus_tl": r("ramplus_tl", experts([None] * 3)),
        "ramplus_tl-epsilon": r(
            "ramplus_tl", experts([None] * 3), params={"epsilon": 0.004, "r": 0.5, "alpha": 5.0}
        ),
        # mergekit idioms the issue names: each must give mergekit's model
        "ties-defaults": r("ties", experts([{"weight": 1.0}] * 3)),
        "task_arithmetic-base-listed": r(
            "task_arithmetic",
            [{"model": b}, *experts([{"weight": 1.0}] * 2, (e1, e2))],
            params={"normalize": True},
        ),
        # LoRA adapters as experts (mergekit merges each into a cached copy first, with PEFT)
        "task_arithmetic-lora": r(
            "task_arithmetic", experts([{"weight": 0.5}, {"weight": 0.7}], (e1, f"{b}+$lora1"))
        ),
        "ties-lora-mapping": r(
            "ties",
            [
                {"model": e1, "parameters": {"weight": 1.0, "density": 0.5}},
                {"model": {"model": b, "lora": "$lora1"}, "parameters": {"weight": 1.0, "density": 0.5}},
            ],
        ),
        "ties-filter-star": r(
            "ties",
            experts([{"weight": [{"filter": "*", "value": 0.7}], "density": 0.5}] * 2, (e1, e2)),
            params={"int8_mask": True},
        ),
        # a slice's own base_model (mergekit's ConfigReader.base_model): layers 20-39 into expert1
        "slices-base-per-slice": {
            "merge_method": "task_arithmetic",
            "base_model": b,
            "slices": [
                {"sources": [{"model": b, "layer_range": [0, 20]}, {"model": e1, "layer_range": [0, 20]}]},
                {
                    "sources": [
                        {"model": e1, "layer_range": [20, 40]},
                        {"model": e2, "layer_range": [20, 40]},
                    ],
                    "base_model": e1,
                },
            ],
            "parameters": {"weight": 0.5},
            "dtype": DTYPE,
        },
    }
    return {name: yaml.safe_dump(recipe, sort_keys=False) for name, recipe in recipes.items()}


def vocab_recipes() -> dict[str, str]:
    """Different vocabularies (mergekit's tokenizer_source and tokenizer: section) over the models
    of `ensure_vocab_models`; compared token by token (`vocab_order`)."""
    b, e1, e2 = "$vbase", "$vexpert1", "$vexpert2"
    pair = [{"model": e1, "parameters": {"weight": 0.6}}, {"model": e2, "parameters": {"weight": 0.4}}]
    section = {
        "source": "union",
        "pad_to_multiple_of": 32,
        "tokens": {
            "<tool>": {"source": {"kind": "model_token", "model": b, "token": "<s>"}, "force": True},
            "<new>": {"source": {"kind": "zero"}},
        },
    }
    recipes = {
        "vocab:union-linear": {
            "merge_method": "linear",
            "models": [
                {"model": m, "parameters": {"weight": w}} for m, w in ((b, 0.2), (e1, 0.3), (e2, 0.5))
            ],
            "tokenizer_source": "union",
        },
        "vocab:union-task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": b,
            "models": pair,
            "tokenizer_source": "union",
        },
        "vocab:union-ties": {
            "merge_method": "ties",
            "base_model": b,
            "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in (e1, e2)],
            "tokenizer_source": "union",
        },
        "vocab:base": {
            "merge_method": "task_arithmetic",
            "base_model": b,
            "models": pair,
            "tokenizer_source": "base",
        },
        "vocab:model": {
            "merge_method": "task_arithmetic",
            "base_model": b,
            "models": pair,
            "tokenizer_source": e2,
        },
        "vocab:tokenizer-section": {
            "merge_method": "task_arithmetic",
            "base_model": b,
            "models": pair,
            "tokenizer": section,
        },
    }
    return {name: yaml.safe_dump({**r, "dtype": DTYPE}, sort_keys=False) for name, r in recipes.items()}


def example_recipes(folder: Path = EXAMPLES) -> dict[str, str]:
    """mergekit's example recipes shipped in scripts/parity (name -> text with placeholders)."""
    return {f"example:{p.stem}": p.read_text() for p in sorted(folder.glob("*.yml"))}


def render(text: str, folders: dict[str, Path]) -> str:
    """Fill the $base/$expertN placeholders with absolute model folders."""
    return Template(text).substitute({name: str(path.resolve()) for name, path in folders.items()})


def recipe_documents(text: str) -> list[dict]:
    """The YAML documents of a (possibly multi-stage) recipe."""
    return [d for d in yaml.safe_load_all(text) if d]


def recipe_method(text: str) -> str:
    """The merge method of a recipe (the final stage's, for multi-stage ones; all stages listed)."""
    docs = recipe_documents(text)
    methods = [d.get("merge_method", "?") for d in docs]
    return methods[0] if len(methods) == 1 else " → ".join(methods)


# ---------------------------------------------------------------- parameters per tensor (mergekit's rule)


_LAYER = re.compile(r"\.(\d+)\.")


def layer_depth(name: str, layers: int) -> float:
    """mergekit's gradient position: layer i of L at i / (L − 1); tensors outside blocks at 0."""
    m = _LAYER.search(name)
    return int(m.group(1)) / max(layers - 1, 1) if m else 0.0


def resolve_param(value, name: str, layers: int):
    """A recipe parameter's value for one tensor: scalar, gradient list, or [{filter, value}]."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if value and isinstance(value[0], dict):
        for entry in value:
            pattern = entry.get("filter")
            if pattern is None or pattern == "*" or pattern in name:
                return resolve_param(entry.get("value"), name, layers)
        return None
    if len(value) == 1:
        return value[0]
    pos = layer_depth(name, layers) * (len(value) - 1)
    lo = min(int(math.floor(pos)), len(value) - 2)
    frac = pos - lo
    return (1 - frac) * float(value[lo]) + frac * float(value[lo + 1])


def model_param(recipe: dict, model_index: int, key: str, name: str, layers: int, default=None):
    """Per-model parameter, falling back to the global one, then `default`."""
    entry = recipe.get("models", [])[model_index]
    for scope in ((entry or {}).get("parameters") or {}, recipe.get("parameters") or {}):
        if key in scope:
            value = resolve_param(scope[key], name, layers)
            if value is not None:
                return value
    return default


# ---------------------------------------------------------------- running the tools


@dataclass
class Run:
    ok: bool
    message: str = ""
    seconds: float = 0.0


def first_error_line(stderr: str, tool: str) -> str:
    """ri-merge: its one-line error. mergekit: the exception line of its traceback."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    if not lines:
        return "(no message)"
    if tool == "ri-merge":
        for ln in lines:
            if ln.lower().startswith("error"):
                return ln
        return lines[0]
    for ln in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception|Exit)\b", ln) or "Error:" in ln:
            return ln
    return lines[-1]


def run_tool(cmd: list[str], log: Path, tool: str, timeout: int = 900) -> Run:
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={
                **os.environ,
                "PYTHONWARNINGS": "ignore",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
            },
        )
    except subprocess.TimeoutExpired:
        return Run(False, f"timed out after {timeout} s", timeout)
    seconds = time.perf_counter() - start
    log.write_text(
        "$ "
        + " ".join(cmd)
        + f"\n# exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )
    if proc.returncode:
        return Run(False, first_error_line(proc.stderr or proc.stdout, tool)[:160], seconds)
    return Run(True, "", seconds)


def ri_merge_command(recipe: Path, out: Path) -> list[str]:
    exe = Path(sys.executable).parent / "ri-merge"
    base = (
        [str(exe)] if exe.exists() else [sys.executable, "-c", "from mergekit_ri.cli import entry; entry()"]
    )
    return [*base, "merge", str(recipe), "-o", str(out), "--force", "-q", "--device", "cpu"]


# ---------------------------------------------------------------- comparing checkpoints


def tensor_files(folder: Path) -> dict[str, Path]:
    where = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            where.update({k: file for k in handle.keys()})
    return where


def load(file: Path, name: str) -> torch.Tensor:
    with safe_open(str(file), framework="pt") as handle:
        return handle.get_tensor(name)


def ulp(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One step of `dtype` at each |value| (the subnormal step below the smallest normal)."""
    bits = MANTISSA_BITS.get(dtype, 23)
    tiny = torch.finfo(dtype).tiny if dtype in MANTISSA_BITS else torch.finfo(torch.float32).tiny
    exponent = torch.floor(torch.log2(magnitude.float().abs().clamp_min(tiny)))
    return torch.exp2(exponent - bits)


@dataclass
class TensorDiff:
    name: str
    max_rel: float  # max |ri − mk| / max |τ| of the tensor
    differing: int  # entries with ri != mk
    beyond: int  # entries beyond TOL_STEPS steps
    unexplained: int  # entries beyond tolerance not explained by a documented difference
    numel: int
    explained_by: str | None = None


@dataclass
class Comparison:
    tensors: list[TensorDiff] = field(default_factory=list)
    only_ri: list[str] = field(default_factory=list)
    only_mk: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    config_diff: list[str] = field(default_factory=list)
    stats: dict | None = None  # random methods

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def max_rel(self) -> float:
        return max((t.max_rel for t in self.tensors), default=0.0)

    @property
    def frac_differing(self) -> float:
        return sum(t.differing for t in self.tensors) / max(self.numel, 1)

    @property
    def frac_beyond(self) -> float:
        return sum(t.beyond for t in self.tensors) / max(self.numel, 1)

    @property
    def unexplained(self) -> int:
        return sum(t.unexplained for t in self.tensors)

    @property
    def structural(self) -> list[str]:
        out = []
        if self.only_ri:
            out.append(f"{len(self.only_ri)} tensors only in ri-merge (e.g. {self.only_ri[0]})")
        if self.only_mk:
            out.append(f"{len(self.only_mk)} tensors only in mergekit (e.g. {self.only_mk[0]})")
        if self.shape_mismatch:
            out.append(f"{len(self.shape_mismatch)} shape mismatches (e.g. {self.shape_mismatch[0]})")
        out += self.config_diff
        return out


class Inputs:
    """The generated models in memory as float32 (a few MB each)."""

    def __init__(self, folders: dict[str, Path]):
        self.folders = folders
        models = {name: folder for name, folder in folders.items() if name != LORA}
        self.files = {name: tensor_files(folder) for name, folder in models.items()}
        self.tensors = {name: load_all(folder) for name, folder in models.items()}
        if LORA in folders:
            self.tensors[LORA_EXPERT] = lora_merged(self.tensors["base"], folders[LORA])

    def get(self, model: str, name: str) -> torch.Tensor | None:
        tensor = self.tensors.get(model, {}).get(name)
        return None if tensor is None else tensor.float()


class VocabInputs(Inputs):
    """The vocabulary models seen through mergekit's output vocabulary: their embedding and head
    rows placed at the output id of each token they have (zero where they lack it; padding rows:
    the model's mean row), so magnitudes and task vectors line up with the merged rows; "base"
    is vbase."""

    def __init__(self, inputs: Inputs, mk: Path):
        from tokenizers import Tokenizer

        self.folders, self.tensors = inputs.folders, inputs.tensors
        self.files = {**inputs.files, "base": inputs.files.get("vbase", {})}
        out = Tokenizer.from_file(str(mk / "tokenizer.json")).get_vocab(True)
        self.size = json.loads((mk / "config.json").read_text()).get("vocab_size", len(out))
        self.tokens = len(out)
        self.rows = {}
        for model in VOCAB_MODELS:
            own = Tokenizer.from_file(str(self.folders[model] / "tokenizer.json")).get_vocab(True)
            pairs = [(i, own[t]) for t, i in out.items() if t in own]
            self.rows[model] = (torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs]))

    def get(self, model: str, name: str) -> torch.Tensor | None:
        model = "vbase" if model == "base" else model
        tensor = super().get(model, name)
        if tensor is None or model not in self.rows or not ("embed_tokens" in name or "lm_head" in name):
            return tensor
        at, rows = self.rows[model]
        aligned = torch.zeros((self.size, *tensor.shape[1:]))
        aligned[at] = tensor[rows]
        aligned[self.tokens :] = tensor[rows].mean(0)  # padding rows: the model's mean row (mergekit's)
        return aligned


def lora_merged(base: dict[str, torch.Tensor], adapter: Path) -> dict[str, torch.Tensor]:
    """The base with a LoRA adapter merged by the formula, W + (alpha/r)·B·A, rounded to the base's
    dtype as mergekit's PEFT-merged copy is (transformers loads the base in its config's dtype)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    factors = load_file(str(adapter / "adapter_model.safetensors"))
    merged = dict(base)
    for key, lora_a in factors.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight"
            lora_b = factors[key.replace(".lora_A.", ".lora_B.")]
            delta = (lora_b.float() @ lora_a.float()) * scale
            merged[name] = (base[name].float() + delta).to(base[name].dtype)
    return merged


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, in its stored dtype."""
    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def cut_zone(tau: torch.Tensor, kept: int, from_top: bool = True) -> tuple[float, float]:
    """The |τ| interval of entries whose keep decision depends on how a cut at rank `kept` is made.

    The magnitude at the cut, widened by one bf16 step each side: mergekit ranks bf16-rounded
    task vectors, ri-merge exact fp32 ones, and the two keep different members of a tie.
    """
    mags = tau.abs().flatten().sort(descending=from_top).values
    if kept <= 0 or kept > mags.numel():
        return (math.inf, -math.inf)
    v = float(mags[kept - 1])
    step = float(ulp(torch.tensor(max(v, 1e-30)), torch.bfloat16))
    return (v - step, v + step)


def explain_mask(
    method: str, recipe: dict, name: str, taus: list[torch.Tensor], layers: int
) -> tuple[torch.Tensor, str] | None:
    """Entries of tensor `name` where a documented difference may move the result, and why."""
    cut = explain_cut(method, recipe, name, taus, layers)
    if method not in CONSENSUS_METHODS or not taus:
        return cut
    weights = [float(model_param(recipe, i, "weight", name, layers, 1.0) or 0.0) for i in range(len(taus))]
    kept = [t * w for t, w in zip(taus, weights)]
    if method in ("ties", "breadcrumbs_ties"):  # the sum is over the trimmed task vectors
        for i, tau in enumerate(taus):
            density = float(model_param(recipe, i, "density", name, layers, 1.0))
            if density >= 1:
                continue
            mags = tau.abs().flatten().sort(descending=True).values
            n_top = (
                int(float(model_param(recipe, i, "gamma", name, layers, 0.01)) * tau.numel())
                if method == "breadcrumbs_ties"
                else 0
            )
            low = mags[min(mags.numel(), n_top + max(1, int(density * tau.numel()))) - 1]
            keep = tau.abs() >= low
            if n_top:
                keep &= tau.abs() < mags[n_top - 1]
            kept[i] = kept[i] * keep
    total = torch.stack(kept).sum(0).abs()
    scale = torch.stack(kept).abs().max(0).values
    sign = (total <= SIGN_ZONE * scale) & (scale > 0)
    if cut is None:
        return sign, "sign_zero"
    mask, why = cut
    return mask | sign, f"{why}+sign_zero"


def explain_cut(
    method: str, recipe: dict, name: str, taus: list[torch.Tensor], layers: int
) -> tuple[torch.Tensor, str] | None:
    """Entries where a magnitude (or variance) cut may be made differently by the two tools."""
    rule = CUT_METHODS.get(method)
    if rule is None or not taus:
        return None
    shape = taus[0].shape
    mask = torch.zeros(shape, dtype=torch.bool)
    n = taus[0].numel()
    if method in ("breadcrumbs", "breadcrumbs_ties"):
        for i, tau in enumerate(taus):
            density = float(model_param(recipe, i, "density", name, layers, 1.0))
            gamma = float(model_param(recipe, i, "gamma", name, layers, 0.01))
            if density >= 1:
                continue
            # mergekit 0.1.5 keeps sorted |τ| ranks [n_bot, n_bot + target) (its older [n_bot:-n_top]
            # slice, empty when n_top = 0, is fixed in 0.1.5): cuts below the n_top largest and
            # above the n_top + target largest.
            n_top = int(gamma * n)
            target = int(density * n)
            for kept in (n_top, n_top + target):  # the outlier cut and the small-magnitude cut
                if kept == 0:
                    continue
                lo, hi = cut_zone(tau, kept)
                mask |= (tau.abs() >= lo) & (tau.abs() <= hi)
        return mask, "magnitude_cut"
    if method == "ties":
        for i, tau in enumerate(taus):
            density = float(model_param(recipe, i, "density", name, layers, 1.0))
            if density >= 1:
                continue
            lo, hi = cut_zone(tau, max(1, int(density * n)))
            mask |= (tau.abs() >= lo) & (tau.abs() <= hi)
        return mask, "magnitude_cut"
    if rule == "epsilon_cut":
        epsilon = float((recipe.get("parameters") or {}).get("epsilon", 1e-5))
        step = float(ulp(torch.tensor(epsilon), torch.bfloat16))
        for tau in taus:
            mask |= (tau.abs() >= epsilon - step) & (tau.abs() <= epsilon + step)
        return mask, rule
    if method == "sce":
        topk = float((recipe.get("parameters") or {}).get("select_topk", 1.0))
        if topk >= 1:
            return mask, "sce_cut"
        var = torch.stack(taus).var(dim=0, unbiased=False).flatten()
        k = int(int((var != 0).sum()) * topk)  # mergekit: k of the entries with nonzero variance
        v = float(var.sort(descending=True).values[k - 1]) if k > 0 else math.inf
        rel = 2**-5  # mergekit's variance of bf16 task vectors, computed in bf16: a few parts in 2^8
        return ((var >= v * (1 - rel)) & (var <= v * (1 + rel))).reshape(shape), "sce_cut"
    return None


def compare_deterministic(
    ri: Path, mk: Path, inputs: Inputs, experts: list[str], method: str = "", recipe: dict | None = None
) -> Comparison:
    """Entry-by-entry comparison of two checkpoints (see the module docstring for the tolerance).

    `experts`: the input models whose task vectors (against 'base') set the scale of each tensor.
    """
    recipe = recipe or {}
    files_ri, files_mk = load_all(ri), load_all(mk)
    if "tokenizer_source" in recipe or "tokenizer" in recipe:
        files_ri = in_mergekit_order(files_ri, ri, mk)
    cmp = Comparison(
        only_ri=sorted(set(files_ri) - set(files_mk)), only_mk=sorted(set(files_mk) - set(files_ri))
    )
    cmp.config_diff = config_differences(ri, mk)
    layers = model_layers(inputs)
    for name in sorted(set(files_ri) & set(files_mk)):
        x_raw, y_raw = files_ri[name], files_mk[name]
        if x_raw.shape != y_raw.shape:
            cmp.shape_mismatch.append(name)
            continue
        out_dtype = y_raw.dtype
        x, y = x_raw.float(), y_raw.float()
        base = inputs.get("base", name)
        thetas = [t for t in (inputs.get(e, name) for e in experts) if t is not None and t.shape == x.shape]
        if base is not None and base.shape != x.shape:
            base = None
        taus = [t - base for t in thetas] if base is not None else []
        scale = max((float(t.abs().max()) for t in taus), default=0.0) or float(y.abs().max()) or 1.0
        magnitude = torch.maximum(x.abs(), y.abs())
        for t in ([base] if base is not None else []) + thetas:
            magnitude = torch.maximum(magnitude, t.abs())
        diff = (x - y).abs()
        tol = TOL_STEPS * torch.maximum(ulp(magnitude, out_dtype), ulp(magnitude, x_raw.dtype))
        beyond = diff > tol
        n_beyond = int(beyond.sum())
        unexplained, why = n_beyond, None
        if n_beyond and taus:
            explained = explain_mask(method, recipe, name, taus, layers)
            if explained is not None:
                mask, why = explained
                unexplained = int((beyond & ~mask).sum())
        cmp.tensors.append(
            TensorDiff(
                name,
                float(diff.max()) / scale,
                int((diff > 0).sum()),
                n_beyond,
                unexplained,
                x.numel(),
                why if n_beyond else None,
            )
        )
    return cmp


def vocab_order(ri: Path, mk: Path) -> torch.Tensor | None:
    """ri-merge's row of each of mergekit's token ids, when both vocabularies hold the same tokens.

    The tools may number a union's new tokens differently: mergekit takes them from a dict built
    from a Rust hash map (its order changes from run to run), ri-merge in id order."""
    from tokenizers import Tokenizer

    try:
        ours, theirs = (Tokenizer.from_file(str(f / "tokenizer.json")).get_vocab(True) for f in (ri, mk))
    except Exception:  # a missing or unreadable tokenizer: compared as stored
        return None
    if set(ours) != set(theirs):
        return None
    return torch.tensor([ours[t] for t, _ in sorted(theirs.items(), key=lambda item: item[1])])


def in_mergekit_order(files: dict[str, torch.Tensor], ri: Path, mk: Path) -> dict[str, torch.Tensor]:
    """ri-merge's vocabulary tensors with their rows in mergekit's token order (padding rows stay)."""
    order = vocab_order(ri, mk)
    if order is None:
        return files
    out = dict(files)
    for name, tensor in files.items():
        if ("embed_tokens" in name or "lm_head" in name) and tensor.shape[0] >= order.numel():
            out[name] = torch.cat([tensor[order], tensor[order.numel() :]])
    return out


def compare_random(ri: Path, mk: Path, inputs: Inputs) -> Comparison:
    """Statistics of the merged task vector Δ = out − base, per tensor, ri-merge against mergekit.

    kept: fraction of entries with Δ ≠ 0; mean and mean |Δ|. Each is turned into a z-score with
    the two samples' standard errors (binomial for kept); the largest |z| over tensors is reported.
    """
    files_ri, files_mk = load_all(ri), load_all(mk)
    cmp = Comparison(
        only_ri=sorted(set(files_ri) - set(files_mk)), only_mk=sorted(set(files_mk) - set(files_ri))
    )
    cmp.config_diff = config_differences(ri, mk)
    zmax = {"kept": 0.0, "mean": 0.0, "mean_abs": 0.0}
    kept_ri = kept_mk = total = 0
    worst = {}
    for name in sorted(set(files_ri) & set(files_mk)):
        x, y = files_ri[name].float(), files_mk[name].float()
        base = inputs.get("base", name)
        if x.shape != y.shape:
            cmp.shape_mismatch.append(name)
            continue
        cmp.tensors.append(TensorDiff(name, 0.0, int((x != y).sum()), 0, 0, x.numel()))
        if base is None or base.shape != x.shape or x.numel() < MIN_STAT_ENTRIES:
            continue
        dx, dy = (x - base).flatten(), (y - base).flatten()
        n = dx.numel()
        fx, fy = float((dx != 0).float().mean()), float((dy != 0).float().mean())
        kept_ri += int((dx != 0).sum())
        kept_mk += int((dy != 0).sum())
        total += n
        p = (fx + fy) / 2
        z = {"kept": (fx - fy) / max(math.sqrt(2 * p * (1 - p) / n), 1e-12)}
        for key, fn in (("mean", lambda v: v), ("mean_abs", torch.abs)):
            a, b = fn(dx), fn(dy)
            se = math.sqrt((float(a.var()) + float(b.var())) / n)
            z[key] = (float(a.mean()) - float(b.mean())) / max(se, 1e-30)
        for key, value in z.items():
            if abs(value) > abs(zmax[key]):
                zmax[key], worst[key] = value, name
    cmp.stats = {
        "z": zmax,
        "worst": worst,
        "kept_ri": kept_ri / max(total, 1),
        "kept_mk": kept_mk / max(total, 1),
    }
    return cmp


def config_differences(ri: Path, mk: Path) -> list[str]:
    """Architecture fields of config.json that differ (num_hidden_layers for slices, ...)."""
    keys = (
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "vocab_size",
        "model_type",
        "torch_dtype",
    )
    try:
        a, b = (json.loads((Path(f) / "config.json").read_text()) for f in (ri, mk))
    except (OSError, ValueError):
        return ["config.json missing or unreadable"]
    for c in (a, b):  # transformers 5 (mergekit's) writes "dtype" where 4.x wrote "torch_dtype"
        c.setdefault("torch_dtype", c.get("dtype"))
    return [f"config {k}: ri-merge {a.get(k)!r}, mergekit {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def model_layers(inputs: Inputs) -> int:
    names = inputs.files.get("base", {})
    found = [int(m.group(1)) for n in names if (m := _LAYER.search(n))]
    return max(found, default=-1) + 1


# ---------------------------------------------------------------- verdicts


@dataclass
class Row:
    recipe: str
    method: str
    ri: Run
    mk: Run
    cmp: Comparison | None = None
    random: bool = False

    @property
    def verdict(self) -> tuple[str, str]:
        """(verdict, note)."""
        if not self.ri.ok and not self.mk.ok:
            return "both refuse", ""
        if not self.ri.ok:
            return "DIFFERS", "ri-merge refuses a recipe mergekit runs"
        if not self.mk.ok:
            return "mergekit refuses", "ri-merge runs it (a recipe beyond mergekit)"
        cmp = self.cmp
        if cmp.structural:
            return "DIFFERS", "; ".join(cmp.structural)
        if self.random:
            s = cmp.stats
            z = s["z"]
            note = (
                f"random: Δ≠0 on {s['kept_ri']:.3f} (ri) / {s['kept_mk']:.3f} (mk) of entries; "
                f"max |z| kept {abs(z['kept']):.1f}, mean {abs(z['mean']):.1f}, mean|Δ| {abs(z['mean_abs']):.1f}"
            )
            bad = [k for k, v in z.items() if abs(v) > Z_MAX]
            if bad:
                return "DIFFERS", note + f" — beyond |z| {Z_MAX:g}: " + ", ".join(
                    f"{k} on {s['worst'][k]}" for k in bad
                )
            return "agrees (in law)", note
        if not any(t.beyond for t in cmp.tensors):
            return "agrees", ""
        if cmp.unexplained == 0:
            reasons = sorted(
                {r for t in cmp.tensors if t.beyond and t.explained_by for r in t.explained_by.split("+")}
            )
            return "differs on purpose", "; ".join(ON_PURPOSE[r] for r in reasons)
        worst = max(cmp.tensors, key=lambda t: (t.unexplained, t.max_rel))
        return "DIFFERS", (
            f"{cmp.unexplained} entries beyond {TOL_STEPS} steps unexplained "
            f"(worst {worst.name}: {worst.unexplained}/{worst.numel})"
        )


HEADERS = [
    "recipe",
    "method",
    "ri-merge",
    "mergekit",
    "max |Δ| / max |τ|",
    "entries differing",
    "beyond tol",
    "verdict",
    "note",
]


def status(run: Run) -> str:
    return "ok" if run.ok else f"refused: {run.message}"


def row_cells(row: Row) -> list[str]:
    verdict, note = row.verdict
    if row.cmp is None or row.cmp.structural:
        diff = frac = beyond = "—"
    elif row.random:
        diff, beyond = "— (random)", "—"
        frac = f"{row.cmp.frac_differing:.1%}"
    else:
        diff = f"{row.cmp.max_rel:.3g}"
        frac = f"{row.cmp.frac_differing:.2%}"
        beyond = f"{row.cmp.frac_beyond:.2%}"
    return [row.recipe, row.method, status(row.ri), status(row.mk), diff, frac, beyond, verdict, note]


def render_table(rows: list[Row], markdown: bool) -> str:
    cells = [row_cells(r) for r in rows]
    if markdown:

        def esc(s: str) -> str:
            return s.replace("|", "\\|").replace("\n", " ")

        lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
        lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in cells]
        return "\n".join(lines)
    short = [[c if len(c) <= 60 else c[:57] + "..." for c in row] for row in cells]
    widths = [max(len(h), *(len(r[i]) for r in short)) for i, h in enumerate(HEADERS)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        [fmt.format(*HEADERS), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in short]
    )


def update_page(page: str, table: str) -> str:
    """`page` (markdown) with each of `table`'s rows put in place of the row of the same recipe in
    any of its tables; rows it has no place for go at the end of its first table. The prose, and
    rows this run did not compare (an `--only` run), stay as they are."""
    rows = table.splitlines()[2:]
    by_recipe = {row.split("|")[1].strip(): row for row in rows}
    lines = page.splitlines()
    header = "| " + " | ".join(HEADERS) + " |"
    first_end = None
    for i, line in enumerate(lines):
        if line.startswith("| ") and line.split("|")[1].strip() in by_recipe and line != header:
            lines[i] = by_recipe.pop(line.split("|")[1].strip())
        if first_end is None and line == header:
            first_end = i + 2
            while first_end < len(lines) and lines[first_end].startswith("|"):
                first_end += 1
    new = [row for row in rows if row.split("|")[1].strip() in by_recipe]
    if first_end is None:
        return page.rstrip("\n") + ("\n\n" if page.strip() else "") + table + "\n"
    lines[first_end:first_end] = new
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def input_models(text: str) -> list[str]:
    """Which generated models a rendered-to-be recipe uses as experts (for the task-vector scale
    and the cut explanations), in the recipe's order (the LoRA'd base comes last in its rows)."""
    return [e for e in (*EXPERTS, *VOCAB_MODELS[1:]) if f"${e}" in text] + (
        [LORA_EXPERT] if f"${LORA}" in text else []
    )


@dataclass
class Job:
    """One recipe: its rendered file, outputs and runs."""

    name: str
    text: str
    rendered: str
    recipe: Path
    slug: str
    multi: bool
    ri_out: Path
    mk_cache: Path
    ri: Run | None = None
    mk: Run | None = None


def prepare(name: str, text: str, folders: dict[str, Path], mergekit: str, work: Path) -> Job:
    rendered = render(text, folders)
    slug = re.sub(r"[^\w.-]+", "_", name)
    recipe = work / "recipes" / f"{slug}.yml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(rendered)
    # mergekit's output depends only on the recipe, the inputs and its fixed seed: cached by
    # (mergekit, recipe text), so a rerun after ri-merge changed costs only ri-merge's time.
    key = hashlib.sha256(f"{mergekit}\n{rendered}".encode()).hexdigest()[:16]
    return Job(
        name,
        text,
        rendered,
        recipe,
        slug,
        len(recipe_documents(rendered)) > 1,
        work / "out" / slug / "ri",
        work / "mk-cache" / key,
    )


def mergekit_args(job: Job, work: Path) -> list[str]:
    """mergekit-yaml's (or mergekit-multi's) arguments for one job."""
    common = ["--no-copy-tokenizer", "--allow-crimes", "--random-seed", "0"]
    if "$lora" in job.text:  # mergekit needs a folder for the LoRA'd copies it makes
        common += ["--lora-merge-cache", str(work / "mk-lora-cache")]
    out = str(job.mk_cache / "model")
    if job.multi:
        return [
            str(job.recipe),
            "--intermediate-dir",
            str(work / "mk-intermediate" / job.slug),
            "--out-path",
            out,
            *common,
        ]
    return [str(job.recipe), out, *common]


# Runs mergekit's own click commands (the console scripts' entry points) for many recipes in one
# process: importing mergekit + transformers costs ~10 s of CPU per process, more than these tiny
# merges. Each call gets the command line mergekit-yaml would; its output goes to a log file.
MK_DRIVER = r"""
import json, os, sys, time, traceback
jobs = json.load(open(sys.argv[1]))
from mergekit.scripts.run_yaml import main as run_yaml
from mergekit.scripts.multimerge import main as run_multi
for job in jobs:
    log = open(job["log"], "w")
    saved = os.dup(1), os.dup(2)
    sys.stdout.flush(); sys.stderr.flush()
    os.dup2(log.fileno(), 1); os.dup2(log.fileno(), 2)
    start = time.perf_counter()
    ok, message = True, ""
    try:
        (run_multi if job["multi"] else run_yaml).main(args=job["args"], standalone_mode=False)
    except BaseException as exc:
        ok = False
        traceback.print_exc()
        message = (type(exc).__name__ + ": " + str(exc)).strip().splitlines()[0]
    sys.stdout.flush(); sys.stderr.flush()
    os.dup2(saved[0], 1); os.dup2(saved[1], 2)
    os.close(saved[0]); os.close(saved[1]); log.close()
    with open(job["result"], "w") as f:
        json.dump({"ok": ok, "message": message[:160], "seconds": time.perf_counter() - start}, f)
    print(("ok " if ok else "refused ") + job["name"], flush=True)
"""


def run_mergekit_batch(jobs: list[Job], mergekit: str, work: Path, per_process: bool) -> None:
    """Fill job.mk from the cache, running mergekit on the jobs that are not cached."""
    todo = []
    for job in jobs:
        result = job.mk_cache / "run.json"
        if result.exists():
            job.mk = Run(**json.loads(result.read_text()))
            continue
        if job.mk_cache.exists():
            shutil.rmtree(job.mk_cache)
        job.mk_cache.mkdir(parents=True)
        todo.append(job)
    if not todo:
        return
    print(f"mergekit: {len(todo)} recipes ({len(jobs) - len(todo)} cached) ...", file=sys.stderr, flush=True)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if per_process:
        for job in todo:
            exe = (sibling_tool(mergekit, "mergekit-multi") or "mergekit-multi") if job.multi else mergekit
            job.mk = run_tool([exe, *mergekit_args(job, work)], logs / f"{job.slug}-mk.log", "mergekit")
            (job.mk_cache / "run.json").write_text(json.dumps(job.mk.__dict__))
        return
    spec = [
        {
            "name": j.name,
            "multi": j.multi,
            "args": mergekit_args(j, work),
            "log": str(logs / f"{j.slug}-mk.log"),
            "result": str(j.mk_cache / "run.json"),
        }
        for j in todo
    ]
    jobs_file = work / "mk-jobs.json"
    jobs_file.write_text(json.dumps(spec))
    python = sibling_tool(mergekit, "python") or "python"
    subprocess.run([python, "-c", MK_DRIVER, str(jobs_file)], env=env, stdout=sys.stderr)
    for job in todo:
        result = job.mk_cache / "run.json"
        if result.exists():
            job.mk = Run(**json.loads(result.read_text()))
            if not job.mk.ok:  # the traceback's last exception line, as for a per-process run
                log = (logs / f"{job.slug}-mk.log").read_text()
                job.mk.message = first_error_line(log, "mergekit")[:160]
                result.write_text(json.dumps(job.mk.__dict__))
        else:
            job.mk = Run(False, "mergekit's driver process died (see logs)")


def compare_job(job: Job, inputs: Inputs) -> Row:
    docs = recipe_documents(job.rendered)
    final_method = docs[-1].get("merge_method", "")
    row = Row(job.name, recipe_method(job.text), job.ri, job.mk, random=final_method in RANDOM_METHODS)
    if job.ri.ok and job.mk.ok:
        mk_out = job.mk_cache / "model"
        if job.name.startswith("vocab:"):
            inputs = VocabInputs(inputs, mk_out)
        if row.random:
            row.cmp = compare_random(job.ri_out, mk_out, inputs)
        else:
            row.cmp = compare_deterministic(
                job.ri_out, mk_out, inputs, input_models(job.text), final_method, docs[-1]
            )
    return row


def mergekit_methods(mergekit_yaml: str) -> list[str]:
    """The merge methods mergekit registers (asked of its own Python)."""
    python = sibling_tool(mergekit_yaml, "python")
    code = (
        "from mergekit.merge_methods import registered_methods as r; "
        "print('\\n'.join(sorted(m.spec.name for m in r())))"
    )
    proc = subprocess.run([python or "python", "-c", code], capture_output=True, text=True)
    return proc.stdout.split() if proc.returncode == 0 else []


def ri_methods() -> list[str]:
    exe = ri_merge_command(Path("x"), Path("y"))[:-8]
    proc = subprocess.run([*exe, "methods", "--json"], capture_output=True, text=True)
    return list(json.loads(proc.stdout)) if proc.returncode == 0 else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument(
        "--out",
        type=Path,
        help="also put the rows into this markdown page's tables (a recipe's row replaced, new ones "
        "appended to the first table, the prose kept), and write parity.json into the workdir",
    )
    parser.add_argument("--only", default="", help="comma-separated recipe names (default: all)")
    parser.add_argument("--workdir", type=Path, default=REPO / "bench-data" / "parity")
    parser.add_argument(
        "--venv", type=Path, default=DEFAULT_VENV, help="mergekit's venv (created when missing)"
    )
    parser.add_argument("--mergekit", default=None, help="a mergekit-yaml to use instead of the venv's")
    parser.add_argument("--no-install", action="store_true", help="fail instead of installing mergekit")
    parser.add_argument(
        "--reuse-ri",
        action="store_true",
        help="compare ri-merge outputs left in the workdir by an earlier run instead of merging again",
    )
    parser.add_argument(
        "--mergekit-per-process",
        action="store_true",
        help="run each recipe as its own mergekit-yaml process (default: mergekit's CLI "
        "commands called in one process, which saves its ~10 s import per recipe)",
    )
    args = parser.parse_args(argv)

    if args.mergekit:
        mergekit = args.mergekit
    elif args.no_install:
        mergekit = find_mergekit(None, args.venv)
        if not mergekit:
            print("mergekit-yaml not found (--no-install)", file=sys.stderr)
            return 2
    else:
        mergekit = ensure_mergekit(args.venv, MERGEKIT_VERSION)
    work = args.workdir.resolve()
    folders = {**ensure_models(work / "models"), **ensure_vocab_models(work / "vocab-models")}
    inputs = Inputs(folders)

    recipes = {**example_recipes(), **method_recipes(), **vocab_recipes()}
    if args.only:
        wanted = set(args.only.split(","))
        recipes = {k: v for k, v in recipes.items() if k in wanted or k.removeprefix("example:") in wanted}
    print(f"{len(recipes)} recipes, ri-merge vs {mergekit}", file=sys.stderr)
    jobs = [prepare(name, text, folders, mergekit, work) for name, text in recipes.items()]
    for job in jobs:
        if args.reuse_ri and (job.ri_out / "config.json").exists():
            job.ri = Run(True)
            continue
        if job.ri_out.exists():
            shutil.rmtree(job.ri_out)
        job.ri = run_tool(
            ri_merge_command(job.recipe, job.ri_out), work / "logs" / f"{job.slug}-ri.log", "ri-merge"
        )
        print(
            f"ri-merge {'ok' if job.ri.ok else 'refused'} ({job.ri.seconds:.1f}s): {job.name}",
            file=sys.stderr,
            flush=True,
        )
    run_mergekit_batch(jobs, mergekit, work, args.mergekit_per_process)
    rows = []
    for job in jobs:
        rows.append(compare_job(job, inputs))
        print(f"compared: {job.name}: {rows[-1].verdict[0]}", file=sys.stderr, flush=True)

    ours, theirs = set(ri_methods()), set(mergekit_methods(mergekit))
    summary = {
        "both": sorted(ours & theirs),
        "only_mergekit": sorted(theirs - ours),
        "only_ri_merge": sorted(ours - theirs),
    }
    table = render_table(rows, args.markdown)
    print(table)
    print(
        f"\nmethods in both: {', '.join(summary['both'])}\nonly in mergekit {MERGEKIT_VERSION}: "
        f"{', '.join(summary['only_mergekit']) or '—'}\nonly in ri-merge: {', '.join(summary['only_ri_merge']) or '—'}"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page = args.out.read_text() if args.out.exists() else ""
        args.out.write_text(update_page(page, render_table(rows, True)))
        (args.workdir / "parity.json").write_text(
            json.dumps(
                {"rows": [dict(zip(HEADERS, row_cells(r))) for r in rows], "methods": summary}, indent=2
            )
        )
    return 1 if any(r.verdict[0] == "DIFFERS" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
