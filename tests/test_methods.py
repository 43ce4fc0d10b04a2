"""Every method, merged through the CLI from files on disk, against the in-memory reference
(`mergekit_ri.methods.reference`, the papers' formulas), for bf16/fp16/fp32 and sharded inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import ODD, TINY, read_any, read_checkpoint, run_cli, write_recipe
from helpers import assert_close, ref_disjoint_merge, ref_linear, ref_task_arithmetic, ref_trim  # noqa: F401

from mergekit_ri.kernels.rng import keep_mask, rng_key
from mergekit_ri.methods import reference
from mergekit_ri.params import interpolate, layer_depths
from mergekit_ri.synthetic import make_family

NAMES = ["a", "b", "c"]


# ---- the reference (mergekit_ri.methods.reference), in the shapes these tests use -------------


def ref_ties(base, experts, weights, densities, lam=1.0):
    return reference.ties(base, torch.stack(experts), weights, densities, lam)


def ref_dare(tau, keep, seed, name, index):
    """Drop with the counter-based generator (tested against a numpy uint32 hash in test_kernels)."""
    return reference.dare_drop(tau, keep, rng_key(seed, name, index))


def load_family(folders):
    base = {k: v.float() for k, v in read_any(folders["base"]).items()}
    experts = [{k: v.float() for k, v in read_any(folders[n]).items()} for n in NAMES]
    return base, experts


def merge_via_cli(tmp_path, folders, method, out_dtype="float32", **fields):
    recipe = {
        "merge_method": method,
        "base_model": str(folders["base"]),
        "models": [{"model": str(folders[n])} for n in NAMES],
        "out_dtype": out_dtype,
        **fields,
    }
    path = write_recipe(tmp_path / "recipe.yaml", **recipe)
    result = run_cli("merge", path, "-o", tmp_path / "out", "--quiet")
    assert result.code == 0, result.stderr
    return read_checkpoint(tmp_path / "out")


# ---- the tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("shards", [1, 3])
def test_task_arithmetic_matches_formula(tmp_path, dtype, shards):
    folders = make_family(tmp_path / "m", NAMES, shape=ODD, dtype=dtype, shards=shards)
    weights = [0.5, 1.0, -0.25]
    merged = merge_via_cli(
        tmp_path,
        folders,
        "task_arithmetic",
        parameters={"lambda": 0.7},
        models=[{"model": str(folders[n]), "parameters": {"weight": w}} for n, w in zip(NAMES, weights)],
    )
    base, experts = load_family(folders)
    assert set(merged) == set(base)
    for name in base:
        assert_close(
            merged[name], ref_task_arithmetic(base[name], [e[name] for e in experts], weights, 0.7), name
        )


def test_linear_matches_model_soup_without_base(tmp_path):
    folders = make_family(tmp_path / "m", NAMES, shape=TINY)
    weights = [1.0, 2.0, 3.0]
    recipe = write_recipe(
        tmp_path / "r.yaml",
        merge_method="linear",
        models=[{"model": str(folders[n]), "parameters": {"weight": w}} for n, w in zip(NAMES, weights)],
        out_dtype="float32",
    )
    assert run_cli("merge", recipe, "-o", tmp_path / "out", "-q").code == 0
    merged = read_checkpoint(tmp_path / "out")
    _, experts = load_family(folders)
    for name in merged:
        assert_close(merged[name], ref_linear([e[name] for e in experts], weights), name)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_ties_matches_paper_rule_with_ties_at_threshold(tmp_path, dtype):
    folders = make_family(tmp_path / "m", NAMES, shape=ODD, dtype=dtype, shards=2)
    densities = [0.2, 0.5, 0.1]
    merged = merge_via_cli(
        tmp_path,
        folders,
        "ties",
        models=[{"model": str(folders[n]), "parameters": {"density": d}} for n, d in zip(NAMES, densities)],
    )
    base, experts = load_family(folders)
    tied_somewhere = False
    for name in base:
        expected = ref_ties(base[name], [e[name] for e in experts], [1.0] * 3, densities)
        assert_close(merged[name], expected, name)
        tau = experts[0][name] - base[name]
        k = int(0.2 * tau.numel())
        if k > 0:
            threshold = torch.sort(tau.abs().flatten(), descending=True).values[k - 1]
            tied_somewhere |= int((tau.abs() >= threshold).sum()) > k
    if dtype == "bfloat16":
        assert tied_somewhere, (
            "bf16 deltas should produce ties at the threshold; the test would not cover them"
        )


def test_ties_weights_lambda_and_no_normalize(tmp_path, family):
    weights, densities = [1.0, 0.5, 2.0], [0.3, 0.3, 0.3]
    merged = merge_via_cli(
        tmp_path,
        family,
        "ties",
        parameters={"lambda": 0.8, "normalize": False, "density": 0.3},
        models=[{"model": str(family[n]), "parameters": {"weight": w}} for n, w in zip(NAMES, weights)],
    )
    base, experts = load_family(family)
    for name in base:
        taus = [ref_trim(e[name] - base[name], d) for e, d in zip(experts, densities)]
        expected = base[name] + 0.8 * ref_disjoint_merge(taus, weights, normalize=False)
        assert_close(merged[name], expected, name)


def test_ties_model_scope_uses_one_threshold_over_the_whole_model(tmp_path, family):
    merged = merge_via_cli(tmp_path, family, "ties", parameters={"density": 0.25, "trim_scope": "model"})
    base, experts = load_family(family)
    names = sorted(base)
    trimmed = []
    for e in experts:
        flat = torch.cat([(e[n] - base[n]).flatten() for n in names])
        k = int(0.25 * flat.numel())
        threshold = torch.sort(flat.abs(), descending=True).values[k - 1]
        trimmed.append(
            {n: torch.where((e[n] - base[n]).abs() >= threshold, e[n] - base[n], 0.0) for n in names}
        )
    per_tensor_differs = False
    for n in names:
        expected = base[n] + ref_disjoint_merge([t[n] for t in trimmed], [1.0] * 3)
        assert_close(merged[n], expected, n)
        per_tensor = ref_ties(base[n], [e[n] for e in experts], [1.0] * 3, [0.25] * 3)
        per_tensor_differs |= not torch.allclose(per_tensor, expected)
    assert per_tensor_differs


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_matches_formula_and_is_reproducible(tmp_path, family, method):
    merged = merge_via_cli(tmp_path, family, method, parameters={"density": 0.4, "lambda": 1.0}, seed=7)
    base, experts = load_family(family)
    for name in base:
        taus = [ref_dare(e[name] - base[name], 0.4, 7, name, i) for i, e in enumerate(experts)]
        expected = base[name] + (
            sum(taus) if method == "dare_linear" else ref_disjoint_merge(taus, [1.0] * 3, normalize=False)
        )
        assert_close(merged[name], expected, name)
    # the masks keep about `density` of the entries
    mask = keep_mask(0, 100_000, 0.4, rng_key(7, "x", 0))
    assert abs(mask.float().mean().item() - 0.4) < 0.01
    # same recipe twice: identical bytes, whatever the read-ahead; another seed: different
    again = tmp_path / "again"
    recipe = tmp_path / "recipe.yaml"
    assert run_cli("merge", recipe, "-o", again, "-q", "--prefetch", "7").code == 0
    for name, tensor in read_checkpoint(again).items():
        assert torch.equal(tensor, merged[name])
    text = recipe.read_text().replace("seed: 7", "seed: 8")
    recipe.write_text(text)
    assert run_cli("merge", recipe, "-o", tmp_path / "seed8", "-q").code == 0
    other = read_checkpoint(tmp_path / "seed8")
    assert not torch.equal(
        other["model.layers.0.mlp.up_proj.weight"], merged["model.layers.0.mlp.up_proj.weight"]
    )


def test_gradients_and_filters_resolve_per_tensor_like_mergekit(tmp_path, family):
    weight = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.25}]
    merged = merge_via_cli(
        tmp_path,
        family,
        "task_arithmetic",
        parameters={"weight": weight},
        models=[
            {"model": str(family["a"])},
            {"model": str(family["b"]), "parameters": {"weight": 2.0}},
            {
                "model": str(family["c"]),
                "parameters": {"weight": [{"filter": "nothing-matches", "value": 9.0}]},
            },
        ],
    )
    base, experts = load_family(family)
    depths = layer_depths(base)
    for name in base:
        if "self_attn" in name:
            shared = interpolate([0.0, 1.0], depths[name])
        elif "mlp" in name:
            shared = 0.25
        else:
            shared = 1.0  # no filter matched: the method's default weight
        weights = [shared, 2.0, shared]  # model c's filter never matches: falls back to the global value
        assert_close(merged[name], ref_task_arithmetic(base[name], [e[name] for e in experts], weights), name)
    assert depths["model.layers.0.self_attn.q_proj.weight"] == 0.0
    assert depths["model.layers.1.self_attn.q_proj.weight"] == 0.5
    assert depths["model.layers.2.self_attn.q_proj.weight"] == 1.0
    assert depths["lm_head.weight"] == 0.0 and depths["model.embed_tokens.weight"] == 0.0


def test_output_dtype_defaults_to_recipe_dtype_then_base(tmp_path, family):
    for dtype, expected in [(None, torch.bfloat16), ("float16", torch.float16)]:
        fields = {
            "merge_method": "task_arithmetic",
            "base_model": str(family["base"]),
            "models": [{"model": str(family["a"])}],
        }
        if dtype:
            fields["dtype"] = dtype
        out = tmp_path / f"out-{dtype}"
        assert run_cli("merge", write_recipe(tmp_path / "r.yaml", **fields), "-o", out, "-q").code == 0
        merged = read_checkpoint(out)
        assert {t.dtype for t in merged.values()} == {expected}


def test_integer_buffers_are_copied_from_the_base(tmp_path):
    from safetensors.torch import save_file

    w = torch.randn(4, 4)
    save_file({"w": w, "position_ids": torch.arange(10)}, tmp_path / "base.safetensors")
    save_file({"w": w + 1, "position_ids": torch.zeros(10, dtype=torch.int64)}, tmp_path / "e.safetensors")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        merge_method="task_arithmetic",
        base_model=str(tmp_path / "base.safetensors"),
        models=[{"model": str(tmp_path / "e.safetensors")}],
    )
    assert run_cli("merge", recipe, "-o", tmp_path / "out", "-q").code == 0
    merged = read_checkpoint(tmp_path / "out")
    assert torch.equal(merged["position_ids"], torch.arange(10))
    assert torch.allclose(merged["w"], w + 1)


@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "dare_linear"])
def test_row_chunked_merge_equals_whole_tensor_merge(tmp_path, monkeypatch, method):
    import mergekit_ri.reading as engine
    from mergekit_ri.methods import get_method

    assert get_method(method).elementwise
    from mergekit_ri.plan import build_plan
    from mergekit_ri.recipe import load_recipe

    folders = make_family(tmp_path / "m", NAMES, shape=ODD, dtype="bfloat16", shards=2)
    params = {"parameters": {"lambda": 0.6}} if method != "linear" else {}
    (tmp_path / "whole").mkdir()
    (tmp_path / "chunked").mkdir()
    whole = merge_via_cli(tmp_path / "whole", folders, method, **params)
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 50)  # blocks of a few rows, some not dividing the row count
    chunked = merge_via_cli(tmp_path / "chunked", folders, method, **params)
    plan = build_plan(load_recipe(tmp_path / "chunked" / "recipe.yaml"))
    assert len(engine.work_units(plan)) > 3 * len(plan.tasks)
    assert set(whole) == set(chunked)
    for name in whole:
        assert torch.equal(whole[name], chunked[name]), name


@pytest.mark.parametrize(
    "method,fields",
    [
        # TIES on 50-entry row chunks takes ~10 s each (a histogram pass per chunk)
        pytest.param("ties", {"parameters": {"density": 0.3}}, marks=pytest.mark.slow),
        pytest.param("ties", {"parameters": {"density": 0.3, "trim_scope": "model"}}, marks=pytest.mark.slow),
        ("dare_ties", {"parameters": {"density": 0.5}}),
    ],
)
def test_huge_tensors_streamed_by_rows_merge_like_whole_tensors(tmp_path, monkeypatch, method, fields):
    """TIES/DARE-TIES read tensors above CHUNK_ELEMENTS row chunk by row chunk (thresholds from a
    row sample + exact band, one majority sign per tensor): the bytes must not change."""
    import mergekit_ri.reading as engine

    folders = make_family(tmp_path / "m", NAMES, shape=ODD, dtype="bfloat16", shards=2)
    (tmp_path / "whole").mkdir()
    (tmp_path / "streamed").mkdir()
    whole = merge_via_cli(tmp_path / "whole", folders, method, **fields)
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 50)
    monkeypatch.setattr(engine.RowSource, "SEGMENTS", 3)
    import mergekit_ri.kernels.blocked as blocked

    monkeypatch.setattr(blocked, "SMALL", 64)  # take the sampled-band path on these small tensors
    monkeypatch.setattr(blocked, "SAMPLE", 40)
    chunks = []
    original = engine.RowSource._read
    monkeypatch.setattr(
        engine.RowSource, "_read", lambda self, a, b: chunks.append((a, b)) or original(self, a, b)
    )
    streamed = merge_via_cli(tmp_path / "streamed", folders, method, **fields)
    assert len(chunks) > 20  # the big tensors really were read by rows
    for name in whole:
        assert torch.equal(whole[name], streamed[name]), name
