"""The model card of an RI merge names the experts the user gave, the RI settings and the cache."""

from __future__ import annotations

import re

import pytest
import torch
import yaml
from conftest import run_cli, write_recipe
from helpers import EXPERTS, make_classifiers, vit
from safetensors.torch import save_file

pytest.importorskip("transformers")


def test_model_card_lists_the_original_experts_and_how_ri_adapted_them(tmp_path):
    vits = make_classifiers(tmp_path / "vit", vit, [3, 5, 2], drift=0.3)
    aux = tmp_path / "aux.safetensors"
    save_file({"inputs": torch.rand(16, 1, 8, 8)}, aux)
    cache = tmp_path / "ri-cache"
    recipe = write_recipe(
        tmp_path / "ri.yaml",
        merge_method="ties",
        base_model=str(vits["base"]),
        models=[{"model": str(vits[e]), "parameters": {"weight": 1.0 + i}} for i, e in enumerate(EXPERTS)],
        resolve_interference={
            "auxiliary_data": str(aux),
            "steps": 2,
            "batch_size": 4,
            "lr": 3e-4,
            "alpha": 0.5,
            "cache_dir": str(cache),
        },
    )
    result = run_cli("merge", recipe, "-o", tmp_path / "out", "-q")
    assert result.code == 0, result.stderr
    card = (tmp_path / "out" / "README.md").read_text()
    section = card[card.index("## Resolving Interference (RI)") : card.index("## Task heads")]
    assert (
        "2 steps" in section and "batch size 4" in section and "lr 0.0003" in section and "α = 0.5" in section
    )
    assert str(aux) in section and f"cached under `{cache / 'ri'}`" in section
    for e in EXPERTS:
        row = next(line for line in section.splitlines() if line.startswith(f"| {e} |"))
        original, adapted = re.findall(r"`([^`]+)`", row)
        assert original == str(vits[e])
        assert adapted.startswith(str(cache / "ri")) and adapted.endswith(f"/{e}")
        assert (tmp_path / "out").exists() and (cache / "ri").exists()
        assert f"| {e} | `{vits[e]}`, adapted by RI" in card  # the inputs table too
    # the recipe printed in the card is the one the user wrote, not one pointing into the cache
    recipe_block = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert [m["model"] for m in recipe_block["models"]] == [str(vits[e]) for e in EXPERTS]
    assert [m["parameters"]["weight"] for m in recipe_block["models"]] == [1.0, 2.0, 3.0]
    assert recipe_block["resolve_interference"]["steps"] == 2


def test_model_card_without_ri_has_no_ri_section(tmp_path):
    vits = make_classifiers(tmp_path / "vit", vit, [3, 5, 2])
    recipe = write_recipe(
        tmp_path / "plain.yaml",
        merge_method="task_arithmetic",
        base_model=str(vits["base"]),
        heads="auto",
        models=[{"model": str(vits[e])} for e in EXPERTS],
    )
    assert run_cli("merge", recipe, "-o", tmp_path / "out", "-q").code == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Resolving Interference" not in card and f"`{vits['e0']}`" in card
