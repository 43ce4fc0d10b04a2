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
