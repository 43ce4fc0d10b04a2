"""Pickled checkpoints (`pytorch_model*.bin`) as inputs: read through torch's restricted
unpickler, checked from their pickles before any weight is read, merged bit for bit as the same
weights in safetensors; a pickle that asks for code is refused and nothing of it runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import TINY, assert_nothing_written, assert_user_error, read_checkpoint, run_cli, write_recipe
from helpers import save_pickled

from mergekit_ri.synthetic import make_family


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    return make_family(tmp_path / "models", ["a", "b"], shape=TINY, dtype="bfloat16")


def recipe(tmp_path: Path, base: Path, experts: list[Path], method: str = "ties", name: str = "r") -> Path:
    fields = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(e), "parameters": {"weight": 0.5, "density": 0.6}} for e in experts],
    }
    return write_recipe(tmp_path / f"{name}.yaml", **fields)


class SystemPayload:
    """Unpickling this runs a shell command that creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class OpenPayload(SystemPayload):
    """Unpickling this opens (creates) a file."""

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("shards", [1, 3])
def test_bin_experts_merge_bit_identical_to_safetensors(tmp_path: Path, models, shards: int) -> None:
    pickled = [save_pickled(tmp_path / f"bin-{n}", models[n], shards) for n in ("a", "b")]
    base_bin = save_pickled(tmp_path / "bin-base", models["base"], shards)
    st = run_cli("merge", recipe(tmp_path, models["base"], [models["a"], models["b"]]), "-o", tmp_path / "st")
    pk = run_cli("merge", recipe(tmp_path, base_bin, pickled, name="pk"), "-o", tmp_path / "pk")
    assert st.code == 0 and pk.code == 0, (st.stderr, pk.stderr)
    expected, got = read_checkpoint(tmp_path / "st"), read_checkpoint(tmp_path / "pk")
    assert set(expected) == set(got)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def test_safetensors_preferred_when_a_folder_has_both(tmp_path: Path, models) -> None:
    marker = tmp_path / "pwned"
    torch.save({"x": SystemPayload(marker)}, models["a"] / "pytorch_model.bin")
    (models["b"] / "training_args.bin").write_bytes(b"not read")
    result = run_cli(
        "merge", recipe(tmp_path, models["base"], [models["a"], models["b"]]), "-o", tmp_path / "o"
    )
    assert result.code == 0, result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("payload", [SystemPayload, OpenPayload])
def test_pickle_asking_for_code_is_refused_and_never_runs(tmp_path: Path, models, payload) -> None:
    marker = tmp_path / "pwned"
    evil = save_pickled(tmp_path / "evil", models["a"])
    tensors = torch.load(evil / "pytorch_model.bin", weights_only=True)
    torch.save({**tensors, "zz": payload(marker)}, evil / "pytorch_model.bin")
    out = tmp_path / "out"
    line = assert_user_error(
        run_cli("merge", recipe(tmp_path, models["base"], [evil, models["b"]]), "-o", out),
        str(evil / "pytorch_model.bin"),
        "refused",
    )
    assert "system" in line or "open" in line, line
    assert not marker.exists()
    assert_nothing_written(out)


def test_bare_pickle_is_refused_without_unpickling(tmp_path: Path, models) -> None:
    import pickle

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "pytorch_model.bin").write_bytes(pickle.dumps(SystemPayload(marker)))
    out = tmp_path / "out"
    assert_user_error(
        run_cli("merge", recipe(tmp_path, models["base"], [evil, models["b"]]), "-o", out),
        str(evil / "pytorch_model.bin"),
        "zip format",
    )
    assert not marker.exists()
    assert_nothing_written(out)


def test_bin_with_a_wrong_shape_is_refused_before_any_merge(tmp_path: Path, models) -> None:
    bad = save_pickled(tmp_path / "bad", models["a"], shards=2)
    index = json.loads((bad / "pytorch_model.bin.index.json").read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    file = bad / index["weight_map"][name]
    tensors = torch.load(file, weights_only=True)
    tensors[name] = tensors[name][:-1].clone()
    torch.save(tensors, file)
    out = tmp_path / "out"
    assert_user_error(
        run_cli("merge", recipe(tmp_path, models["base"], [bad, models["b"]]), "-o", out), name, "shape"
    )
    assert_nothing_written(out)


def test_strided_view_is_refused_with_its_name(tmp_path: Path, models) -> None:
    bad = save_pickled(tmp_path / "bad", models["a"])
    tensors = torch.load(bad / "pytorch_model.bin", weights_only=True)
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name].t().contiguous().t()  # same values, column-major storage
    torch.save(tensors, bad / "pytorch_model.bin")
    out = tmp_path / "out"
    assert_user_error(
        run_cli("merge", recipe(tmp_path, models["base"], [bad, models["b"]]), "-o", out), name, "strided"
    )
    assert_nothing_written(out)


def test_dry_run_says_bin_inputs_are_slower_to_plan(tmp_path: Path, models) -> None:
    pickled = save_pickled(tmp_path / "bin-a", models["a"])
    path = recipe(tmp_path, models["base"], [pickled, models["b"]])
    human = run_cli("merge", path, "-o", tmp_path / "o", "--dry-run")
    assert human.code == 0, human.stderr
    assert "slower to plan" in human.stdout + human.stderr
    report = json.loads(run_cli("merge", path, "-o", tmp_path / "o", "--dry-run", "--json").stdout)
    assert list(report["inputs"]) == ["bin-a"] and "weights_only" in report["inputs"]["bin-a"]
