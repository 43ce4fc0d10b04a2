"""mergekit's methods (slerp, nuslerp, multislerp, karcher, model_stock, passthrough, nearswap,
arcee_fusion, breadcrumbs(_ties), della(_linear), sce, ram, ramplus_tl), merged through the CLI from files on disk,
against references written here from the papers' formulas or mergekit's documented rule; a few
values checked by hand; and the recipes these methods refuse (one line, exit 2)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    TINY,
    assert_nothing_written,
    assert_user_error,
    read_any,
    read_checkpoint,
    run_cli,
    write_recipe,
)

from mergekit_ri.kernels.rng import hash_counter, rng_key
from mergekit_ri.methods import TensorContext, TensorParams, reference
from mergekit_ri.methods.ram import ram, ramplus_tl
from mergekit_ri.methods.slerp import slerp_tensors
from mergekit_ri.methods.sparsify import breadcrumbs_mask, della_drop
from mergekit_ri.methods.spherical import karcher_tensors
from mergekit_ri.methods.stock import model_stock
from mergekit_ri.params import interpolate, layer_depths
from mergekit_ri.synthetic import make_family

NAMES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """A bf16 base and three experts (task vectors ~25 % of the weights: slerp's angles are wide
    for matrices, nearly 0 for norms, so both of its branches run)."""
    root = tmp_path_factory.mktemp("family")
    folders = make_family(root, NAMES, shape=TINY, dtype="bfloat16")
    tensors = {key: {n: t.float() for n, t in read_any(path).items()} for key, path in folders.items()}
    return folders, tensors


def merge(tmp_path, fam, method, experts=NAMES, base=True, per_model=None, **fields):
    """Merge through the CLI into fp32; returns the merged tensors."""
    folders, _ = fam
    per_model = per_model or {}
    recipe = {
        "merge_method": method,
        "out_dtype": "float32",
        "models": entries(folders, experts, per_model),
        **fields,
    }
    if base:
        recipe["base_model"] = str(folders["base"])
    path = write_recipe(tmp_path / f"{method}.yaml", **recipe)
    result = run_cli("merge", path, "-o", tmp_path / "out", "--quiet")
    assert result.code == 0, result.stderr
    return read_checkpoint(tmp_path / "out")


def entries(folders, names, per_model):
    return [
        {"model": str(folders[n]), **({"parameters": per_model[n]} if n in per_model else {})} for n in names
    ]


def check(merged, expected_fn, tensors, names=None, atol=1e-6):
    base = tensors["base"]
    assert set(merged) == set(base)
    for name in names or base:
        expected = expected_fn(name)
        assert merged[name].dtype == torch.float32
        torch.testing.assert_close(
            merged[name], expected.float(), rtol=1e-5, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
        )


def cosine(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


# ---- slerp ----------------------------------------------------------------------------------


def ref_slerp(t, v0, v1):
    """Spherical interpolation of the whole tensors; lerp when |cos θ| > 0.9995 (mergekit)."""
    dot = cosine(v0, v1)
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = math.acos(dot)
    return math.sin((1 - t) * theta) / math.sin(theta) * v0 + math.sin(t * theta) / math.sin(theta) * v1


def test_slerp_by_hand():
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(slerp_tensors(0.5, v0, v1), torch.tensor([0.5**0.5, 0.5**0.5]))
    torch.testing.assert_close(slerp_tensors(1 / 3, v0, v1), torch.tensor([math.cos(math.pi / 6), 0.5]))
    # parallel: the linear fallback
    torch.testing.assert_close(
        slerp_tensors(0.25, torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0])), torch.tensor([1.5, 0.0])
    )


def test_slerp_matches_formula_with_mergekits_filtered_gradients(tmp_path, fam):
    folders, tensors = fam
    t = [
        {"filter": "self_attn", "value": [0, 0.5, 1]},
        {"filter": "mlp", "value": [1, 0.5, 0]},
        {"value": 0.3},
    ]
    merged = merge(tmp_path, fam, "slerp", experts=["a"], parameters={"t": t})
    base, other = tensors["base"], tensors["a"]
    depths = layer_depths(base)

    def t_of(name):
        points = [0, 0.5, 1] if "self_attn" in name else [1, 0.5, 0] if "mlp" in name else None
        return interpolate(points, depths[name]) if points else 0.3

    check(merged, lambda n: ref_slerp(t_of(n), base[n], other[n]), tensors)
    branches = {abs(cosine(base[n], other[n])) > 0.9995 for n in base}
    assert branches == {True, False}, "both the spherical and the linear branch must be exercised"
    # a spherical result is not the linear one (the test would catch slerp replaced by lerp)
    q = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.allclose(merged[q], 0.5 * base[q] + 0.5 * other[q], atol=1e-5)


def test_slerp_with_the_base_also_listed_under_models(tmp_path, fam):
    """mergekit's idiom: the base under models too ('no parameters necessary for base model')."""
    folders, tensors = fam
    merged = merge(tmp_path, fam, "slerp", experts=["base", "a"], parameters={"t": 0.4})
    check(merged, lambda n: ref_slerp(0.4, tensors["base"][n], tensors["a"][n]), tensors)


