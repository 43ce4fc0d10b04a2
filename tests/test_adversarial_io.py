"""Hostile and unlucky inputs and outputs, as an adversarial user would try them.

Every case asserts the contract: exit 2 with one line naming the file/tensor/field, no
traceback, nothing written, and every input's bytes unchanged (`tree_digest`).
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    TINY,
    assert_nothing_written,
    assert_user_error,
    read_checkpoint,
    run_cli,
    tree_digest,
    write_recipe,
)
from safetensors.torch import save_file

from mergekit_ri.io.output import OutputLock
from mergekit_ri.synthetic import make_family


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    return make_family(tmp_path / "models", ["a", "b"], shape=TINY, dtype="bfloat16")


def recipe(tmp_path: Path, models: dict[str, Path], **extra) -> Path:
    fields = {
        "merge_method": "task_arithmetic",
        "base_model": str(models["base"]),
        "models": [{"model": str(models["a"])}, {"model": str(models["b"])}],
        **extra,
    }
    return write_recipe(tmp_path / "recipe.yaml", **fields)


def refused(
    tmp_path: Path,
    models: dict[str, Path],
    *needles: str,
    out: Path | None = None,
    args: tuple[str, ...] = (),
    **extra,
) -> str:
    """Run a merge that must be refused; check the whole contract; return the error line."""
    out = out or tmp_path / "out"
    before = tree_digest(*models.values())
    existed = os.path.exists(out)
    line = assert_user_error(run_cli("merge", recipe(tmp_path, models, **extra), "-o", out, *args), *needles)
    if not existed:
        assert_nothing_written(out)
    assert tree_digest(*models.values()) == before
    return line


# --- damaged checkpoints -------------------------------------------------------------------------


def rewrite_header(file: Path, edit, length: int | None = None) -> None:
    """Replace a safetensors file's JSON header by `edit(header)` (bytes or dict), data kept."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    new = edit(header)
    body = new if isinstance(new, bytes) else json.dumps(new).encode()
    file.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + raw[8 + n :])


def expert_file(models: dict[str, Path]) -> Path:
    return models["a"] / "model.safetensors"


def first_two(header: dict) -> tuple[str, str]:
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return names[0], names[1]


def shift(delta: int):
    def edit(header: dict) -> dict:
        name = first_two(header)[1]
        start, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [start + delta, end + delta]
        return header

    return edit


def negative_start(header: dict) -> dict:
    name = first_two(header)[0]
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start - 64, end - 64]
    return header


def typed(value):
    def edit(header: dict) -> dict:
        header[first_two(header)[0]]["data_offsets"] = value
        return header

    return edit


def wrong_shape(header: dict) -> dict:
    name = first_two(header)[0]
    header[name]["shape"] = [d + 1 for d in header[name]["shape"]]
    return header


def duplicate_key(header: dict) -> bytes:
    name = first_two(header)[0]
    text = json.dumps(header)
    return text[:-1].encode() + b', "' + name.encode() + b'": ' + json.dumps(header[name]).encode() + b"}"


def nested(header: dict) -> bytes:
    return b"[" * 100_000 + b"]" * 100_000


