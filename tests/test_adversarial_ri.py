"""RI under hostile inputs: non-finite auxiliary data or training is refused before anything is
cached, and a damaged cache entry (tampered, truncated, without manifest) is retrained, not merged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_nothing_written, assert_user_error, read_checkpoint, run_cli, tree_digest
from helpers import EXPERTS, make_classifiers, ri_recipe, vit
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from mergekit_ri.ri import data as ri_data  # noqa: E402
from mergekit_ri.ri.cache import MANIFEST  # noqa: E402
from mergekit_ri.ri.train import is_cached  # noqa: E402

STEPS = 3


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """Experts, auxiliary data, a populated cache and the merge a clean run makes from them."""
    root = tmp_path_factory.mktemp("clean")
    vits = make_classifiers(root / "vit", vit, [3, 5, 2], drift=0.3)
    aux = root / "aux.safetensors"
    save_file({"inputs": torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))}, aux)
    recipe = ri_recipe(root, vits, aux, steps=STEPS, cache_dir=str(root / "cache"))
    result = run_cli("merge", recipe, "-o", root / "out", "--json")
    assert result.code == 0, result.stderr
    adapted = {e: Path(p) for e, p in json.loads(result.stdout)["ri"]["adapted"].items()}
    merged = read_checkpoint(root / "out")
    return {"root": root, "vits": vits, "aux": aux, "adapted": adapted, "merged": merged}


def inputs_of(clean) -> dict[str, str]:
    return tree_digest(clean["root"] / "vit", clean["aux"])


# --- non-finite auxiliary data and training ------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        float("nan"),
        pytest.param(float("inf"), marks=pytest.mark.slow),
        pytest.param(float("-inf"), marks=pytest.mark.slow),
    ],
)
def test_non_finite_auxiliary_data_is_refused_with_the_first_bad_example(tmp_path, clean, monkeypatch, bad):
    monkeypatch.setattr(ri_data, "SCAN_BYTES", 4 * 64 * 5)  # five examples a chunk: the bad one is in the 6th
    values = torch.rand(40, 1, 8, 8)
    values[27, 0, 3, 5] = bad
    values[33, 0, 0, 0] = bad
    aux = tmp_path / "nan-aux.safetensors"
    save_file({"inputs": values}, aux)
    before = tree_digest(clean["root"] / "vit", aux)
    recipe = ri_recipe(tmp_path, clean["vits"], aux, steps=STEPS, cache_dir=str(tmp_path / "cache"))
    result = run_cli("merge", recipe, "-o", tmp_path / "out")
    assert_user_error(result, str(aux), "example 27", "NaN or Inf")
    assert_nothing_written(tmp_path / "out")
    assert not (tmp_path / "cache").exists()  # refused before any training
    assert tree_digest(clean["root"] / "vit", aux) == before


def test_a_diverging_expert_stops_the_merge_and_caches_nothing(tmp_path, clean):
    vits = {k: tmp_path / "vit" / k for k in clean["vits"]}
    shutil.copytree(clean["root"] / "vit", tmp_path / "vit")
    weights = load_file(vits["e1"] / "model.safetensors")
    weights["vit.encoder.layer.0.output.dense.weight"][0, 0] = float("nan")  # finite data, NaN expert
    save_file(weights, vits["e1"] / "model.safetensors", metadata={"format": "pt"})
    before = tree_digest(tmp_path / "vit", clean["aux"])
    recipe = ri_recipe(tmp_path, vits, clean["aux"], steps=STEPS, cache_dir=str(tmp_path / "cache"))
    result = run_cli("merge", recipe, "-o", tmp_path / "out")
    assert_user_error(result, "expert 'e1'", "step 1 of 3")
    assert_nothing_written(tmp_path / "out")
    assert not [p for p in (tmp_path / "cache" / "ri").glob("*/e1*") if p.is_dir()]  # cache/ri/<key>/e1
    assert not [p for p in (tmp_path / "cache").rglob("*") if ".partial-" in p.name]
    assert tree_digest(tmp_path / "vit", clean["aux"]) == before


class PoisonedAdamW(torch.optim.AdamW):
    """AdamW whose every step leaves a NaN in the weights: no later loss sees the last one's."""

    def step(self, closure=None):
        result = super().step(closure)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return result