# ---- nuslerp, multislerp, karcher -----------------------------------------------------------


def ref_nuslerp_rows(t, v0, v1):
    """slerp of each row (last axis) of two tensors; lerp where sin θ < 1e-8."""
    out = torch.empty_like(v0)
    for i in range(v0.shape[0]):
        a, b = v0[i], v1[i]
        cos = float(a @ b / (a.norm().clamp(min=1e-7) * b.norm().clamp(min=1e-7)))
        theta = math.acos(max(-1.0, min(1.0, cos)))
        if abs(math.sin(theta)) < 1e-8:
            out[i] = (1 - t) * a + t * b
        else:
            out[i] = (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)
    return out


def ref_nuslerp(t, v0, v1, flatten, row_wise):
    if flatten or v0.dim() == 1:
        return ref_nuslerp_rows(t, v0.reshape(1, -1), v1.reshape(1, -1)).reshape(v0.shape)
    if row_wise:  # mergekit's row_wise slerps along the first axis (columns of [out, in])
        return ref_nuslerp_rows(t, v0.T, v1.T).T
    return ref_nuslerp_rows(t, v0, v1)


@pytest.mark.parametrize(
    "options", [{}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}]
)
def test_nuslerp_with_base_slerps_task_vectors_at_weight_ratio(tmp_path, fam, options):
    _, tensors = fam
    merged = merge(
        tmp_path,
        fam,
        "nuslerp",
        experts=["a", "b"],
        parameters=options,
        per_model={"a": {"weight": 1.0}, "b": {"weight": 3.0}},
    )
    base, a, b = tensors["base"], tensors["a"], tensors["b"]
    flatten, row_wise = options.get("nuslerp_flatten", True), options.get("nuslerp_row_wise", False)
    check(
        merged,
        lambda n: base[n] + ref_nuslerp(0.75, a[n] - base[n], b[n] - base[n], flatten, row_wise),
        tensors,
    )


def test_nuslerp_without_base_slerps_the_models(tmp_path, fam):
    _, tensors = fam
    merged = merge(tmp_path, fam, "nuslerp", experts=["a", "b"], base=False)
    check(merged, lambda n: ref_nuslerp(0.5, tensors["a"][n], tensors["b"][n], True, False), tensors)


def ref_multislerp(points, weights):
    """Barycentric slerp: tangent step at the weighted mean direction, times the weighted norm."""
    w = [x / sum(weights) for x in weights]
    norms = [p.double().norm() for p in points]
    units = [p.double() / (n + 1e-8) for p, n in zip(points, norms)]
    mean = sum(wi * u for wi, u in zip(w, units))
    mean = mean / mean.norm()
    tangent = sum(wi * (u - (u * mean).sum() * mean) for wi, u in zip(w, units))
    size = tangent.norm() + 1e-8
    direction = mean * torch.cos(size) + tangent * torch.sin(size) / size
    return direction * sum(wi * n for wi, n in zip(w, norms))


