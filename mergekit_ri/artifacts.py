"""Everything beside the weights: config.json, tokenizer files, the model card, the heads.

These read the plan (what was merged, from what), so they live above io/, which only writes bytes."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from safetensors.torch import save

from .heads import HEAD_INDEX, head_entry
from .io.sources import TensorReader
from .plan import MergePlan
from .vocab.plan import write_tokenizer

if TYPE_CHECKING:
    from .ri.keys import RIProvenance

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "preprocessor_config.json",
)
# what a built tokenizer's save replaces: none of the source's own tokenizer files may stay beside it
BUILT_REPLACES = set(TOKENIZER_FILES) - {"generation_config.json", "preprocessor_config.json"}
DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def write_config(folder: Path, plan: MergePlan) -> bool:
    """config.json from the base, its dtype set to what was written. False if the base has none."""
    config = plan.config_source.config()
    if config is None:
        return False
    merged = [t.out_dtype for t in plan.tasks if t.merge]
    if merged:
        dtype = DTYPE_NAMES.get(max(set(merged), key=merged.count))
        keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
        for key in keys:
            config[key] = dtype
    config.update(getattr(plan, "config_updates", {}))  # a sliced plan's new layer count (slices.py)
    if plan.vocab is not None and plan.vocab.built is not None:  # mergekit's _update_config_vocab
        config["vocab_size"] = plan.vocab.out_rows
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return True


def copy_tokenizer(folder: Path, plan: MergePlan) -> list[str]:
    """The tokenizer source's files; then, when the recipe built a tokenizer or sets a chat
    template (`vocab`), what transformers saves of it over them."""
    source = plan.tokenizer_source
    copied = []
    built = plan.vocab is not None and plan.vocab.built is not None
    if source is not None and source.folder is not None:
        for name in TOKENIZER_FILES:
            path = source.folder / name
            if path.is_file() and not (built and name in BUILT_REPLACES):
                shutil.copyfile(path, folder / name)
                copied.append(name)
    if plan.vocab is not None and (built or source is not None):
        copied = sorted(set(copied) | set(write_tokenizer(folder, plan.vocab)))
    return copied


def _heads_section(plan: MergePlan) -> str:
    if not plan.heads:
        return ""
    rows = "\n".join(
        f"| {label} | `heads/{label}.safetensors` | "
        f"{', '.join(f'{n} {list(r.shape)}' for n, r in refs.items())} |"
        for label, refs in plan.heads.items()
    )
    return f"""## Task heads

The backbone is merged; each expert keeps its own head. The checkpoint carries
**{plan.heads_default}**'s head and config; put another one in place with
`mergekit_ri.heads.load_with_head(folder, expert, AutoModelFor...)`.

| expert | file | tensors |
|---|---|---|
{rows}

"""


def _ri_section(plan: MergePlan, applied: RIProvenance | None) -> str:
    """What RI did: the original experts, the adapted checkpoints it merged, its settings."""
    ri = plan.recipe.resolve_interference
    if applied is None or ri is None:
        return ""
    rows = "\n".join(
        f"| {label} | `{applied.references[label]}` | `{applied.adapted[label]}` |"
        for label in applied.adapted
    )
    return f"""## Resolving Interference (RI)

Before the merge, every expert was adapted by RI (Ramesh et al., 2026, "Resolving Interference";
arXiv 2603.13467) on unlabeled auxiliary data, so that through its own head it still behaves like
itself and through every other expert's head like the base; **{plan.method.name}** then merged the
adapted experts. Settings: auxiliary data `{ri.auxiliary_data}` (fingerprint `{applied.aux_fingerprint[:16]}`),
{ri.steps} steps, batch size {ri.batch_size}, AdamW lr {ri.lr:g}, weight decay {ri.weight_decay:g},
α = {ri.alpha:g}, seed {plan.recipe.seed}. The adapted experts are cached under `{applied.cache_root}`.

| expert | original checkpoint | adapted checkpoint (RI cache) |
|---|---|---|
{rows}

