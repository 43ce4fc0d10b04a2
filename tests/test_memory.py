"""The memory cap: sizes, the planner's layout under a cap, refusals before any weight is read."""

from __future__ import annotations

import json

import pytest
from conftest import assert_nothing_written, assert_user_error, run_cli, tree_digest, write_recipe

import mergekit_ri as m
from mergekit_ri import engine, memory, reading
from mergekit_ri.errors import UserError
from mergekit_ri.io import sources
from mergekit_ri.synthetic import LlamaShape, make_family

MiB = 2**20
# big enough that a frugal cap must split tensors: the embedding has 32K entries
SHAPE = LlamaShape(vocab=512, hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2)


@pytest.mark.parametrize(
    "text,size",
    [
        ("512MiB", 512 * MiB),
        ("2G", 2 * 2**30),
        ("2g", 2 * 2**30),
        ("1.5GB", 1_500_000_000),
        (" 2 GiB ", 2 * 2**30),
        ("300M", 300 * MiB),
        ("1024", 1024),
        (4096, 4096),
    ],
)
def test_sizes_are_read_in_binary_letters_and_decimal_units(text, size):
    assert memory.parse_memory(text) == size


@pytest.mark.parametrize("text", ["abc", "5 parsecs", "-1G", "1e9", "", "0", 0, "0.0001", True, 1.5])
def test_bad_sizes_are_one_clear_line(text):
    with pytest.raises(UserError) as caught:
        memory.parse_memory(text, "--max-memory")
    assert str(caught.value).startswith("--max-memory: ")
    assert "\n" not in str(caught.value)


def test_merge_options_check_the_size():
    with pytest.raises(UserError, match="max memory: cannot read size 'lots'"):
        m.MergeOptions(max_memory="lots")
    assert m.MergeOptions(max_memory="1G").max_memory == "1G"


@pytest.fixture
def models(tmp_path):
    return make_family(tmp_path / "models", ["a", "b", "c"], shape=SHAPE, dtype="bfloat16", shards=2)


def recipe(tmp_path, models, method: str, name: str = "r.yaml", **extra):
    params = {"density": 0.4} if method in ("ties", "dare_ties") else {}
    return write_recipe(
        tmp_path / name,
        merge_method=method,
        base_model=str(models["base"]),
        models=[{"model": str(models[n]), "parameters": {"weight": 1.0, **params}} for n in "abc"],
        **extra,
    )


def frugal(monkeypatch):
    """Let the planner go down to row chunks and streaming thresholds a tiny model can feel."""
    monkeypatch.setattr(memory, "MIN_CHUNK", 256)
    monkeypatch.setattr(memory, "MIN_STREAM_BYTES", 1024)


@pytest.mark.parametrize(
    "method",
    [
        "task_arithmetic",
        "ties",
        pytest.param("dare_ties", marks=pytest.mark.slow),
        pytest.param("linear", marks=pytest.mark.slow),
    ],
)
def test_a_cap_that_forces_row_chunks_gives_the_same_bytes(tmp_path, models, monkeypatch, method):
    path = recipe(tmp_path, models, method)
    free = m.plan(path).plan.memory()
    frugal(monkeypatch)
    largest = max(t.reference.numel for t in m.plan(path).plan.tasks)
    least = memory.least_memory(m.plan(path).plan)
    cap = least + (free.peak - least) // 4
    capped = m.plan(path, options=m.MergeOptions(max_memory=cap)).plan.memory()
    assert capped.peak <= cap < free.peak
    assert capped.chunk < largest  # the big tensors really are split
    if method in ("ties", "dare_ties"):
        assert capped.streamed > 0
    seen = []
    compute = engine.compute
    monkeypatch.setattr(
        engine, "compute", lambda plan, unit, *a, **k: seen.append(unit) or compute(plan, unit, *a, **k)
    )
    m.merge(path, tmp_path / "capped", options=m.MergeOptions(max_memory=cap, device="cpu"))
    assert any(u.rows is not None or u.streamed for u in seen)
    monkeypatch.undo()
    m.merge(path, tmp_path / "free", options=m.MergeOptions(device="cpu"))
    digest = {
        k.split("/")[-1]: v for k, v in tree_digest(tmp_path / "free").items() if k.endswith(".safetensors")
    }
    again = {
        k.split("/")[-1]: v for k, v in tree_digest(tmp_path / "capped").items() if k.endswith(".safetensors")
    }
    assert digest and digest == again