def test_multislerp_matches_formula_around_the_base(tmp_path, fam):
    _, tensors = fam
    weights = {"a": 1.0, "b": 2.0, "c": 0.5}
    merged = merge(tmp_path, fam, "multislerp", per_model={n: {"weight": w} for n, w in weights.items()})
    base = tensors["base"]
    check(
        merged,
        lambda n: base[n] + ref_multislerp([tensors[m][n] - base[n] for m in NAMES], list(weights.values())),
        tensors,
    )


def ref_karcher(points, steps=10, tol=1e-5):
    """Riemannian mean of the directions by gradient steps on the sphere, times the mean norm."""
    norms = [p.double().norm() for p in points]
    units = [p.double() / n for p, n in zip(points, norms)]
    u = sum(units) / len(units)
    u = u / u.norm()
    for _ in range(steps):
        grad = torch.zeros_like(u)
        for x in units:
            cos = float((u * x).sum().clamp(-1, 1))
            theta = math.acos(cos)
            if theta >= tol:
                grad += theta / math.sin(theta) * (x - cos * u) / len(units)
        if grad.norm() < tol:
            break
        u = torch.cos(grad.norm()) * u + torch.sin(grad.norm()) * grad / grad.norm()
        u = u / u.norm()
    return u * sum(norms) / len(norms)


def test_karcher_by_hand():
    # two directions 90° apart: the mean is the bisector; the norm is the mean norm (1 and 3 → 2)
    merged = karcher_tensors([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])], max_iter=10, tol=1e-5)
    torch.testing.assert_close(merged, torch.tensor([2 * 0.5**0.5, 2 * 0.5**0.5]))


@pytest.mark.slow  # iterates to convergence on every tensor
def test_karcher_matches_formula_and_includes_the_base(tmp_path, fam):
    _, tensors = fam
    merged = merge(tmp_path, fam, "karcher", parameters={"max_iter": 20})
    check(merged, lambda n: ref_karcher([tensors[m][n] for m in ["base", *NAMES]], steps=20), tensors)
    (tmp_path / "nb").mkdir()
    without = merge(tmp_path / "nb", fam, "karcher", base=False)
    check(without, lambda n: ref_karcher([tensors[m][n] for m in NAMES]), tensors)


# ---- model_stock ----------------------------------------------------------------------------


def ref_model_stock(base, experts, filter_wise):
    """t = k·cosθ / (1 + (k−1)·cosθ), cosθ the mean pairwise cosine of the task vectors (per
    row with filter_wise); θ = t·average + (1 − t)·θ₀."""
    k = len(experts)
    taus = [e - base for e in experts]
    rows = (lambda x: x.reshape(-1, x.shape[-1])) if filter_wise else (lambda x: x.reshape(1, -1))
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    cosine_rows = torch.nn.functional.cosine_similarity
    cos = sum(cosine_rows(rows(taus[i]).double(), rows(taus[j]).double(), dim=-1, eps=0) for i, j in pairs)
    cos = cos / len(pairs)
    t = (k * cos / (1 + (k - 1) * cos)).float()
    t = t.reshape(*base.shape[:-1], 1) if filter_wise else t.reshape(())
    return t * (sum(experts) / k) + (1 - t) * base


def test_model_stock_by_hand():
    # two task vectors at 60°: cos θ = ½, t = 2·½ / (1 + ½) = ⅔ of the way to their average
    base = torch.zeros(2)
    experts = torch.stack([torch.tensor([1.0, 0.0]), torch.tensor([0.5, 3**0.5 / 2])])
    params = TensorParams({}, {"filter_wise": False})
    merged = model_stock(base, experts.clone(), params, TensorContext("x"))
    torch.testing.assert_close(merged, (2 / 3) * torch.tensor([0.75, 3**0.5 / 4]))


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_formula(tmp_path, fam, filter_wise):
    _, tensors = fam
    merged = merge(tmp_path, fam, "model_stock", parameters={"filter_wise": filter_wise})
    base = tensors["base"]
    check(merged, lambda n: ref_model_stock(base[n], [tensors[m][n] for m in NAMES], filter_wise), tensors)


