"""Task heads: per-expert classifier tensors that are kept, never merged.

Classifier experts share a backbone but each has its own head, often with a different number
of classes. A recipe's `heads:` names them — `auto` (from `config.json` `architectures`) or a
substring of the tensor names — and the merge then covers the backbone only, writing each
expert's head beside it. `load_with_head` puts a chosen expert's head back on the merged model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UserError

HEAD_ARCHITECTURES = (
    "ForImageClassification",
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForAudioClassification",
    "ForMultipleChoice",
)
AUTO_PREFIXES = ("classifier.", "score.")
HEAD_INDEX = "index.json"

HeadSelector = Callable[[str], bool]


def looks_like_head(name: str) -> bool:
    return name.startswith(AUTO_PREFIXES)


def head_selector(heads: str | None, config: dict | None, where: str = "recipe") -> HeadSelector | None:
    """A predicate on tensor names for the recipe's `heads:` value, or None without heads."""
    if heads is None:
        return None
    if heads != "auto":
        return lambda name: heads in name
    architectures = (config or {}).get("architectures") or []
    if not any(a.endswith(HEAD_ARCHITECTURES) for a in architectures):
        found = ", ".join(architectures) or "no architectures (or no config.json)"
        raise UserError(
            f"{where}: heads: auto needs a *ForImageClassification / *ForSequenceClassification / "
            f"*ForTokenClassification config, the base has {found}; give a tensor-name filter "
            "such as heads: 'classifier.'"
        )
    return looks_like_head


def head_entry(
    label: str, reference: str, file: str, shapes: dict[str, list[int]], config: dict | None
) -> dict[str, Any]:
    config = config or {}
    id2label = config.get("id2label")
    num_labels = len(id2label) if isinstance(id2label, dict) else config.get("num_labels")
    return {
        "model": reference,
        "file": file,
        "tensors": shapes,
        "num_labels": num_labels,
        "id2label": id2label,
    }


def load_with_head(folder: str | Path, expert: str, auto_class: Any = None) -> Any:
    """The merged model of `folder` with `expert`'s head (and labels) in place of the default one.

    `auto_class` is e.g. `transformers.AutoModelForImageClassification` (default: the
    sequence-classification auto class).
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig

    if auto_class is None:
        from transformers import AutoModelForSequenceClassification as auto_class
    folder = Path(folder)
    index = json.loads((folder / "heads" / HEAD_INDEX).read_text())
    if expert not in index["heads"]:
        raise KeyError(f"no head for '{expert}'; heads: {', '.join(index['heads'])}")
    head = index["heads"][expert]
    overrides: dict[str, Any] = {}
    if head.get("id2label"):
        overrides["id2label"] = {int(k): v for k, v in head["id2label"].items()}
        overrides["label2id"] = {v: int(k) for k, v in head["id2label"].items()}
    if head.get("num_labels"):
        overrides["num_labels"] = head["num_labels"]
    config = AutoConfig.from_pretrained(folder, **overrides)
    model = auto_class.from_pretrained(
        folder, config=config, ignore_mismatched_sizes=True, use_safetensors=True
    )
    weights = load_file(folder / "heads" / head["file"])
    state = model.state_dict()
    missing = [name for name in weights if name not in state]
    if missing:
        raise KeyError(f"head tensors {missing} have no place in {type(model).__name__}")
    with torch.no_grad():
        for name, tensor in weights.items():
            state[name].copy_(tensor)
    return model
