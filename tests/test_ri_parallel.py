"""RI's experts adapted in parallel worker processes (`devices: [cpu, cpu]` stands in for GPUs):
the same adapted experts as the sequential run, progress reported, errors raised as UserError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import EXPERTS, make_classifiers, vit
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from mergekit_ri.errors import UserError  # noqa: E402
from mergekit_ri.recipe import parse_recipe  # noqa: E402
from mergekit_ri.ri import prepare, train  # noqa: E402

pytestmark = pytest.mark.slow  # minutes on two cores; `-m 'not slow'` skips it


@pytest.fixture(scope="module")
def vits(tmp_path_factory):
    return make_classifiers(tmp_path_factory.mktemp("vit"), vit, [3, 5, 2], drift=0.3)


def recipe_for(vits, aux, cache: Path, **ri):
    return parse_recipe(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(vits["base"]),
            "models": [{"model": str(vits[e])} for e in EXPERTS],
            "resolve_interference": {
                "auxiliary_data": str(aux),
                "steps": 6,
                "batch_size": 16,
                "lr": 1e-3,
                "cache_dir": str(cache),
                **ri,
            },
        }
    )


def test_parallel_workers_match_the_sequential_run(tmp_path, vits, monkeypatch):
    aux = tmp_path / "aux.safetensors"
    save_file({"inputs": torch.rand(64, 1, 8, 8)}, aux)
    _, sequential = prepare.resolve_interference(
        recipe_for(vits, aux, tmp_path / "seq"), tmp_path, torch.device("cpu")
    )
    assert sequential.devices == ["cpu"] and sorted(sequential.trained) == EXPERTS

    def no_training_here(*args, **kwargs):
        raise AssertionError("the parallel run trained in the main process")

    monkeypatch.setattr(train, "_load", no_training_here)  # spawned workers import the real one
    steps: dict[str, list[int]] = {}

    def report(label: str, total: int):
        assert total == 6
        return lambda step, l1, l2: steps.setdefault(label, []).append(step)

    _, parallel = prepare.resolve_interference(
        recipe_for(vits, aux, tmp_path / "par", devices=["cpu", "cpu"]),
        tmp_path,
        torch.device("cpu"),
        report=report,
    )
    assert parallel.devices == ["cpu", "cpu"] and sorted(parallel.trained) == EXPERTS
    assert steps == {e: list(range(1, 7)) for e in EXPERTS}  # every step of every expert came back
    for e in EXPERTS:
        seq = load_file(Path(sequential.adapted[e]) / "model.safetensors")
        par = load_file(Path(parallel.adapted[e]) / "model.safetensors")
        original = load_file(vits[e] / "model.safetensors")
        assert set(seq) == set(par)
        for name in seq:
            torch.testing.assert_close(par[name], seq[name], rtol=1e-4, atol=1e-5, msg=f"{e} {name}")
        assert not torch.equal(
            seq["vit.encoder.layer.0.output.dense.weight"],
            original["vit.encoder.layer.0.output.dense.weight"],
        )
    # the parallel entries are ordinary cache entries: a sequential merge with the same settings hits them
    _, again = prepare.resolve_interference(
        recipe_for(vits, aux, tmp_path / "par"), tmp_path, torch.device("cpu")
    )
    assert sorted(again.cache_hits) == EXPERTS and again.trained == []


def test_a_workers_user_error_reaches_the_caller(tmp_path, vits):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((8, 8, 3), 9, dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(np.full((40, 40, 3), 7, dtype=np.uint8)).save(images / "b.png")
    (images / "b.png").write_bytes((images / "b.png").read_bytes()[:60])  # decodes only the header
    with pytest.raises(UserError, match="b.png"):
        prepare.resolve_interference(
            recipe_for(vits, images, tmp_path / "cache", devices=["cpu", "cpu"]),
            tmp_path,
            torch.device("cpu"),
        )


@pytest.mark.parametrize("devices, needle", [(["gpu"], "unknown device 'gpu'"), ([], "at least one device")])
def test_bad_devices_are_refused(devices, needle):
    with pytest.raises(UserError, match=needle) as error:
        parse_recipe(
            {
                "merge_method": "ties",
                "base_model": "b",
                "models": [{"model": "a"}],
                "resolve_interference": {"auxiliary_data": "gaussian", "devices": devices},
            }
        )
    assert "resolve_interference.devices" in str(error.value)


def test_one_device_stays_sequential(monkeypatch):
    assert prepare.ri_devices(None, "auto", torch.device("cpu")) == [torch.device("cpu")]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert prepare.ri_devices(None, "cuda:1", torch.device("cuda:1")) == [torch.device("cuda:1")]
    assert prepare.ri_devices(None, "auto", torch.device("cuda")) == [
        torch.device(f"cuda:{i}") for i in range(4)
    ]
    assert prepare.ri_devices(["cpu", "cpu"], "auto", torch.device("cpu")) == [torch.device("cpu")] * 2