def test_the_planner_lowers_read_ahead_and_writer_queue_first(tmp_path, models):
    path = recipe(tmp_path, models, "task_arithmetic")
    free = m.plan(path).plan.memory()
    assert (free.depth, free.read_ahead, free.writer_queue) == (
        2,
        reading.PREFETCH_BYTES,
        memory.WRITER_QUEUE,
    )
    tighter = m.plan(path, options=m.MergeOptions(max_memory=free.peak - 1)).plan.memory()
    assert tighter.peak < free.peak
    assert tighter.chunk == free.chunk  # the row blocks stay as they are while overlap can give
    assert (tighter.depth, tighter.writer_queue) < (free.depth, free.writer_queue)


def test_no_read_ahead_reads_each_unit_when_wanted(tmp_path, models):
    path = recipe(tmp_path, models, "task_arithmetic")
    plan = m.plan(path).plan
    units = reading.work_units(plan)
    with sources.TensorReader() as reader:
        order = []
        for unit, raws in reading.stream_inputs(plan, reader, None, 0, units):  # no pool: nothing ahead
            order.append(unit)
            assert len(raws) == 2 and raws[1].shape[0] == 3
    assert order == units


@pytest.mark.parametrize(
    "method,why",
    [
        ("slerp", "slerp merges whole tensors, in fp32"),
        ("ties", "ties holds a row chunk of every input and its threshold search"),
    ],
)
def test_a_cap_too_small_is_refused_before_any_weight_is_read(tmp_path, models, monkeypatch, method, why):
    if method == "slerp":
        path = write_recipe(
            tmp_path / "slerp.yaml",
            merge_method="slerp",
            base_model=str(models["base"]),
            models=[{"model": str(models["a"])}],
            parameters={"t": 0.5},
        )
    else:
        path = recipe(tmp_path, models, method)

    def refuse(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(sources.TensorReader, "read", refuse)
    out = tmp_path / "out"
    line = assert_user_error(
        run_cli("merge", path, "-o", out, "--max-memory", "4KiB"),
        "max_memory 4.0 KiB (--max-memory) is too small",
        "model.embed_tokens.weight",
        "needs at least",
        why,
        "give --max-memory",
    )
    assert_nothing_written(out)
    needed = int(line.split("give --max-memory ")[1].split("MiB")[0])
    assert run_cli("merge", path, "--dry-run", "--max-memory", f"{needed}MiB").code == 0
    assert_user_error(run_cli("merge", path, "--dry-run", "--max-memory", "4KiB"), "too small")


def test_recipe_key_and_option(tmp_path, models):
    path = recipe(tmp_path, models, "ties", max_memory="48MiB")
    report = json.loads(run_cli("merge", path, "--dry-run", "--json").stdout)
    assert report["memory"]["cap"] == 48 * MiB and report["memory"]["cap_source"] == "the recipe's max_memory"
    assert report["peak_memory_estimate"] == report["memory"]["planned_peak"] + memory.RUNTIME_BYTES
    overridden = json.loads(run_cli("merge", path, "--dry-run", "--json", "--max-memory", "1.5GB").stdout)
    assert (
        overridden["memory"]["cap"] == 1_500_000_000 and overridden["memory"]["cap_source"] == "--max-memory"
    )
    api = m.plan(path, options=m.MergeOptions(max_memory=2**30)).summary()["memory"]
    assert api["cap"] == 2**30
    assert_user_error(
        run_cli("merge", recipe(tmp_path, models, "ties", "bad.yaml", max_memory="lots"), "--dry-run"),
        "max_memory",
    )
    assert_user_error(run_cli("merge", path, "--dry-run", "--max-memory", "1e9"), "max memory", "1e9")
    human = run_cli("merge", path, "--dry-run")
    assert "peak memory (planned)" in human.stdout and "cap 48.0 MiB" in human.stdout


def test_default_cap_is_a_share_of_the_machine(tmp_path, models):
    cap, source = memory.default_cap()
    total = memory.machine_memory()
    assert total and cap == int(total * memory.DEFAULT_SHARE) and "machine" in source
    plan = m.plan(recipe(tmp_path, models, "ties")).plan.memory()
    assert plan.cap == cap and plan.peak <= cap


@pytest.mark.slow  # plans two 4096-vocab models
def test_planned_peak_is_flat_in_model_size_at_a_fixed_cap(tmp_path):
    peaks = []
    for layers in (2, 6):
        shape = LlamaShape(vocab=4096, hidden=256, intermediate=512, layers=layers, heads=4, kv_heads=2)
        folders = make_family(tmp_path / f"m{layers}", ["a", "b", "c"], shape=shape, dtype="bfloat16")
        path = write_recipe(
            tmp_path / f"r{layers}.yaml",
            merge_method="ties",
            base_model=str(folders["base"]),
            models=[{"model": str(folders[n]), "parameters": {"density": 0.2}} for n in "abc"],
        )
        peaks.append(m.plan(path, options=m.MergeOptions(max_memory="64MiB")).plan.memory().peak)
    assert peaks[0] == peaks[1] <= 64 * MiB


def test_the_hashers_wait_within_the_room_the_cap_leaves(tmp_path, models):
    """Early reads (--fingerprint-inputs) and early writes (checksums) wait, copied, in at most
    what the cap leaves above the planned peak: the content hash first, whose gaps would cost
    the fingerprint, then the file hash, which reads what it could not hold back at the end."""
    from mergekit_ri.io import contenthash, filehash

    path = recipe(tmp_path, models, "task_arithmetic")
    free = m.plan(path).plan.memory()
    assert (free.content_hash_bytes, free.file_hash_bytes) == (
        contenthash.PENDING_LIMIT,
        filehash.PENDING_LIMIT,
    )
    for room, expected in [
        (0, (0, 0)),
        (5 * memory.MiB, (5 * memory.MiB, 0)),
        (40 * memory.MiB, (32 * memory.MiB, 8 * memory.MiB)),
        (500 * memory.MiB, (32 * memory.MiB, 64 * memory.MiB)),
    ]:
        capped = m.plan(path, options=m.MergeOptions(max_memory=free.peak + room)).plan.memory()
        assert capped.peak == free.peak
        assert (capped.content_hash_bytes, capped.file_hash_bytes) == expected
        assert capped.peak + capped.content_hash_bytes + capped.file_hash_bytes <= free.peak + room
        assert capped.summary()["hash_buffers"] == sum(expected)


@pytest.mark.parametrize(
    "method,params",
    [
        ("ties", {}),
        pytest.param("ties", {"trim_scope": "model"}, marks=pytest.mark.slow),
        ("dare_ties", {}),
    ],
    ids=["ties", "ties-model-trim", "dare_ties"],
)
def test_the_least_cap_merges_ties_by_row_blocks_to_the_same_bytes(
    tmp_path, models, monkeypatch, method, params
):
    """At its least cap TIES (and DARE-TIES) holds no merged tensor whole: each big tensor's
    thresholds and election balance are found from row chunks first, then its rows are merged
    block by block like an elementwise method's — and the checkpoint is the uncapped one's."""
    path = recipe(tmp_path, models, method, **({"parameters": params} if params else {}))
    m.merge(path, tmp_path / "free", options=m.MergeOptions(device="cpu"))
    frugal(monkeypatch)
    plan = m.plan(path).plan
    layouts = memory._layouts  # the least of the layouts that hold every result whole:
    monkeypatch.setattr(memory, "_layouts", lambda *a: (k for k in layouts(*a) if k.block_bytes is None))
    whole = memory.least_memory(plan)
    monkeypatch.setattr(memory, "_layouts", lambda *a: (k for k in layouts(*a) if k.block_bytes is not None))
    least = memory.least_memory(plan)  # (with trim_scope: model the pre-pass needs more than either)
    assert least < whole or params
    capped = m.plan(path, options=m.MergeOptions(max_memory=least)).plan.memory()
    assert capped.blocked > 0
    seen = []
    compute = engine.compute
    monkeypatch.setattr(
        engine, "compute", lambda plan, unit, *a, **k: seen.append(unit) or compute(plan, unit, *a, **k)
    )
    rows_read = []  # each tensor read by row chunks (the figures pass, or a streamed tensor)
    row_source = engine.RowSource
    monkeypatch.setattr(
        engine,
        "RowSource",
        lambda reader, task, *a, **k: rows_read.append(task.name) or row_source(reader, task, *a, **k),
    )
    m.merge(path, tmp_path / "capped", options=m.MergeOptions(max_memory=least, device="cpu"))
    assert sum(u.stats for u in seen) > 2 * capped.blocked  # several blocks per blocked tensor
    assert len(rows_read) == len(set(rows_read)) == capped.blocked + capped.streamed  # one pass each
    digests = [
        {k.split("/")[-1]: v for k, v in tree_digest(tmp_path / out).items() if k.endswith(".safetensors")}
        for out in ("free", "capped")
    ]
    assert digests[0] and digests[0] == digests[1]
