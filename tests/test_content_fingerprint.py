"""Content fingerprints of the inputs in the model card: a hash over the tensor bytes the merge
read, equal to what `mergekit_ri.content_fingerprint` and docs/guarantees.md's script compute
from the files alone; the header fingerprint, labelled as such, where the merge did not read
every tensor of an input."""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

import pytest
from conftest import write_recipe

import mergekit_ri as m
from mergekit_ri.io.contenthash import ReadHashes
from mergekit_ri.io.sources import TensorRef
from mergekit_ri.synthetic import LlamaShape, make_family

ROOT = Path(__file__).resolve().parents[1]
SHAPE = LlamaShape(vocab=256, hidden=32, intermediate=80, layers=2, heads=4, kv_heads=2)


def card_fingerprints(out: Path) -> dict[str, str]:
    """The card's fingerprint column by role: 'content <hex>' or 'header only <hex>'."""
    rows = re.findall(
        r"^\| (\w+) \| `[^|]*` \| \w+ \| (content|header only) `(\w+)` \|$",
        (out / "README.md").read_text(),
        re.M,
    )
    return {role: f"{kind} {value}" for role, kind, value in rows}


def docs_fingerprint():
    """docs/guarantees.md's stand-alone script, as a function."""
    text = (ROOT / "docs" / "guarantees.md").read_text()
    block = re.search(r"^```python\n(# content fingerprint.*?)^```", text, flags=re.S | re.M)
    assert block, "docs/guarantees.md has no content fingerprint script"
    namespace: dict = {}
    exec(block.group(1), namespace)
    return namespace["content_fingerprint"]


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    return make_family(tmp_path / "models", ["a", "b"], shape=SHAPE, dtype="bfloat16", shards=2)


@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_card_lists_content_fingerprints_anyone_can_recompute(tmp_path, models, method, rows, monkeypatch):
    """Whole tensors, and (`rows`) tensors read as row blocks on two reader threads or, for TIES,
    as row chunks after a row sample: the same fingerprints."""
    if rows:
        import mergekit_ri.kernels.blocked as blocked
        import mergekit_ri.reading as reading

        monkeypatch.setattr(reading, "CHUNK_ELEMENTS", 50)
        monkeypatch.setattr(reading.RowSource, "SEGMENTS", 3)
        monkeypatch.setattr(blocked, "SMALL", 64)
        monkeypatch.setattr(blocked, "SAMPLE", 40)
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        merge_method=method,
        base_model=str(models["base"]),
        models=[{"model": str(models[n]), "parameters": {"weight": 0.5, "density": 0.5}} for n in "ab"],
    )
    m.merge(recipe, tmp_path / "out", options=m.MergeOptions(checksums=False, fingerprint_inputs=True))
    card = card_fingerprints(tmp_path / "out")
    recompute = docs_fingerprint()
    assert len(card) == 3
    for folder in models.values():
        expected = m.content_fingerprint(folder)
        assert recompute(folder) == expected
        assert f"content {expected}" in card.values()
    # the fingerprint follows the weights, not only the layout
    assert len(set(card.values())) == 3


def test_a_merge_that_does_not_read_an_input_whole_says_header_only(tmp_path, models):
    """A sliced recipe reads one layer of two: no content fingerprint is claimed."""
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        merge_method="passthrough",
        slices=[{"sources": [{"model": str(models["a"]), "layer_range": [0, 1]}]}],
    )
    m.merge(recipe, tmp_path / "out", options=m.MergeOptions(checksums=False, fingerprint_inputs=True))
    card = card_fingerprints(tmp_path / "out")
    assert list(card.values()) and all(v.startswith("header only ") for v in card.values())


def test_without_the_option_inputs_are_listed_by_header(tmp_path, models):
    """Hashing the inputs costs a sha256 pass over them: only when asked for."""
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        merge_method="task_arithmetic",
        base_model=str(models["base"]),
        models=[{"model": str(models[n]), "parameters": {"weight": 0.5}} for n in "ab"],
    )
    m.merge(recipe, tmp_path / "out", options=m.MergeOptions(checksums=False))
    card = card_fingerprints(tmp_path / "out")
    assert len(card) == 3 and all(v.startswith("header only ") for v in card.values())


def test_read_hashes_take_bytes_in_order_whatever_the_reads():
    rng = random.Random(5)
    data = rng.randbytes(4096)
    ref = TensorRef(Path("/nonexistent"), "U8", (4096,), 100, 4196, "w")
    hashes = ReadHashes(limit=0)
    hashes(ref, 1000, memoryview(data)[1000:2000])  # ahead, no room to wait: dropped
    hashes(ref, 0, memoryview(data)[0:1500])
    hashes(ref, 0, memoryview(data)[0:500])  # a re-read of hashed bytes: skipped
    assert hashes.digest(ref) is None  # [1500, 4096) still unread
    hashes(ref, 1000, memoryview(data)[1000:4096])  # overlaps what is hashed: the rest is taken
    assert hashes.digest(ref) == hashlib.sha256(data).digest()

    waiting = ReadHashes()
    pieces = [(i, min(i + 300, 4096)) for i in range(0, 4096, 300)]
    rng.shuffle(pieces)
    for start, end in pieces:
        waiting(ref, start, memoryview(data)[start:end])
    assert waiting.digest(ref) == hashlib.sha256(data).digest()
