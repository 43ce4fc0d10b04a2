"""Everything beside the weights: config.json, tokenizer files, the model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import UserError
from ..io.sources import ModelSource
from ..plan import MergePlan

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
    "chat_template.json", "generation_config.json", "preprocessor_config.json",
)
DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def write_config(folder: Path, plan: MergePlan) -> bool:
    """config.json from the base, its dtype set to what was written. False if the base has none."""
    config = plan.reference.config()
    if config is None:
        return False
    merged = [t.out_dtype for t in plan.tasks if t.merge]
    if merged:
        dtype = DTYPE_NAMES.get(max(set(merged), key=merged.count))
        keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
        for key in keys:
            config[key] = dtype
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return True


def tokenizer_source(plan: MergePlan) -> ModelSource | None:
    choice = plan.recipe.tokenizer_source
    if choice is None:
        return None
    if choice == "base":
        return plan.reference
    for model in plan.experts:
        if choice in (model.reference, model.label):
            return model
    raise UserError(f"tokenizer_source '{choice}' is neither 'base' nor one of the recipe's models")


def copy_tokenizer(folder: Path, plan: MergePlan) -> list[str]:
    source = tokenizer_source(plan)
    if source is None or source.folder is None:
        return []
    copied = []
    for name in TOKENIZER_FILES:
        path = source.folder / name
        if path.is_file():
            shutil.copyfile(path, folder / name)
            copied.append(name)
    return copied


def write_model_card(folder: Path, plan: MergePlan) -> None:
    rows = []
    for model in ([plan.base] if plan.base else []) + plan.experts:
        revision = model.revision or "local"
        rows.append(f"| {model.label} | `{model.reference}` | {revision} | `{model.fingerprint}` |")
    card = f"""---
library_name: transformers
tags:
- merge
- ri-merge
---
# Merged model

Made with [ri-merge](https://pypi.org/project/mergekit-ri/) using **{plan.method.name}**
({plan.method.summary}).

Method: {plan.method.citation}

## Inputs

| role | reference | revision | header fingerprint (sha256/16) |
|---|---|---|---|
{chr(10).join(rows)}

## Recipe

```yaml
{plan.recipe.to_yaml().rstrip()}
```
"""
    (folder / "README.md").write_text(card)
