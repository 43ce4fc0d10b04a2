"""RI's cache under concurrency: a file lock per entry, atomic entries, each expert trained once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import EXPERTS, make_classifiers, vit
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
from mergekit_ri.recipe import parse_recipe  # noqa: E402
from mergekit_ri.ri import prepare, train  # noqa: E402
from mergekit_ri.ri.cache import write_manifest  # noqa: E402


@pytest.fixture
def setup(tmp_path):
    vits = make_classifiers(tmp_path / "vit", vit, [3, 5, 2], drift=0.3)
    aux = tmp_path / "aux.safetensors"
    save_file({"inputs": torch.rand(32, 1, 8, 8)}, aux)
    recipe = parse_recipe(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(vits["base"]),
            "models": [{"model": str(vits[e])} for e in EXPERTS],
            "resolve_interference": {
                "auxiliary_data": str(aux),
                "steps": 3,
                "batch_size": 8,
                "lr": 1e-3,
                "cache_dir": str(tmp_path / "cache"),
            },
        }
    )
    return recipe, tmp_path


@pytest.fixture
def counted(monkeypatch):
    """adapt_expert, counted per expert and slowed so that concurrent merges overlap."""
    calls: list[int] = []
    real = train.adapt_expert

    def slow(expert, *args, **kwargs):
        calls.append(id(expert))
        time.sleep(0.4)
        return real(expert, *args, **kwargs)

    monkeypatch.setattr(train, "adapt_expert", slow)
    return calls


def test_two_merges_on_a_cold_cache_train_each_expert_once(setup, counted):
    recipe, root = setup
    results, errors = [None, None], []

    def merge(i: int) -> None:
        try:
            results[i] = prepare.resolve_interference(recipe, root, torch.device("cpu"))[1]
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=merge, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(counted) == len(EXPERTS)  # three trainings in all, not six
    first, second = results
    assert sorted(first.trained + second.trained) == EXPERTS
    for status in results:
        assert sorted(status.trained + status.cache_hits) == EXPERTS
    assert first.adapted == second.adapted
    assert all(train.is_cached(Path(f)) for f in first.adapted.values())
    cache = root / "cache"
    assert not [p for p in cache.rglob("*") if ".partial-" in p.name]  # no staging folder left behind
    assert len(list(cache.rglob("*.lock"))) == len(EXPERTS)


def test_a_merge_waits_for_the_lock_then_uses_the_entry(setup, counted):
    recipe, root = setup
    _, status = prepare.resolve_interference(recipe, root, torch.device("cpu"), dry_run=True)
    folder = Path(status.adapted["e0"])
    result = {}
    with train.cache_lock(folder):
        worker = threading.Thread(
            target=lambda: result.update(
                status=prepare.resolve_interference(recipe, root, torch.device("cpu"))[1]
            )
        )
        worker.start()
        time.sleep(1.5)
        assert worker.is_alive() and not counted and not train.is_cached(folder)  # blocked on e0's lock
        # meanwhile "another merge" publishes e0
        (folder / "config.json").parent.mkdir(parents=True)
        for f in Path(recipe.models[0].model).iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        write_manifest(folder)  # entries are published with their manifest
    worker.join(timeout=300)
    assert result["status"].cache_hits == ["e0"] and sorted(result["status"].trained) == ["e1", "e2"]
    assert len(counted) == 2


@pytest.mark.slow  # trains an expert
def test_an_incomplete_entry_is_retrained_and_replaced(setup, counted):
    recipe, root = setup
    _, status = prepare.resolve_interference(recipe, root, torch.device("cpu"), dry_run=True)
    folder = Path(status.adapted["e1"])
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"half a file")  # a crash before publishing, say
    _, status = prepare.resolve_interference(recipe, root, torch.device("cpu"))
    assert sorted(status.trained) == EXPERTS and status.cache_hits == []
    assert train.is_cached(folder) and (folder / "model.safetensors").stat().st_size > 100