"""


def write_model_card(
    folder: Path,
    plan: MergePlan,
    applied: RIProvenance | None = None,
    fingerprints: Mapping[str, str | None] | None = None,
) -> None:
    """README.md: inputs, method, recipe as the user wrote it; with RI (`applied`), the original
    experts and the adapted checkpoints that were merged. `fingerprints`: each input's content
    fingerprint (`io.contenthash`) by label, where the merge read all of its tensors; the others
    are listed by their header fingerprint, labelled as such."""
    rows = []
    for model in ([plan.base] if plan.base else []) + plan.experts:
        revision = model.revision or "local"
        reference = f"`{model.reference}`"
        if applied is not None and model is not plan.base and model.label in applied.references:
            reference = f"`{applied.references[model.label]}`, adapted by RI (below)"
        content = (fingerprints or {}).get(model.label)
        fingerprint = f"content `{content}`" if content else f"header only `{model.fingerprint}`"
        rows.append(f"| {model.label} | {reference} | {revision} | {fingerprint} |")
    recipe = plan.recipe if applied is None else plan.recipe.model_copy(update={"models": applied.models})
    (folder / "mergekit_config.yml").write_text(recipe.to_yaml())
    card = f"""---
{_front_matter(plan, applied)}---
# Merged model

Made with [ri-merge](https://pypi.org/project/mergekit-ri/) using **{plan.method.name}**
({plan.method.summary}).

Method: {plan.method.citation}

## Inputs

| role | reference | revision | fingerprint |
|---|---|---|---|
{chr(10).join(rows)}

A *content* fingerprint is a sha256 over the tensors this merge read, as stored in the input's
files (each tensor's sha256, in name order); `mergekit_ri.content_fingerprint(path)` recomputes
it. *Header only* is the sha256/16 of the weights files' headers (names, shapes, dtypes): given
when content fingerprints were not asked for (`--fingerprint-inputs`), or where the merge did not
read every tensor of the input as stored (tensors it does not use, a LoRA adapter or another
vocabulary's rows applied while reading).

{_ri_section(plan, applied)}{_heads_section(plan)}## Recipe

```yaml
{recipe.to_yaml().rstrip()}
```
"""
    (folder / "README.md").write_text(card)


def _front_matter(plan: MergePlan, applied: RIProvenance | None) -> str:
    """The card's YAML header, as mergekit writes it: the Hub builds its model tree from
    `base_model` (every input, the base first) and lists merges by the `merge`/`mergekit` tags."""
    references = [plan.base.reference] if plan.base else []
    for model in plan.experts:
        original = applied.references.get(model.label) if applied is not None else None
        references.append(original or model.reference)
    names: list[str] = []
    for ref in references:  # a LoRA'd model lists its model and its adapter, as mergekit's card does
        parts = ref.split("+") if "+" in ref and not Path(ref).exists() else [ref]
        names += [part.partition("@")[0] for part in parts if part.partition("@")[0] not in names]
    header = {
        "base_model": names,
        "library_name": "transformers",
        "tags": ["mergekit", "merge", "ri-merge"],
    }
    return yaml.safe_dump(header, sort_keys=False, allow_unicode=True)


def save_in_order(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
    """safetensors' save_file with the metadata's keys in sorted order. safetensors keeps the
    metadata in a Rust HashMap, which orders two keys differently from one process to the next:
    the same merge must write the same bytes (a Ray driver, a resumed merge, a second run)."""
    blob = save(tensors, metadata=metadata)
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    header = {"__metadata__": dict(sorted(header.pop("__metadata__").items())), **header}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # as safetensors pads: the data stays 8-byte aligned
    path.write_bytes(len(text).to_bytes(8, "little") + text + blob[8 + size :])


def write_heads(folder: Path, plan: MergePlan, reader: TensorReader) -> None:
    """heads/<expert>.safetensors (each expert's head, as stored) and heads/index.json."""
    if not plan.heads:
        return
    (folder / "heads").mkdir()
    entries = {}
    for model in plan.experts:
        refs = plan.heads[model.label]
        file = f"{model.label}.safetensors"
        save_in_order(
            {name: reader.read(ref).clone() for name, ref in refs.items()},
            folder / "heads" / file,
            {"format": "pt", "expert": model.reference},
        )
        shapes = {name: list(ref.shape) for name, ref in refs.items()}
        entries[model.label] = head_entry(model.label, model.reference, file, shapes, model.config())
    index = {"default": plan.heads_default, "heads": entries}
    (folder / "heads" / HEAD_INDEX).write_text(json.dumps(index, indent=2) + "\n")