# ---- passthrough, nearswap, arcee_fusion ----------------------------------------------------


def test_passthrough_copies_one_model_times_its_scale(tmp_path, fam):
    _, tensors = fam
    merged = merge(tmp_path, fam, "passthrough", experts=["b"], base=False, per_model={"b": {"scale": 0.5}})
    check(merged, lambda n: 0.5 * tensors["b"][n], tensors)


def test_nearswap_matches_formula(tmp_path, fam):
    _, tensors = fam
    merged = merge(tmp_path, fam, "nearswap", experts=["a"], parameters={"t": 0.002})
    base, other = tensors["base"], tensors["a"]

    def expected(n):
        weight = (0.002 / (base[n] - other[n]).abs().clamp(min=1e-6)).clamp(0, 1)
        return weight * other[n] + (1 - weight) * base[n]

    check(merged, expected, tensors)
    q = "model.layers.0.self_attn.q_proj.weight"
    swapped = (merged[q] == other[q]).float().mean()
    assert 0.05 < swapped < 0.95, "both regimes (taken whole, mixed) must occur"


def ref_arcee_fusion(base, other):
    """Keep Δ where |Δ|·KL(softmax(other) ‖ softmax(base)) (per row) ≥ median + 1.5·IQR."""
    p = torch.softmax(other, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    importance = (other - base).abs() * (p * (p / q).log()).sum(dim=-1, keepdim=True)
    ordered = importance.flatten().sort().values
    quantile = {q: ordered[int(q * (ordered.numel() - 1))] for q in (0.25, 0.5, 0.75)}
    threshold = quantile[0.5] + 1.5 * (quantile[0.75] - quantile[0.25])
    return base + (other - base) * (importance >= threshold)


def test_arcee_fusion_matches_formula(tmp_path, fam):
    _, tensors = fam
    merged = merge(tmp_path, fam, "arcee_fusion", experts=["a"])
    check(merged, lambda n: ref_arcee_fusion(tensors["base"][n], tensors["a"][n]), tensors)
    q = "model.layers.0.mlp.up_proj.weight"
    taken = (merged[q] != tensors["base"][q]).float().mean()
    assert 0 < taken < 0.5


# ---- breadcrumbs, della, sce ----------------------------------------------------------------


def ref_breadcrumbs(tau, density, gamma, rescale=False):
    """Sort |τ| ascending; drop the n − ⌊density·n⌋ − ⌊γ·n⌋ smallest and the ⌊γ·n⌋ largest."""
    n = tau.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(n - keep - top, 0)
    top = n - keep - bottom if n - keep - top < 0 else top
    order = torch.sort(tau.abs().flatten(), stable=True).indices
    mask = torch.zeros(n)
    mask[order[bottom : n - top]] = 1
    kept = tau * mask.reshape(tau.shape)
    if rescale and kept.abs().sum() > 1e-7:
        kept = kept * tau.abs().sum() / kept.abs().sum()
    return kept


def ref_sign_elect(weighted):
    """mergekit's consensus: the sign of Σ wᵢτᵢ (+ when 0); mean over agreeing weights."""
    stacked = torch.stack(weighted)
    majority = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    return stacked * (torch.sign(stacked) == majority)


def test_breadcrumbs_mask_by_hand():
    tau = torch.tensor([0.1, -0.5, 0.3, 2.0, -0.2])
    # n = 5: keep 3, drop the largest (2.0) and the smallest (0.1)
    assert breadcrumbs_mask(tau, 0.6, 0.2).tolist() == [False, True, True, False, True]
    # ⌊γ·n⌋ = 0: nothing dropped from the top (mergekit 0.1.5 would drop everything here)
    assert breadcrumbs_mask(tau, 0.6, 0.01).tolist() == [False, True, True, True, False]


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_matches_formula(tmp_path, fam, method):
    _, tensors = fam
    densities, weights = {"a": 0.5, "b": 0.3, "c": 0.8}, {"a": 1.0, "b": 0.5, "c": 2.0}
    merged = merge(
        tmp_path,
        fam,
        method,
        parameters={"gamma": 0.05, "lambda": 0.9, "rescale": True},
        per_model={n: {"density": densities[n], "weight": weights[n]} for n in NAMES},
    )
    base = tensors["base"]

    def expected(n):
        weighted = [
            weights[m] * ref_breadcrumbs(tensors[m][n] - base[n], densities[m], 0.05, rescale=True)
            for m in NAMES
        ]
        mixed = ref_sign_elect(weighted).sum(0) if method == "breadcrumbs_ties" else sum(weighted)
        return base[n] + 0.9 * mixed

    check(merged, expected, tensors)


def ref_della_tau(tau, density, epsilon, seed, name, index):
    """Keep probability density − ε + 2ε·rank/(m − 1) by magnitude rank in each row; keep entry j
    when the counter-based draw u(seed, name, index, j) < p; rescale kept entries by 1/p."""
    rows = tau.reshape(1, -1) if tau.dim() == 1 else tau
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).float()
    p = ((density - epsilon) + 2 * epsilon * ranks / (rows.shape[1] - 1)).reshape(tau.shape)
    u = hash_counter(torch.arange(tau.numel()), rng_key(seed, name, index)) >> 8
    kept = u.reshape(tau.shape) < torch.round(p.double() * 2**24)
    return torch.where(kept, tau / p, 0.0)


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_matches_formula(tmp_path, fam, method):
    _, tensors = fam
    merged = merge(
        tmp_path,
        fam,
        method,
        parameters={"density": 0.5, "epsilon": 0.2},
        seed=3,
        per_model={"b": {"weight": 0.5}},
    )
    base = tensors["base"]
    weights = {"a": 1.0, "b": 0.5, "c": 1.0}

    def expected(n):
        weighted = [
            weights[m] * ref_della_tau(tensors[m][n] - base[n], 0.5, 0.2, 3, n, i)
            for i, m in enumerate(NAMES)
        ]
        if method == "della_linear":
            return base[n] + sum(weighted)
        elected = ref_sign_elect(weighted)
        agreeing = sum(weights[m] * (elected[i] != 0) for i, m in enumerate(NAMES))
        return base[n] + elected.sum(0) / torch.where(agreeing == 0, 1.0, agreeing)

    check(merged, expected, tensors)


