"""What a merged folder says about itself: the card's front matter (the Hub's model tree) and
`mergekit_config.yml`, the recipe as written, which merges again to the same bytes."""

from __future__ import annotations

from pathlib import Path

import yaml
from conftest import read_checkpoint, run_cli

from mergekit_ri.recipe import load_recipe


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_card_front_matter_lists_every_input_and_the_merge_tags(tmp_path: Path, family, recipe_for) -> None:
    out = tmp_path / "out"
    assert run_cli("merge", recipe_for("ties", parameters={"density": 0.5}), "-o", out).code == 0
    header = front_matter((out / "README.md").read_text())
    assert header["base_model"] == [str(family[n]) for n in ("base", "a", "b", "c")]
    assert {"merge", "mergekit"} <= set(header["tags"])
    assert header["library_name"] == "transformers"


def test_mergekit_config_is_the_recipe_and_merges_to_the_same_bytes(tmp_path: Path, recipe_for) -> None:
    recipe = recipe_for("task_arithmetic", parameters={"lambda": 0.7, "weight": [0.5, 1.0]})
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_cli("merge", recipe, "-o", first).code == 0
    assert load_recipe(first / "mergekit_config.yml") == load_recipe(recipe)
    assert run_cli("merge", first / "mergekit_config.yml", "-o", second).code == 0
    again = read_checkpoint(second)
    for name, tensor in read_checkpoint(first).items():
        assert again[name].equal(tensor), name
