"""Builders shared by several test modules (tiny classifier experts, RI recipes), kept out of
the test modules themselves so that no test module imports another."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import write_recipe

EXPERTS = ["e0", "e1", "e2"]


def vit(num_labels: int, seed: int):
    import transformers

    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    return transformers.ViTForImageClassification(config)


def make_classifiers(root: Path, build, label_counts: list[int], drift: float = 0.01) -> dict[str, Path]:
    """A base and experts whose backbones drift from it and whose heads have their own sizes."""
    base = build(2, 0)
    base.save_pretrained(root / "base")
    folders = {"base": root / "base"}
    for i, labels in enumerate(label_counts):
        expert = build(labels, 100 + i)
        backbone = {k: v for k, v in base.state_dict().items() if not k.startswith("classifier")}
        expert.load_state_dict(backbone, strict=False)
        with torch.no_grad():
            for name, param in expert.named_parameters():
                if not name.startswith("classifier"):
                    param.add_(torch.randn_like(param) * drift)
        expert.config.id2label = {j: f"task{i}-class{j}" for j in range(labels)}
        expert.config.label2id = {v: k for k, v in expert.config.id2label.items()}
        folders[f"e{i}"] = root / f"e{i}"
        expert.save_pretrained(folders[f"e{i}"])
    return folders


def ri_recipe(tmp_path: Path, vits, aux, method: str = "ties", **ri) -> Path:
    """A merge recipe over the tiny ViT experts with a resolve_interference section."""
    settings = {"auxiliary_data": str(aux), "steps": 20, "batch_size": 16, "lr": 1e-3, **ri}
    return write_recipe(
        tmp_path / f"ri-{method}.yaml",
        merge_method=method,
        base_model=str(vits["base"]),
        models=[{"model": str(vits[e])} for e in EXPERTS],
        out_dtype="float32",
        resolve_interference=settings,
    )
