"""The driver's side of RI on Ray without a cluster: what a task asks Ray for, and how an entry a
worker shipped back is checked and published into the cache (the Ray runs: tests/test_ray.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergekit_ri.ri.cache import MANIFEST, entry_problem, write_manifest
from mergekit_ri.ri.remote import publish_shipped, task_resources


def shipped_entry(tmp_path: Path) -> dict[str, bytes]:
    """The files of an entry as a worker returns them: weights, config, a nested file, manifest."""
    entry = tmp_path / "worker" / "e0"
    (entry / "sub").mkdir(parents=True)
    (entry / "model.safetensors").write_bytes(bytes(range(256)) * 3)
    (entry / "config.json").write_text(json.dumps({"architectures": ["ViTForImageClassification"]}))
    (entry / "sub" / "vocab.txt").write_text("a\nb\n")
    write_manifest(entry)
    return {p.relative_to(entry).as_posix(): p.read_bytes() for p in entry.rglob("*") if p.is_file()}


def test_a_shipped_entry_is_published_as_sent(tmp_path: Path) -> None:
    files = shipped_entry(tmp_path)
    folder = tmp_path / "cache" / "key" / "e0"
    publish_shipped(files, folder, "e0")
    assert entry_problem(folder) is None
    assert {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    } == files
    assert [p.name for p in folder.parent.iterdir()] == ["e0"]  # no staging folder left


def test_a_damaged_leftover_is_replaced(tmp_path: Path) -> None:
    folder = tmp_path / "cache" / "key" / "e0"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # no manifest: a crashed writer's leftover
    publish_shipped(shipped_entry(tmp_path), folder, "e0")
    assert entry_problem(folder) is None and (folder / MANIFEST).is_file()


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda f: f.update({"model.safetensors": f["model.safetensors"][:-1] + b"\x00"}), "sha256"),
        (lambda f: f.update({"model.safetensors": f["model.safetensors"][:-1]}), "wrong size"),
        (lambda f: f.pop("config.json"), "files differ"),
        (lambda f: f.pop(MANIFEST), "no manifest"),
        (lambda f: f.update({"../escape": b"x"}), "outside it"),
        (lambda f: f.update({"/abs/escape": b"x"}), "outside it"),
    ],
)
def test_a_shipped_entry_that_does_not_check_out_is_not_published(tmp_path: Path, damage, needle) -> None:
    files = shipped_entry(tmp_path)
    damage(files)
    folder = tmp_path / "cache" / "key" / "e0"
    with pytest.raises(RuntimeError, match=needle) as error:
        publish_shipped(files, folder, "e0")
    assert "expert 'e0'" in str(error.value)
    assert not folder.exists()
    assert not (tmp_path / "cache" / "escape").exists() and not Path("/abs/escape").exists()
    assert not [p for p in (tmp_path / "cache").rglob("*") if ".partial-" in p.name]


def test_task_resources() -> None:
    # CPU: the recipe's cpus_per_task, and as many torch threads (whatever the node has)
    assert task_resources("cpu", 1.0, None) == (1.0, 0.0, 1)
    assert task_resources("cpu", 4.0, 1.0) == (4.0, 0.0, 4)
    assert task_resources("cpu", 0.5, None) == (0.5, 0.0, 1)
    # CUDA: one GPU per expert unless gpus_per_task says otherwise (0 would leave the task none)
    assert task_resources("cuda", 2.0, None) == (2.0, 1.0, 2)
    assert task_resources("cuda", 1.0, 0.5) == (1.0, 0.5, 1)
    assert task_resources("cuda", 1.0, 0.0) == (1.0, 1.0, 1)