def test_della_keeps_large_magnitudes_more_often():
    tau = torch.randn(64, 4096, generator=torch.Generator().manual_seed(0))
    kept = della_drop(tau, 0.4, 0.3, rescale=False, key=rng_key(0, "x", 0), where="x") != 0
    assert abs(kept.float().mean().item() - 0.4) < 0.01
    small = tau.abs() < tau.abs().median(dim=1, keepdim=True).values
    assert kept[small].float().mean() < 0.3 < 0.5 < kept[~small].float().mean()


def ref_sce(base, experts, topk):
    """Select the ⌊topk·m⌋ highest-variance entries (m: non-zero variance), weight each expert by
    its mean τ², erase entries whose sign disagrees with sign(Σ τ), weighted mean of the rest."""
    taus = torch.stack([e - base for e in experts])
    variance = taus.var(dim=0, unbiased=False)
    k = int(int((variance != 0).sum()) * topk)
    mask = torch.zeros(variance.numel())
    mask[torch.sort(variance.flatten(), descending=True, stable=True).indices[:k]] = 1
    taus = taus * mask.reshape(variance.shape)
    energy = torch.stack([(t**2).mean() for t in taus])
    w = (energy / energy.sum()).reshape(-1, *[1] * (taus.dim() - 1))
    agree = torch.sign(taus) == torch.where(taus.sum(0) >= 0, 1.0, -1.0)
    return base + (taus * w * agree).sum(0) / (w * agree).sum(0).clamp(min=1e-6)


def test_sce_matches_formula(tmp_path, fam):
    _, tensors = fam
    merged = merge(tmp_path, fam, "sce", parameters={"select_topk": 0.3})
    check(merged, lambda n: ref_sce(tensors["base"][n], [tensors[m][n] for m in NAMES], 0.3), tensors)


