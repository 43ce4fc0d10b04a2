"""Shared helpers: tiny checkpoints on disk, recipes, CLI invocations, reading outputs back."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from typer.testing import CliRunner

from mergekit_ri.cli import app
from mergekit_ri.synthetic import LlamaShape, make_family

TINY = LlamaShape(vocab=64, hidden=16, intermediate=40, layers=3, heads=2, kv_heads=1)
# odd sizes so that trimming, chunking and shard boundaries are not all round numbers
ODD = LlamaShape(vocab=67, hidden=18, intermediate=37, layers=2, heads=3, kv_heads=1)


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


def run_cli(*args: str | Path) -> CliResult:
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return CliResult(result.exit_code, result.stdout, result.stderr)


def write_recipe(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def read_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder, through the index as transformers would."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(folder / file, "pt") as f:
            for name in f.keys():
                assert index["weight_map"][name] == file
                tensors[name] = f.get_tensor(name)
    assert set(tensors) == set(index["weight_map"])
    return tensors


def read_any(path: Path) -> dict[str, torch.Tensor]:
    if (path / "model.safetensors.index.json").exists():
        return read_checkpoint(path)
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            tensors.update({n: f.get_tensor(n) for n in f.keys()})
    return tensors


@pytest.fixture
def family(tmp_path: Path):
    """A bf16 base and three experts, single-file."""
    return make_family(tmp_path / "models", ["a", "b", "c"], shape=TINY, dtype="bfloat16")


@pytest.fixture
def recipe_for(tmp_path: Path, family):
    def make(method: str, **extra) -> Path:
        fields = {
            "merge_method": method,
            "base_model": str(family["base"]),
            "models": [{"model": str(family[n])} for n in ("a", "b", "c")],
        }
        fields.update(extra)
        return write_recipe(tmp_path / f"{method}.yaml", **fields)

    return make


# --- the bad-input contract (tests/test_adversarial_*.py) ---------------------------------------


def tree_digest(*paths: Path) -> dict[str, str]:
    """sha256 of every regular file under `paths` (symlinks followed): inputs must never change."""
    import hashlib

    digests = {}
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for file in files:
            digests[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return digests


def assert_user_error(result: CliResult, *needles: str) -> str:
    """The contract for bad input: exit 2, one line on stderr naming the thing, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.code == 2, (result.code, result.stdout, result.stderr)
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def assert_nothing_written(out: Path) -> None:
    """No output and no staging leftovers beside it."""
    assert not os.path.exists(out) or not any(out.iterdir()), sorted(out.iterdir())
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.ri-merge-")]
    assert not leftovers, leftovers
