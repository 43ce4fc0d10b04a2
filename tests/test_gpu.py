"""CPU and GPU give the same merge (skipped without a CUDA GPU).

linear / task_arithmetic: the same bytes. TIES / DARE: the same kept entries (exact thresholds,
counter-based DARE draws) and values equal to fp32 rounding. WUDI and the spectral methods:
equal to solver tolerance. Models are big enough that TIES takes the sampled-band threshold
and that the GPU path takes the fused Triton kernels (and, with RI_MERGE_KERNELS=torch, the
torch kernels on the GPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import read_any, read_checkpoint, run_cli, write_recipe

from mergekit_ri.synthetic import LlamaShape, make_family

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

NAMES = ["a", "b", "c"]
MEDIUM = LlamaShape(vocab=515, hidden=192, intermediate=517, layers=2, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("gpu"), NAMES, shape=MEDIUM, dtype="bfloat16", shards=2)


def merge(tmp_path, family, method, device, name, **fields):
    recipe = {
        "merge_method": method,
        "base_model": str(family["base"]),
        "models": [{"model": str(family[n])} for n in NAMES],
        "out_dtype": "float32",
        "seed": 3,
        **fields,
    }
    path = write_recipe(tmp_path / f"{name}.yaml", **recipe)
    result = run_cli("merge", path, "-o", tmp_path / name, "--quiet", "--device", device)
    assert result.code == 0, result.stderr
    return read_checkpoint(tmp_path / name)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_linear_methods_are_bitwise_equal_on_cpu_and_gpu(tmp_path, family, method):
    params = {} if method == "linear" else {"parameters": {"lambda": 0.4}}
    cpu = merge(tmp_path, family, method, "cpu", "cpu", **params)
    gpu = merge(tmp_path, family, method, "cuda", "gpu", **params)
    for name in cpu:
        assert torch.equal(cpu[name], gpu[name]), name


@pytest.mark.parametrize("kernels", ["auto", "torch"])
@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_sparsifying_methods_keep_the_same_entries_on_cpu_and_gpu(
    tmp_path, family, monkeypatch, method, kernels
):
    monkeypatch.setenv("RI_MERGE_KERNELS", kernels)
    params = {"parameters": {"density": 0.3, "lambda": 0.8}}
    cpu = merge(tmp_path, family, method, "cpu", "cpu", **params)
    gpu = merge(tmp_path, family, method, "cuda", "gpu", **params)
    base = read_any(family["base"])
    for name in cpu:
        changed_cpu = cpu[name] != base[name].float()
        changed_gpu = gpu[name] != base[name].float()
        assert torch.equal(changed_cpu, changed_gpu), name
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_ties_model_scope_thresholds_agree_on_cpu_and_gpu(tmp_path, family):
    params = {"parameters": {"density": 0.25, "trim_scope": "model"}}
    cpu = merge(tmp_path, family, "ties", "cpu", "cpu", **params)
    gpu = merge(tmp_path, family, "ties", "cuda", "gpu", **params)
    for name in cpu:
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("method", ["wudi", "tsv", "iso_c", "iso_cts"])
def test_solver_methods_agree_on_cpu_and_gpu(tmp_path, family, method):
    cpu = merge(tmp_path, family, method, "cpu", "cpu")
    gpu = merge(tmp_path, family, method, "cuda", "gpu")
    for name in cpu:
        torch.testing.assert_close(gpu[name], cpu[name], rtol=2e-3, atol=2e-4, msg=lambda m: f"{name}: {m}")


def test_pinned_reads_land_in_page_locked_memory(family):
    from mergekit_ri.io.sources import TensorReader
    from mergekit_ri.plan import build_plan
    from mergekit_ri.reading import WorkUnit, read_unit
    from mergekit_ri.recipe import parse_recipe

    plan = build_plan(
        parse_recipe(
            {
                "merge_method": "ties",
                "base_model": str(family["base"]),
                "models": [{"model": str(family[n])} for n in NAMES],
            }
        )
    )
    task = next(t for t in plan.tasks if t.merge)
    with TensorReader() as reader:
        raws = read_unit(reader, WorkUnit(task), pin=True)
        plain = read_unit(reader, WorkUnit(task), pin=False)
    assert all(r.is_pinned() for r in raws)
    assert raws[-1].shape == (len(NAMES), *task.shape)
    assert all(torch.equal(a, b) for a, b in zip(raws, plain))


@pytest.mark.parametrize("method", ["slerp", "model_stock"])
def test_whole_tensor_methods_agree_on_cpu_and_gpu(tmp_path, family, method):
    """The angle from `gram64` (batched fp32 blocks, float64 sums) on either device: equal to
    fp32 rounding of the result."""
    fields = {"parameters": {"t": 0.3}, "models": [{"model": str(family["a"])}]} if method == "slerp" else {}
    cpu = merge(tmp_path, family, method, "cpu", "cpu", **fields)
    gpu = merge(tmp_path, family, method, "cuda", "gpu", **fields)
    for name in cpu:
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-6, atol=1e-6, msg=name)


def stage_spy(monkeypatch):
    """The Stager each merge makes, and the threads that waited on one of its events."""
    import threading

    import mergekit_ri.engine as engine
    from mergekit_ri import staging

    made, waiters = [], []
    original = engine.stager_for

    def spy(*args):
        made.append(original(*args))
        return made[-1]

    def synchronize(self, event):
        waiters.append(threading.current_thread().name)
        event.synchronize()

    monkeypatch.setattr(engine, "stager_for", spy)
    monkeypatch.setattr(staging.CudaOps, "synchronize", synchronize)
    return made, waiters


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_the_gpu_pipeline_reuses_pinned_buffers_and_the_merge_loop_never_waits(
    tmp_path, family, monkeypatch, method
):
    """Row blocks (task arithmetic) and row-streamed tensors (TIES) through the staging pools:
    the CPU's bytes / kept entries, every staging buffer page-locked and reused, none made
    outside the planned pools, and (task arithmetic) no event waited for on the merging thread."""
    import mergekit_ri.reading as reading

    monkeypatch.setattr(reading, "CHUNK_ELEMENTS", 5000)
    monkeypatch.setattr(reading, "GPU_CHUNK_FACTOR", 1)
    monkeypatch.setattr(reading, "STREAM_BYTES", 64 * 1024)
    params = {"parameters": {"density": 0.3} if method == "ties" else {"lambda": 0.6}}
    cpu = merge(tmp_path, family, method, "cpu", "cpu", **params)
    made, waiters = stage_spy(monkeypatch)
    gpu = merge(tmp_path, family, method, "cuda", "gpu", **params)
    for name in cpu:
        if method == "task_arithmetic":
            assert torch.equal(cpu[name], gpu[name]), name
        else:
            torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-6, atol=1e-6, msg=name)
    (stage,) = made
    stats = stage.stats()
    assert all(pool["extra"] == 0 for pool in stats.values()), stats
    pools = [stage.results, stage.chunks if method == "ties" else stage.inputs]
    for pool in pools:
        assert pool.lent > pool.slots, pool.stats()
        assert all(b is None or b.is_pinned() for b in pool._buffers)
    if method == "task_arithmetic":
        assert "MainThread" not in waiters


def test_a_cpu_merge_on_a_gpu_machine_leaves_cuda_uninitialised(tmp_path, family):
    import subprocess
    import sys

    recipe = write_recipe(
        tmp_path / "ta.yaml",
        merge_method="task_arithmetic",
        base_model=str(family["base"]),
        models=[{"model": str(family[n])} for n in NAMES],
    )
    code = (
        "import sys, torch, mergekit_ri as m; "
        f"m.merge({str(recipe)!r}, {str(tmp_path / 'out')!r}, options=m.MergeOptions(device='cpu')); "
        "sys.exit(3 if torch.cuda.is_initialized() else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