# ---- ram, ramplus_tl -------------------------------------------------------------------------


def ref_ram(base, experts, epsilon, r=None, alpha=None):
    """Entry by entry, the experts whose |τᵢ| > ε contribute: none, the base; one, its τᵢ (times
    λᵢ for RAM+); several, their mean τ. RAM+: λᵢ = 1 + r·clamp(sᵢ / max(uᵢ, ε), 0, α) with sᵢ, uᵢ
    the tensor's entries where expert i contributes with others (s) or alone (u)."""
    taus = torch.stack([e - base for e in experts]).double()
    on = taus.abs() > epsilon
    count = on.sum(0)
    lam = [1.0] * len(experts)
    if r is not None:
        for i in range(len(experts)):
            alone, shared = int((on[i] & (count == 1)).sum()), int((on[i] & (count > 1)).sum())
            lam[i] = 1 + r * min(max(shared / max(alone, epsilon), 0), alpha)
    solo = sum(lam[i] * taus[i] * on[i] for i in range(len(experts)))
    mean = (taus * on).sum(0) / count.clamp(min=1)
    return base.double() + torch.where(count == 1, solo, mean)


def test_ram_and_ramplus_by_hand():
    base = torch.zeros(4)
    # entry 0: a and b change it (c's 1e-6 is below ε); 1: nobody; 2: only a; 3: only c
    experts = torch.tensor([[1.0, 0, 2, 0], [3, 0, 0, 0], [1e-6, 0, 0, 5]])
    params = TensorParams({}, {"epsilon": 1e-5, "r": 0.5, "alpha": 2.0})
    assert ram(base, experts.clone(), params, TensorContext("x")).tolist() == [2, 0, 2, 5]
    # a: 1 shared, 1 alone, λ = 1 + 0.5·1; b: nothing alone (ρ capped, no effect); c: ρ = 0, λ = 1
    assert ramplus_tl(base, experts.clone(), params, TensorContext("x")).tolist() == [2, 0, 3, 5]
    assert reference.ram(base, experts).tolist() == [2, 0, 2, 5]
    assert reference.ramplus_tl(base, experts, r=0.5, alpha=2.0).tolist() == [2, 0, 3, 5]
    # mergekit's defaults (r 0.1, α 0.2): ρ_a = 1 is capped at 0.2, λ = 1.02
    torch.testing.assert_close(reference.ramplus_tl(base, experts)[2], torch.tensor(2.04))


@pytest.mark.parametrize(
    "method,parameters",
    [
        ("ram", {"epsilon": 0.004}),
        ("ram", {}),
        ("ramplus_tl", {"epsilon": 0.004, "r": 0.5, "alpha": 5.0}),
        ("ramplus_tl", {}),
    ],
)
def test_ram_matches_formula(tmp_path, fam, method, parameters):
    _, tensors = fam
    merged = merge(tmp_path, fam, method, parameters=parameters)
    base = tensors["base"]
    epsilon = parameters.get("epsilon", 1e-5)
    r, alpha = (
        (parameters.get("r", 0.1), parameters.get("alpha", 0.2)) if method == "ramplus_tl" else (None, None)
    )
    check(merged, lambda n: ref_ram(base[n], [tensors[m][n] for m in NAMES], epsilon, r, alpha), tensors)
    if epsilon > 1e-5:  # every regime occurs: no expert, one alone, several
        q = "model.layers.0.mlp.up_proj.weight"
        count = sum((tensors[m][q] - base[q]).abs() > epsilon for m in NAMES)
        assert all(bool((count == c).any()) for c in range(4))


def test_ram_fp32_functions_match_the_reference():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(48, 40, generator=g)
    experts = base + torch.randn(3, 48, 40, generator=g) * (torch.rand(3, 48, 40, generator=g) < 0.4)
    params = TensorParams({}, {"epsilon": 0.5, "r": 0.3, "alpha": 4.0})
    torch.testing.assert_close(
        ram(base, experts.clone(), params, TensorContext("x")), reference.ram(base, experts, 0.5)
    )
    torch.testing.assert_close(
        ramplus_tl(base, experts.clone(), params, TensorContext("x")),
        reference.ramplus_tl(base, experts, 0.3, 4.0, 0.5),
    )