def test_weights_made_non_finite_by_the_last_step_are_not_cached(tmp_path, clean, monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", PoisonedAdamW)
    before = inputs_of(clean)
    recipe = ri_recipe(tmp_path, clean["vits"], clean["aux"], steps=1, cache_dir=str(tmp_path / "cache"))
    result = run_cli("merge", recipe, "-o", tmp_path / "out")
    assert_user_error(result, "expert 'e0'", "after the last step")
    assert_nothing_written(tmp_path / "out")
    assert not [p for p in (tmp_path / "cache").rglob("config.json")]
    assert inputs_of(clean) == before


# --- damaged cache entries -----------------------------------------------------------------------


def flip_bytes(folder: Path) -> None:
    """Tamper with tensor data (past the header): the file still loads, with other weights."""
    path = folder / "model.safetensors"
    raw = bytearray(path.read_bytes())
    for i in range(len(raw) - 64, len(raw) - 48):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))


def truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def drop_manifest(folder: Path) -> None:
    (folder / MANIFEST).unlink()


def garble_manifest(folder: Path) -> None:
    (folder / MANIFEST).write_text("{not json")


def add_file(folder: Path) -> None:
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"planted")


@pytest.mark.parametrize(
    "damage, reason",
    [
        (flip_bytes, "sha256"),
        pytest.param(truncate, "wrong size", marks=pytest.mark.slow),  # each retrains an expert
        pytest.param(drop_manifest, "no manifest", marks=pytest.mark.slow),
        pytest.param(garble_manifest, "unreadable manifest", marks=pytest.mark.slow),
        pytest.param(add_file, "differ", marks=pytest.mark.slow),
    ],
)
def test_a_damaged_entry_is_retrained_and_the_merge_equals_a_clean_run(tmp_path, clean, damage, reason):
    cache = tmp_path / "cache"
    shutil.copytree(clean["root"] / "cache", cache)
    entry = cache / clean["adapted"]["e1"].relative_to(clean["root"] / "cache")
    good = tree_digest(entry)
    damage(entry)
    before = inputs_of(clean)
    recipe = ri_recipe(tmp_path, clean["vits"], clean["aux"], steps=STEPS, cache_dir=str(cache))
    result = run_cli("merge", recipe, "-o", tmp_path / "out", "--json")
    assert result.code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "RI cache entry" in line]
    assert len(warnings) == 1 and str(entry) in warnings[0] and reason in warnings[0], result.stderr
    status = json.loads(result.stdout)["ri"]
    assert status["trained"] == ["e1"] and sorted(status["cache_hits"]) == ["e0", "e2"]
    merged = read_checkpoint(tmp_path / "out")
    assert set(merged) == set(clean["merged"])
    assert all(torch.equal(merged[n], clean["merged"][n]) for n in merged)
    assert is_cached(entry)
    retrained = tree_digest(entry)
    assert {Path(k).name: v for k, v in retrained.items()} == {Path(k).name: v for k, v in good.items()}
    assert not [p for p in cache.rglob("*") if ".bad-" in p.name or ".partial-" in p.name]
    assert inputs_of(clean) == before


def test_every_published_entry_has_a_manifest_that_checks(clean):
    for label in EXPERTS:
        entry = clean["adapted"][label]
        listed = json.loads((entry / MANIFEST).read_text())["files"]
        assert "config.json" in listed and "model.safetensors" in listed
        assert is_cached(entry)


@pytest.mark.parametrize(
    "field, value", [("lr", 1e38), ("lr", 2.0), ("alpha", 1e300), ("weight_decay", 1e39)]
)
def test_ri_settings_beyond_what_training_can_take_are_refused(tmp_path, field, value):
    """A learning rate of 1e38 crashed inside torch's optimiser (exit 1) after the experts loaded."""
    from mergekit_ri.errors import UserError
    from mergekit_ri.recipe import parse_recipe

    recipe = {
        "merge_method": "ties",
        "base_model": "b",
        "models": [{"model": "a"}, {"model": "c"}],
        "resolve_interference": {"auxiliary_data": "x", field: value},
    }
    with pytest.raises(UserError, match=f"resolve_interference.{field}"):
        parse_recipe(recipe, "r.yaml")