DAMAGE = {
    "negative offsets": (negative_start, "data_offsets"),
    "overlapping offsets": (shift(-2), "overlaps"),
    "gap between tensors": (shift(+2), "gap"),
    "offsets as strings": (typed(["0", "8"]), "data_offsets"),
    "offsets as floats": (typed([0.0, 8.5]), "data_offsets"),
    "three offsets": (typed([0, 8, 16]), "data_offsets"),
    "shape that does not fit its bytes": (wrong_shape, "does not fit"),
    "a key twice": (duplicate_key, "twice"),
    "not UTF-8": (lambda h: b'{"\xff\xfe": 1}', "corrupt safetensors header"),
    "nested 100k deep": (nested, "corrupt safetensors header"),
    "a list, not an object": (lambda h: b"[]", "corrupt safetensors header"),
    "unknown dtype": (
        lambda h: {k: ({**v, "dtype": "Q4"} if k != "__metadata__" else v) for k, v in h.items()},
        "dtype Q4",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_header_is_refused(tmp_path: Path, models, case: str) -> None:
    edit, needle = DAMAGE[case]
    rewrite_header(expert_file(models), edit)
    line = refused(tmp_path, models, needle, str(expert_file(models)))
    assert "error:" in line


def test_lying_header_length(tmp_path: Path, models) -> None:
    rewrite_header(expert_file(models), lambda h: h, length=10**9)
    refused(tmp_path, models, "header length", str(expert_file(models)))


def test_truncated_file(tmp_path: Path, models) -> None:
    file = expert_file(models)
    file.write_bytes(file.read_bytes()[:-100])
    refused(tmp_path, models, "truncated", str(file))


def test_trailing_bytes_no_header_covers(tmp_path: Path, models) -> None:
    file = expert_file(models)
    file.write_bytes(file.read_bytes() + b"\0" * 64)
    refused(tmp_path, models, "64 bytes after the last tensor", str(file))


def test_empty_and_tiny_files(tmp_path: Path, models) -> None:
    expert_file(models).write_bytes(b"")
    refused(tmp_path, models, "shorter than 8 bytes")


# --- indexes: path traversal and mistyped fields -------------------------------------------------


def sharded(tmp_path: Path) -> dict[str, Path]:
    return make_family(tmp_path / "sharded", ["a", "b"], shape=TINY, dtype="bfloat16", shards=2)


def edit_index(folder: Path, edit) -> Path:
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps(edit(json.loads(index.read_text()))))
    return index


@pytest.mark.parametrize(
    "target",
    [
        "../base/model-00001-of-00002.safetensors",
        "/etc/passwd",
        "sub/../../base/model-00001-of-00002.safetensors",
    ],
)
def test_index_cannot_reach_outside_the_model_folder(tmp_path: Path, target: str) -> None:
    models = sharded(tmp_path)

    def edit(index: dict) -> dict:
        name = next(iter(index["weight_map"]))
        index["weight_map"][name] = target
        return index

    edit_index(models["a"], edit)
    refused(tmp_path, models, "outside", "model.safetensors.index.json")


@pytest.mark.parametrize("weight_map", [[], "x", {"w": 3}, {}, None])
def test_mistyped_index(tmp_path: Path, weight_map) -> None:
    models = sharded(tmp_path)
    edit_index(models["a"], lambda index: {**index, "weight_map": weight_map})
    refused(tmp_path, models, "weight_map", "model.safetensors.index.json")


def test_index_that_is_not_utf8(tmp_path: Path) -> None:
    models = sharded(tmp_path)
    (models["a"] / "model.safetensors.index.json").write_bytes(b'{"weight_map": "\xff"}')
    refused(tmp_path, models, "UTF-8", "model.safetensors.index.json")


# --- config.json, tokenizer_source: checked with the plan ------------------------------------------


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"[1, 2]", "JSON object"),
        (b"\xff\xfe{}", "UTF-8"),
        (b"{" * 50_000, "config.json"),
        (b'{"a": 1, "a": 2}', "twice"),
    ],
)
def test_bad_base_config(tmp_path: Path, models, content: bytes, needle: str) -> None:
    (models["base"] / "config.json").write_bytes(content)
    refused(tmp_path, models, needle, "config.json")


def test_bad_config_fails_the_dry_run(tmp_path: Path, models) -> None:
    (models["base"] / "config.json").write_text("[]")
    assert_user_error(
        run_cli("merge", recipe(tmp_path, models), "-o", tmp_path / "out", "--dry-run"), "config.json"
    )


def test_unknown_tokenizer_source_fails_before_any_weight(tmp_path: Path, models) -> None:
    assert_user_error(
        run_cli(
            "merge", recipe(tmp_path, models, tokenizer_source="nope"), "-o", tmp_path / "o", "--dry-run"
        ),
        "tokenizer_source 'nope'",
    )
    refused(tmp_path, models, "tokenizer_source", tokenizer_source="nope")


# --- non-finite weights ----------------------------------------------------------------------------


def poison(folder: Path, name: str, value: float) -> None:
    file = folder / "model.safetensors"
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
        metadata = f.metadata()
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[5] = value
    save_file(tensors, file, metadata)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "linear"])
