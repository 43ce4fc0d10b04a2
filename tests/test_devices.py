"""`--devices`: work units spread over several local devices, one worker process each (tested
with CPU workers here; the GPU path is the same code with `cuda:N` names)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_nothing_written, assert_user_error, run_cli, write_recipe

from mergekit_ri import engine
from mergekit_ri.synthetic import LlamaShape, make_family

SHAPE = LlamaShape(vocab=512, hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture
def path(tmp_path: Path) -> Path:
    models = make_family(tmp_path / "models", ["a", "b"], shape=SHAPE, dtype="bfloat16", shards=2)
    return write_recipe(
        tmp_path / "recipe.yaml",
        merge_method="dare_ties",
        base_model=str(models["base"]),
        models=[{"model": str(models[n]), "parameters": {"weight": 0.7, "density": 0.4}} for n in "ab"],
        out_shard_size="100KB",
    )


@pytest.mark.slow
def test_two_cpu_workers_write_the_same_bytes(tmp_path: Path, path: Path, monkeypatch) -> None:
    single = run_cli(
        "merge", path, "-o", tmp_path / "single", "--unit-size", "16KiB", "-q", "--fingerprint-inputs"
    )
    assert single.code == 0

    def not_here(*args: object, **kwargs: object) -> None:
        raise AssertionError("a unit was computed in the driver")

    monkeypatch.setattr(engine, "merge_tasks", not_here)  # the workers are other processes
    result = run_cli(
        "merge",
        path,
        "-o",
        tmp_path / "two",
        "--unit-size",
        "16KiB",
        "--devices",
        "cpu,cpu",
        "--json",
        "--fingerprint-inputs",
    )
    assert result.code == 0, result.stderr
    assert len(json.loads(result.stdout)["units"]["computed"]) > 4
    assert folder_bytes(tmp_path / "two") == folder_bytes(tmp_path / "single")
    assert "| content `" in (tmp_path / "two" / "README.md").read_text()  # digests from the workers


@pytest.mark.parametrize(
    ("devices", "needle"),
    [
        ("cpu,cuda:0", "cpu and cuda mixed"),
        ("cpu,,cpu", "comma-separated"),
        ("tpu", "unknown device 'tpu'"),
        ("cuda:7", "cuda:7"),
    ],
)
def test_bad_device_lists(tmp_path: Path, path: Path, devices: str, needle: str) -> None:
    out = tmp_path / "out"
    assert_user_error(run_cli("merge", path, "-o", out, "--devices", devices), needle)
    assert_nothing_written(out)


def test_devices_and_ray_together_are_refused(tmp_path: Path, path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli("merge", path, "-o", out, "--devices", "cpu,cpu", "--ray", "local")
    assert_user_error(result, "--devices", "--ray")
    assert_nothing_written(out)
