"""Output files hashed as they are written (`io.filehash`): the manifest's sha256 equals
hashlib's over the finished files, whatever order the writes came in, and a merge whose tensors
came in order reads none of its shards back."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
from conftest import write_recipe

import mergekit_ri as m
from mergekit_ri import engine
from mergekit_ri.io import filehash, manifest
from mergekit_ri.synthetic import LlamaShape, make_family

SHAPE = LlamaShape(vocab=256, hidden=32, intermediate=80, layers=2, heads=4, kv_heads=2)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_pieces(
    path: Path, data: bytes, pieces: list[tuple[int, int]], hashes: filehash.WriteHashes
) -> None:
    with open(path, "r+b") as f:
        for start, end in pieces:
            f.seek(start)
            f.write(data[start:end])
            hashes.update(0, start, memoryview(data)[start:end])


def cut(size: int, rng: random.Random) -> list[tuple[int, int]]:
    edges = sorted({0, size, *rng.sample(range(1, size), 40)})
    return list(zip(edges, edges[1:]))


@pytest.mark.parametrize("limit", [0, 1000, None])
@pytest.mark.parametrize("order", ["in order", "shuffled", "reversed"])
def test_digest_equals_hashlib_whatever_the_order(tmp_path, order, limit):
    rng = random.Random(hash((order, limit)) & 0xFFFF)
    data = rng.randbytes(20_000)
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(len(data)))
    pieces = cut(len(data), rng)
    if order == "shuffled":
        rng.shuffle(pieces)
    elif order == "reversed":
        pieces.reverse()
    hashes = filehash.WriteHashes([(path, len(data))], limit=limit)
    write_pieces(path, data, pieces, hashes)
    assert hashes.digests() == {path: hashlib.sha256(data).hexdigest()}
    if order == "in order" or limit is None:  # everything was hashed from the writes: nothing read
        assert hashes.read_back == 0
    if order == "reversed" and limit == 0:  # nothing could wait: all but the first piece read back
        assert hashes.read_back == len(data) - pieces[-1][1] + pieces[-1][0]


def test_ranges_already_on_disk_are_read_when_reached(tmp_path):
    """A resumed merge's finished units: in the file before the writer opened it, read back in
    their turn, so that the writes after them still hash in order."""
    rng = random.Random(3)
    data = rng.randbytes(10_000)
    path = tmp_path / "f.bin"
    path.write_bytes(data[:3000] + bytes(7000))
    hashes = filehash.WriteHashes([(path, len(data))], limit=0)
    hashes.on_disk(0, 0, 3000)
    assert hashes.read_back == 3000
    with open(path, "r+b") as f:
        f.seek(6000)
        f.write(data[6000:])
    hashes.on_disk(0, 6000, 10_000)  # kept later in the file
    write_pieces(path, data, [(3000, 4500), (4500, 6000)], hashes)
    assert hashes.read_back == 7000
    assert hashes.digests() == {path: hashlib.sha256(data).hexdigest()}


def test_a_short_file_is_an_error_not_a_wrong_digest(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 10)
    hashes = filehash.WriteHashes([(path, 20)])
    with pytest.raises(OSError, match="short"):
        hashes.digests()


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    models = make_family(tmp_path / "models", ["a", "b"], shape=SHAPE, dtype="bfloat16")
    return write_recipe(
        tmp_path / "recipe.yaml",
        merge_method="task_arithmetic",
        base_model=str(models["base"]),
        models=[{"model": str(models[n]), "parameters": {"weight": 0.5}} for n in "ab"],
        out_shard_size="60KB",
    )


def merged_files(
    recipe: Path, out: Path, monkeypatch, max_memory: int | None = None
) -> tuple[dict[str, str], list[str]]:
    """The manifest's sha256 per file, and the files the manifest hashed by reading them."""
    read: list[str] = []
    original = manifest.file_sha256

    def reading(path: Path) -> str:
        read.append(path.name)
        return original(path)

    monkeypatch.setattr(manifest, "file_sha256", reading)
    options = m.MergeOptions(checksums=True, unit_size=16_384, max_memory=max_memory)
    result = m.merge(recipe, out, options=options)
    assert {r.name: r.sha256 for r in result.files} == {
        p.relative_to(out).as_posix(): sha256(p) for p in out.rglob("*") if p.is_file()
    }
    return {r.name: r.sha256 for r in result.files}, read


def test_merge_manifest_hashes_shards_as_written(tmp_path, recipe, monkeypatch):
    digests, read = merged_files(recipe, tmp_path / "out", monkeypatch)
    shards = [name for name in digests if name.startswith("model-")]
    assert len(shards) > 1
    assert not set(shards) & set(read)  # hashed while written, not read back
    assert "config.json" in read  # the small side files are


@pytest.mark.parametrize("room", ["none", "default"])
def test_merge_written_out_of_order(tmp_path, recipe, monkeypatch, room):
    """Units written last to first: with room to wait the digests still need no read; with a
    --max-memory that leaves nothing above the planned peak (the hashers wait within the cap),
    the shards are read back at the end; either way the same digests."""
    reference, _ = merged_files(recipe, tmp_path / "reference", monkeypatch)
    monkeypatch.setattr(engine, "unit_tasks", lambda plan, units: [t for t in reversed(plan.tasks)])
    cap = None
    if room == "none":
        options = m.MergeOptions(unit_size=16_384)
        cap = m.plan(recipe, options=options).plan.memory().peak
    reads: list[int] = []
    digests = filehash.WriteHashes.digests

    def counted(self: filehash.WriteHashes) -> dict[Path, str]:
        out = digests(self)
        reads.append(self.read_back)
        return out

    monkeypatch.setattr(filehash.WriteHashes, "digests", counted)
    out, _ = merged_files(recipe, tmp_path / "out", monkeypatch, max_memory=cap)
    assert out == reference
    assert (reads[0] > 0) == (room == "none")