def test_nonfinite_expert_weights_stop_the_merge(tmp_path: Path, models, value: float, method: str) -> None:
    name = "model.layers.1.mlp.up_proj.weight"
    poison(models["b"], name, value)
    no_base = {"base_model": None} if method == "linear" else {}  # linear would merge a base as a model
    refused(tmp_path, models, name, "NaN or Inf", str(models["b"]), merge_method=method, **no_base)


@pytest.mark.parametrize("kernels", ["auto", "torch"])
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties"])
def test_nonfinite_found_in_row_blocks_and_streamed_tensors(
    tmp_path: Path, models, monkeypatch, kernels: str, method: str
) -> None:
    """Big tensors are merged by row blocks (element-wise methods) or read by row chunks (TIES):
    the C kernel's check and the torch one both see every chunk, wherever the bad entry is."""
    import mergekit_ri.reading as reading

    monkeypatch.setenv("RI_MERGE_KERNELS", kernels)
    monkeypatch.setattr(reading, "CHUNK_ELEMENTS", 50)
    name = "model.layers.2.mlp.down_proj.weight"
    poison(models["b"], name, float("inf"))
    refused(tmp_path, models, name, "NaN or Inf", "first at flat index 5", merge_method=method)


@pytest.mark.parametrize("method", ["tsv", "wudi"])
def test_nonfinite_found_by_the_spectral_methods(tmp_path: Path, models, method: str) -> None:
    name = "model.layers.0.mlp.gate_proj.weight"
    poison(models["a"], name, float("nan"))
    refused(tmp_path, models, name, "NaN or Inf", merge_method=method)


def test_nonfinite_base_weights_stop_the_merge(tmp_path: Path, models) -> None:
    poison(models["base"], "model.norm.weight", float("nan"))
    refused(tmp_path, models, "model.norm.weight", "NaN or Inf")


def test_nonfinite_weights_merged_on_request_with_a_warning(tmp_path: Path, models) -> None:
    name = "model.layers.0.self_attn.q_proj.weight"
    poison(models["a"], name, float("nan"))
    out = tmp_path / "out"
    result = run_cli("merge", recipe(tmp_path, models, on_nonfinite="warn"), "-o", out)
    assert result.code == 0, result.stderr
    assert f"'{name}' holds NaN or Inf" in result.stderr
    assert torch.isnan(read_checkpoint(out)[name]).any()


# --- things that are not regular files ---------------------------------------------------------------