# ---- recipes refused at the check, before any weight is read --------------------------------

BAD = [
    (
        "slerp",
        {"experts": ["a", "b"], "parameters": {"t": 0.5}},
        ["merge_method 'slerp' needs exactly 2 models", "models"],
    ),
    (
        "slerp",
        {"experts": ["a", "b"], "base": False, "parameters": {"t": 0.5}},
        ["'slerp' needs exactly 2 models"],
    ),
    ("slerp", {"experts": ["a"]}, ["needs parameters.t"]),
    ("slerp", {"experts": ["a"], "parameters": {"t": 1.5}}, ["parameters.t", "1.5", "[0, 1]"]),
    (
        "slerp",
        {"experts": ["a"], "parameters": {"t": [{"filter": "mlp", "value": [0, -0.5]}]}},
        ["parameters.t", "-0.5"],
    ),
    ("passthrough", {"experts": ["a", "b"], "base": False}, ["'passthrough' needs exactly 1 model"]),
    ("passthrough", {"experts": ["a"]}, ["base_model", "'passthrough' takes exactly 1 model"]),
    ("nearswap", {"experts": ["a", "b"], "parameters": {"t": 0.1}}, ["'nearswap' needs exactly 2 models"]),
    ("nearswap", {"experts": ["a"], "parameters": {"t": -1}}, ["parameters.t", "-1"]),
    ("arcee_fusion", {"experts": ["a"], "base": False}, ["'arcee_fusion' needs exactly 2 models"]),
    ("nuslerp", {"experts": ["a", "b", "c"]}, ["'nuslerp' needs exactly 2 models"]),
    ("model_stock", {"experts": ["a"]}, ["'model_stock' needs base_model and at least 2"]),
    ("breadcrumbs", {"parameters": {"density": 1.5}}, ["parameters.density", "1.5"]),
    ("breadcrumbs", {"parameters": {"gamma": -0.1}}, ["parameters.gamma"]),
    ("della", {"parameters": {"epsilon": -0.1}}, ["parameters.epsilon"]),
    (
        "della",
        {"parameters": {"density": 0.5, "epsilon": 0.6}},
        ["models[0]", "density ± epsilon", "epsilon 0.6"],
    ),
    (
        "della_linear",
        {"parameters": {"epsilon": 0.1}, "per_model": {"c": {"density": 0.05}}},
        ["models[2]", "density 0.05"],
    ),
    ("sce", {"parameters": {"select_topk": 2}}, ["parameters.select_topk"]),
    ("karcher", {"parameters": {"max_iter": 2.5}}, ["parameters.max_iter", "whole number"]),
    ("ram", {"base": False}, ["merge_method 'ram' needs base_model"]),
    ("ram", {"parameters": {"epsilon": -0.1}}, ["parameters.epsilon", "-0.1"]),
    ("ramplus_tl", {"per_model": {"a": {"r": 0.5}}}, ["models[0].parameters", "'r' is a global parameter"]),
    ("ramplus_tl", {"parameters": {"alpha": "big"}}, ["parameters.alpha", "expected a number"]),
]


@pytest.mark.parametrize("method,fields,needles", BAD, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(BAD)])
def test_bad_recipes_are_one_line_exit_2(tmp_path, fam, method, fields, needles):
    folders, _ = fam
    experts, per_model = fields.get("experts", NAMES), fields.get("per_model", {})
    recipe = {"merge_method": method, "models": entries(folders, experts, per_model)}
    if fields.get("base", True):
        recipe["base_model"] = str(folders["base"])
    if "parameters" in fields:
        recipe["parameters"] = fields["parameters"]
    path = write_recipe(tmp_path / "bad.yaml", **recipe)
    out = tmp_path / "out"
    assert_user_error(run_cli("validate", path), *needles)
    assert_user_error(run_cli("merge", path, "-o", out), *needles)
    assert_nothing_written(out)