def run_subprocess(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mergekit_ri.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("where", ["model path", pytest.param("shard in folder", marks=pytest.mark.slow)])
def test_fifo_is_refused_without_hanging(tmp_path: Path, models, where: str) -> None:
    fifo = tmp_path / "pipe.safetensors" if where == "model path" else expert_file(models)
    if fifo.exists():
        fifo.unlink()
    os.mkfifo(fifo)
    fields = {
        "merge_method": "task_arithmetic",
        "base_model": str(models["base"]),
        "models": [
            {"model": str(fifo if where == "model path" else models["a"])},
            {"model": str(models["b"])},
        ],
    }
    result = run_subprocess(write_recipe(tmp_path / "r.yaml", **fields), "-o", tmp_path / "out", timeout=60)
    assert result.returncode == 2, result.stderr
    assert "FIFO" in result.stderr and str(fifo) in result.stderr
    assert_nothing_written(tmp_path / "out")


class Payload:
    """Unpickling this would create a file: proof that pickled checkpoints are never loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_checkpoint_is_never_unpickled(tmp_path: Path, models) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    (evil / "config.json").write_text((models["a"] / "config.json").read_text())
    fields = {
        "merge_method": "task_arithmetic",
        "base_model": str(models["base"]),
        "models": [{"model": str(evil)}, {"model": str(models["b"])}],
    }
    assert_user_error(
        run_cli("merge", write_recipe(tmp_path / "r.yaml", **fields), "-o", tmp_path / "out"),
        str(evil / "pytorch_model.bin"),
        "refused",
    )
    assert not marker.exists()


# --- hostile output targets ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["expert", "inside expert", "base", "above the models"])
def test_output_never_touches_an_input(tmp_path: Path, models, where: str) -> None:
    out = {
        "expert": models["a"],
        "inside expert": models["a"] / "sub",
        "base": models["base"],
        "above the models": models["a"].parent,
    }[where]
    before = tree_digest(*models.values())
    result = run_cli("merge", recipe(tmp_path, models), "-o", out, "--force")
    assert_user_error(result, str(out))
    assert tree_digest(*models.values()) == before
    assert not (models["a"] / "sub").exists()


def test_force_never_deletes_the_real_files_behind_symlinked_shards(tmp_path: Path, models) -> None:
    """The Hub cache's layout: snapshots/<rev>/model.safetensors → ../../blobs/<hash>."""
    blobs = tmp_path / "hub" / "blobs"
    snapshot = tmp_path / "hub" / "snapshots" / "rev"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in models["a"].iterdir():
        real = blobs / f"blob-{file.name}"
        real.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(os.path.relpath(real, snapshot))
    models = {**models, "a": snapshot}
    before = tree_digest(blobs)
    refused(tmp_path, models, "contains input", out=blobs, args=("--force",))
    assert tree_digest(blobs) == before
    refused(tmp_path, models, "contains input", out=tmp_path / "hub", args=("--force",))
    assert tree_digest(blobs) == before


def test_output_that_is_a_file(tmp_path: Path, models) -> None:
    out = tmp_path / "out"
    out.write_text("keep me")
    refused(tmp_path, models, "not a folder", out=out, args=("--force",))
    assert out.read_text() == "keep me"


def test_output_name_too_long(tmp_path: Path, models) -> None:
    refused(tmp_path, models, "too long", out=tmp_path / ("x" * 300))


def test_output_name_near_the_limit_works(tmp_path: Path, models) -> None:
    out = tmp_path / ("y" * 250)
    assert run_cli("merge", recipe(tmp_path, models), "-o", out).code == 0
    assert (out / "model.safetensors.index.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if "ri-merge" in p.name] == []


def test_output_locked_by_another_merge(tmp_path: Path, models) -> None:
    out = tmp_path / "out"
    with OutputLock(out):
        line = assert_user_error(
            run_cli("merge", recipe(tmp_path, models), "-o", out), "another ri-merge", str(out)
        )
    assert str(os.getpid()) in line
    assert not out.exists()
    assert run_cli("merge", recipe(tmp_path, models), "-o", out).code == 0


@pytest.mark.slow  # two merges in subprocesses
def test_two_merges_racing_for_one_output(tmp_path: Path, models) -> None:
    """Both start at once: one writes the output, the other is refused; none is renamed away."""
    path = recipe(tmp_path, models)
    out = tmp_path / "out"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "mergekit_ri.cli", str(path), "-o", str(out), "-q"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    assert any("another ri-merge" in err or "not empty" in err for _, err in results), results
    reference = tmp_path / "reference"
    assert run_cli("merge", path, "-o", reference).code == 0
    assert read_checkpoint(out).keys() == read_checkpoint(reference).keys()
    for name, tensor in read_checkpoint(reference).items():
        assert torch.equal(read_checkpoint(out)[name], tensor)
    assert [p.name for p in tmp_path.iterdir() if "ri-merge" in p.name] == []


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_staging_of_a_dead_merge_is_removed(tmp_path: Path, models) -> None:
    out = tmp_path / "out"
    stale = tmp_path / f".out.ri-merge-partial-{dead_pid()}"
    stale.mkdir()
    (stale / "model-00001-of-00001.safetensors").write_bytes(b"\0" * 1000)
    result = run_cli("merge", recipe(tmp_path, models), "-o", out, "--json")
    assert result.code == 0, result.stderr
    assert not stale.exists()
    assert f"removed {stale.name}" in result.stderr


@pytest.mark.slow
def test_killed_merges_leave_nothing_that_looks_complete_and_rerun_cleans_up(tmp_path: Path) -> None:
    models = make_family(tmp_path / "big", ["a", "b", "c"], dtype="bfloat16", shards=2)
    path = recipe(tmp_path, models, merge_method="ties")
    out = tmp_path / "out"
    before = tree_digest(*models.values())
    for delay in (0.5, 1.5, 3.0):
        proc = subprocess.Popen(
            [sys.executable, "-m", "mergekit_ri.cli", str(path), "-o", str(out), "-q", "--force"]
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():  # the merge finished before the kill: then it is whole
            assert (out / "model.safetensors.index.json").is_file()
            assert read_checkpoint(out)
    result = run_cli("merge", path, "-o", out, "--force")
    assert result.code == 0, result.stderr
    assert [p.name for p in tmp_path.iterdir() if "ri-merge" in p.name] == []
    assert read_checkpoint(out)
    assert tree_digest(*models.values()) == before


# --- the machine's doing: full disk, read-only folder -------------------------------------------------


def small_mount(path: Path, options: str) -> None:
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


@pytest.fixture
def mounts(tmp_path: Path):
    made: list[Path] = []
    yield made
    for path in made:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_full_disk(tmp_path: Path, models, mounts) -> None:
    disk = tmp_path / "small"
    small_mount(disk, "size=64k")
    mounts.append(disk)
    line = refused(tmp_path, models, "disk space", out=disk / "out")
    assert str(disk / "out") in line and "GB" in line


def test_read_only_parent(tmp_path: Path, models, mounts) -> None:
    disk = tmp_path / "ro"
    small_mount(disk, "ro,size=1m")
    mounts.append(disk)
    line = refused(tmp_path, models, "Read-only", out=disk / "out")
    assert str(disk / "out") in line and "partial" not in line


def test_disk_filling_during_the_merge_names_the_output(tmp_path: Path, models, mounts, monkeypatch) -> None:
    """Space checked up front can still run out (another writer): the error names -o and the need."""
    disk = tmp_path / "small"
    small_mount(disk, "size=16k")
    mounts.append(disk)
    monkeypatch.setattr("mergekit_ri.engine.check_space", lambda out, needed: None)
    line = refused(tmp_path, models, "no space left", out=disk / "out")
    assert str(disk / "out") in line and "partial" not in line


# --- RI: the experts as given are inputs too, though the merge reads adapted copies ----------------


@pytest.mark.slow
@pytest.mark.parametrize("where", ["expert", "inside expert", "auxiliary data"])
def test_ri_output_never_touches_the_original_experts(tmp_path: Path, where: str, monkeypatch) -> None:
    pytest.importorskip("transformers")
    from helpers import make_classifiers, ri_recipe, vit

    import mergekit_ri.ri.prepare as prepare

    vits = make_classifiers(tmp_path / "vit", vit, [3, 5, 2], drift=0.3)
    aux = tmp_path / "aux"
    aux.mkdir()
    save_file({"inputs": torch.rand(16, 1, 8, 8)}, aux / "data.safetensors")
    path = ri_recipe(tmp_path, vits, aux / "data.safetensors", steps=2, cache_dir=str(tmp_path / "cache"))
    out = {"expert": vits["e1"], "inside expert": vits["e1"] / "merged", "auxiliary data": aux}[where]
    trained = []
    monkeypatch.setattr(prepare, "train_experts", lambda *a, **k: trained.append(1) or {})
    before = tree_digest(*vits.values(), aux)
    assert_user_error(run_cli("merge", path, "-o", out, "--force"), str(out))
    assert tree_digest(*vits.values(), aux) == before
    assert not trained and not (tmp_path / "cache").exists()  # refused before any adaptation


def test_a_refused_output_is_one_line_even_when_the_plan_has_warnings(tmp_path: Path, models) -> None:
    """int8_mask is a mergekit parameter task arithmetic does not use: a plan warning; the refusal
    of the output still comes alone, before any warning is printed."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    refused(tmp_path, models, "not empty", out=out, parameters={"int8_mask": True})
    assert (out / "keep").read_text() == "mine"


def test_no_model_card_is_never_written_rather_than_removed(tmp_path: Path, models) -> None:
    out = tmp_path / "out"
    result = run_cli("merge", recipe(tmp_path, models), out, "--no-write-model-card", "--json")
    assert result.code == 0, result.stderr
    names = {entry["name"] for entry in json.loads(result.stdout)["manifest"]}
    assert "README.md" not in names and "mergekit_config.yml" not in names
    assert not (out / "README.md").exists() and (out / "config.json").exists()
