"""WUDI-Merging and OptMerge (WUDI v2): data-free interference minimisation per linear layer.

Maths from `shared/reference/methods.md` (Cheng et al., ICML 2025; Wei et al., OptMerge 2025).
For a 2-D weight with task vectors τ_i ∈ R^{out×in} and weights w_i = 1/‖τ_i‖²_F, the merged task
vector M minimises

    L(M) = Σ_i w_i ‖(M − τ_i) τ_iᵀ‖²_F = tr(M G Mᵀ) − 2 tr(M Bᵀ) + c,
    G = Σ_i w_i τ_iᵀ τ_i  (in×in, PSD, trace N),   B = Σ_i w_i τ_i τ_iᵀ τ_i  (out×in),
    c = Σ_i w_i ‖τ_i τ_iᵀ‖²_F,                     ∇L = 2 (M G − B).

Every solver works on (G, B, c, M0) alone, accumulated expert by expert (never N×in×in), so a
layer costs its N task vectors plus two in×in matrices (G and its eigenvectors).

Why the closed forms: the rows of B lie in range(G), so every stationary point satisfies
M G = B and ∇L = 2 (M − M*) G with M* = B G⁺ + M0 (I − G G⁺). Gradient descent, momentum SGD
and gradient flow from M0 are therefore all of the form M0 + (M* − M0) V diag(f(λ)) Vᵀ, where
G = V diag(λ) Vᵀ and f(λ) is the fraction of the initial error removed along each eigenvector;
they differ only in f. One `eigh(G)` (O(in³)) then replaces hundreds of O(out·in²) iterations:

    M = M0 + (B V diag(f/λ) − M0 V diag(f)) Vᵀ.

Directions with f = 0 (null space of G, discarded eigenvectors) keep M0's component exactly.
The unfiltered exact minimiser is *worse* than the paper's early-stopped Adam (82.3 vs 85.2 on
ViT-B/32, 8 tasks): G has many tiny eigenvalues whose 1/λ amplifies noise. Hence the filters:

- `flow`:   f = 1 − e^{−λt}: gradient flow dM/dt = −(M G − B) = −∇L/2 run for time t (i.e.
            gradient flow of L itself for time t/2); the limit of gradient descent on L/2 with
            step η after t/η steps (Landweber iteration).
- `swudi`:  the flow filter on the top K = ⌈rank_ratio·in⌉ eigenvalues only.
- `aswudi`: f = 1 on the top K = ⌈(Σ√λ)²/Σλ⌉ eigenvalues (participation ratio of √λ), no
            time: hyper-parameter-free and invariant to the scale of G.
- `exact`:  f = 1 wherever λ exceeds the eigensolver's noise floor (pseudo-inverse).
- `sgd_spectral`: f = 1 − r_k(λ), r_k the exact residual of k steps of torch's momentum SGD
            on L: the same iterate as `sgd` (so the same merge, to rounding), without the k
            matrix products. OptMerge's solver, offered by `wudi2` only (see WUDI_SOLVERS).
The iterative `adam` (the paper's) and `sgd` (OptMerge's) solvers run the optimisers on the
analytic gradient 2 (M G − B) — the same iterates as autograd through the paper's loss, with
one out×in² product per step instead of N out²×in ones and no N×out×out intermediate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..lazy import torch
from .arithmetic import task_vectors
from .layers import is_matrix, is_projection
from .registry import MethodSpec, Param, TensorContext, TensorParams, register
from .spectral import top_components

SOLVERS = ("aswudi", "swudi", "flow", "exact", "adam", "sgd", "sgd_spectral")  # wudi2 (OptMerge)
# wudi: not OptMerge's sgd / sgd_spectral. Momentum SGD on L is the gradient flow of time
# ≈ 2·iterations·lr/(1 − momentum): at WUDI's lr (1e-5, Adam's) t ≈ 0.06 against flow's 300, so it
# barely leaves Σ τ_i (task arithmetic on the projections), and any larger lr is `flow` again.
WUDI_SOLVERS = ("aswudi", "swudi", "flow", "exact", "adam")
ITERATIVE = ("adam", "sgd")
FLOW_TIME = 300.0  # `flow`: methods.md's t ≈ 300 (85.1 on ViT-B/32, 8 tasks)
SWUDI_TIME = 1300.0  # `swudi`: the time published with rank_ratio 0.65 (85.6 on ViT-B/32)


@dataclass(frozen=True)
class WudiProblem:
    """The quadratic L(M) = tr(M G Mᵀ) − 2 tr(M Bᵀ) + c and the solvers' starting point M0."""

    gram: torch.Tensor  # G, in×in
    cross: torch.Tensor  # B, out×in
    const: float  # c, only needed to report L itself
    init: torch.Tensor  # M0, out×in


@dataclass(frozen=True)
class Spectrum:
    """eigh(G): eigenvalues ascending (float64, for the filters) and eigenvectors (G's dtype)."""

    values: torch.Tensor
    vectors: torch.Tensor
    tolerance: float  # eigenvalues at or below it are indistinguishable from 0 in the eigensolver


def task_weights(deltas: torch.Tensor) -> torch.Tensor:
    """w_i = 1/‖τ_i‖²_F (0 for a task vector that is exactly zero: it carries no constraint)."""
    squared = torch.stack([torch.linalg.vector_norm(tau).square() for tau in deltas])
    return torch.where(squared > 0, 1.0 / squared, torch.zeros_like(squared))


def build_problem(deltas: torch.Tensor, weights: torch.Tensor, init: torch.Tensor) -> WudiProblem:
    """Accumulate G, B and c one expert at a time, through the smaller of ττᵀ and τᵀτ."""
    out_features, in_features = deltas.shape[1:]
    gram = deltas.new_zeros(in_features, in_features)
    cross = deltas.new_zeros(out_features, in_features)
    const = 0.0
    for tau, w in zip(deltas, weights.tolist()):
        if w == 0:
            continue
        if out_features <= in_features:
            gram.addmm_(tau.T, tau, alpha=w)
            small = tau @ tau.T  # out×out
            cross.addmm_(small, tau, alpha=w)  # (τ τᵀ) τ
        else:
            small = tau.T @ tau  # in×in
            gram.add_(small, alpha=w)
            cross.addmm_(tau, small, alpha=w)  # τ (τᵀ τ)
        const += w * float(torch.linalg.vector_norm(small, dtype=torch.float64).square())
        del small
    return WudiProblem(gram, cross, const, init)


def loss(problem: WudiProblem, merged: torch.Tensor) -> float:
    """L(M) from the accumulated quantities (sums in float64)."""
    quadratic = torch.sum((merged @ problem.gram) * merged, dtype=torch.float64)
    linear = torch.sum(merged * problem.cross, dtype=torch.float64)
    return float(quadratic - 2 * linear) + problem.const


def gradient(problem: WudiProblem, merged: torch.Tensor) -> torch.Tensor:
    """∇L(M) = 2 (M G − B)."""
    return 2 * torch.addmm(problem.cross, merged, problem.gram, beta=-1)


# ---- iterative solvers -------------------------------------------------------------------------


def run_optimizer(
    problem: WudiProblem, optimizer_class: type[torch.optim.Optimizer], iterations: int, **options: float
) -> torch.Tensor:
    """`iterations` steps of a torch optimizer on L from M0, fed the analytic gradient."""
    merged = problem.init.clone()
    optimizer = optimizer_class([merged], **options)
    for _ in range(iterations):
        merged.grad = gradient(problem, merged)
        optimizer.step()
    merged.grad = None
    return merged


def solve_adam(problem: WudiProblem, iterations: int, lr: float) -> torch.Tensor:
    """The paper's solver: Adam (default betas and eps, no weight decay) from M0."""
    return run_optimizer(problem, torch.optim.Adam, iterations, lr=lr, weight_decay=0.0)


def solve_sgd(problem: WudiProblem, iterations: int, lr: float, momentum: float) -> torch.Tensor:
    """OptMerge's solver: SGD with (heavy-ball) momentum from M0."""
    return run_optimizer(problem, torch.optim.SGD, iterations, lr=lr, momentum=momentum)


# ---- closed forms ------------------------------------------------------------------------------


def spectrum(gram: torch.Tensor, dtype: torch.dtype | None = None) -> Spectrum:
    """One symmetric eigendecomposition of G, in `dtype` (float32 when None; float64 resolves
    smaller eigenvalues)."""
    dtype = dtype or torch.float32
    values, vectors = torch.linalg.eigh(gram.to(dtype))
    largest = max(float(values[-1]), 0.0) if values.numel() else 0.0
    tolerance = largest * gram.shape[0] * torch.finfo(dtype).eps
    return Spectrum(values.to(torch.float64), vectors.to(gram.dtype), tolerance)


def apply_filter(
    problem: WudiProblem, spec: Spectrum, removed: torch.Tensor, stats: dict[str, float] | None = None
) -> torch.Tensor:
    """M0 + (B V diag(f/λ) − M0 V diag(f)) Vᵀ for a filter f that vanishes wherever λ ≤ 0.

    Every filter here is zero on a prefix of the ascending eigenvalues, so only the suffix of V
    (a view, not a copy) enters the products. With `stats`, also records `directions` (how many
    eigenvectors have f ≠ 0) and `loss_change` = L(M) − L(M0) (see `filtered_loss_change`).
    """
    nonzero = torch.nonzero(removed).flatten()
    if stats is not None:
        stats["directions"] = float(nonzero.numel())
        stats["loss_change"] = 0.0
    if nonzero.numel() == 0:
        return problem.init.clone()
    start = int(nonzero[0])
    vectors = spec.vectors[:, start:]
    kept = removed[start:]
    dtype = problem.init.dtype
    coefficients = (problem.cross @ vectors) * (kept / spec.values[start:]).to(dtype)
    coefficients -= (problem.init @ vectors) * kept.to(dtype)
    if stats is not None:
        stats["loss_change"] = filtered_loss_change(coefficients, spec.values[start:], kept)
    return torch.addmm(problem.init, coefficients, vectors.T)


def filtered_loss_change(coefficients: torch.Tensor, values: torch.Tensor, removed: torch.Tensor) -> float:
    """L(M) − L(M0) for M = M0 + C Vᵀ, from the filter's coefficients C alone (O(out·K)).

    In G's eigenbasis L separates over the columns of P = M V: L = Σ_j λ_j ‖P_j‖² − 2⟨P_j, Q_j⟩ + c
    with Q = B V. The filter moves column j by C_j = −(f_j/λ_j) R_j, R = (M0 G − B) V, which
    changes L by −f_j (2 − f_j) ‖R_j‖² / λ_j = −(2 − f_j) (λ_j / f_j) ‖C_j‖²: a decrease for any
    0 < f_j < 2, and no out×in² product.
    """
    moved = removed != 0
    squared = torch.linalg.vector_norm(coefficients[:, moved], dim=0, dtype=torch.float64).square()
    f, lam = removed[moved].to(torch.float64), values[moved].to(torch.float64)
    return -float(torch.sum((2 - f) * lam / f * squared.to(f.device)))


def flow_filter(values: torch.Tensor, time: float) -> torch.Tensor:
    """1 − e^{−λt} (gradient flow of L/2 for time t); 0 where λ ≤ 0."""
    return -torch.expm1(-values.clamp(min=0) * time)


def top_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """1 on the k largest eigenvalues (the last k: eigh sorts ascending), 0 elsewhere."""
    mask = torch.zeros_like(values)
    if k > 0:
        mask[-k:] = 1.0
    return mask


def participation_rank(values: torch.Tensor) -> int:
    """ASWUDI's rank: ⌈(Σ√λ)² / Σλ⌉, the participation ratio of the singular values √λ.

    It counts the directions that carry the spectrum's mass, whatever its scale. A relative
    1e-9 is taken off before rounding up so that k equal eigenvalues give exactly k.
    """
    positive = values.clamp(min=0)
    total = float(positive.sum())
    if total == 0:
        return 0
    ratio = float(positive.sqrt().sum()) ** 2 / total
    return min(math.ceil(ratio * (1 - 1e-9)), values.numel())


def momentum_residual(values: torch.Tensor, iterations: int, lr: float, momentum: float) -> torch.Tensor:
    """The fraction r_k(λ) of the initial error left by k steps of torch's momentum SGD on L.

    Along an eigenvector the error e and the momentum buffer b evolve linearly:
    b' = μ b + 2λ e, e' = e − η b', from b = 0 (torch's first buffer is the gradient itself).
    """
    step = torch.zeros(values.numel(), 2, 2, dtype=torch.float64, device=values.device)
    step[:, 0, 0] = 1 - 2 * lr * values
    step[:, 0, 1] = -lr * momentum
    step[:, 1, 0] = 2 * values
    step[:, 1, 1] = momentum
    return torch.linalg.matrix_power(step, iterations)[:, 0, 0]


def closed_form_filter(solver: str, spec: Spectrum, p: TensorParams) -> torch.Tensor:
    """The filter f(λ) of a closed-form solver."""
    values = spec.values
    above_noise = (values > spec.tolerance).to(values.dtype)
    if solver == "flow":
        return flow_filter(values, _time(p, FLOW_TIME))
    if solver == "swudi":
        k = min(max(math.ceil(float(p["rank_ratio"]) * values.numel()), 1), values.numel())
        return flow_filter(values, _time(p, SWUDI_TIME)) * top_k(values, k)
    if solver == "aswudi":
        return top_k(values, participation_rank(values)) * above_noise
    if solver == "exact":
        return above_noise
    if solver == "sgd_spectral":
        residual = momentum_residual(values, int(p["iterations"]), float(p["lr"]), float(p["momentum"]))
        return (1 - residual) * (values > 0).to(values.dtype)
    raise ValueError(f"not a closed-form solver: {solver}")


def _time(p: TensorParams, default: float) -> float:
    return default if p["t"] is None else float(p["t"])


def solve(problem: WudiProblem, p: TensorParams, stats: dict[str, float] | None = None) -> torch.Tensor:
    """M for one layer with the recipe's solver.

    With `stats`, also records L at the start (`loss_before`, one out×in² product) and at the
    result (`loss_after`: a second product for the iterative solvers, the O(out·K) change of
    `filtered_loss_change` for the closed forms), plus the closed forms' `directions`.
    """
    solver = p["solver"]
    if stats is not None:
        stats["loss_before"] = loss(problem, problem.init)
    if solver in ITERATIVE:
        if solver == "adam":
            merged = solve_adam(problem, int(p["iterations"]), float(p["lr"]))
        else:
            merged = solve_sgd(problem, int(p["iterations"]), float(p["lr"]), float(p["momentum"]))
        if stats is not None:
            stats["loss_after"] = loss(problem, merged)
        return merged
    spec = spectrum(problem.gram, getattr(torch, p["eigh_dtype"]))
    merged = apply_filter(problem, spec, closed_form_filter(solver, spec, p), stats)
    if stats is not None:
        stats["loss_after"] = stats["loss_before"] + stats.pop("loss_change")
    return merged


# ---- the methods -------------------------------------------------------------------------------


def truncate(deltas: torch.Tensor, rank: int) -> torch.Tensor:
    """Each τ_i replaced in place by its best rank-`rank` approximation (OptMerge)."""
    for tau in deltas:
        u, s, vh = top_components(tau, rank)
        tau.copy_((u * s) @ vh)
    return deltas


def merge_layers(
    base: torch.Tensor,
    experts: torch.Tensor,
    p: TensorParams,
    ctx: TensorContext,
    solve_layer: Callable[[torch.Tensor, dict[str, float] | None], torch.Tensor],
) -> torch.Tensor:
    """θ0 + λ·M: solved layers per `scope`, the rest kept at the base (`linear`) or the mean of
    τ_i (`all_2d`: embeddings, heads and non-2-D tensors). Each solved layer's loss before and
    after goes to `ctx.report` when there is one."""
    solved = is_projection(ctx.name, base) if p["scope"] == "linear" else is_matrix(ctx.name, base)
    if not solved and p["scope"] == "linear":
        return base
    deltas = task_vectors(base, experts)
    if not solved:
        return base + float(p["lambda"]) * deltas.mean(dim=0)
    stats: dict[str, float] | None = {} if ctx.report is not None else None
    merged = solve_layer(deltas, stats)
    if ctx.report is not None:
        ctx.report(ctx.name, stats)
    return base + float(p["lambda"]) * merged


def wudi(base: torch.Tensor, experts: torch.Tensor, p: TensorParams, ctx: TensorContext) -> torch.Tensor:
    """WUDI-Merging: M minimises L from M0 = Σ τ_i."""

    def solve_layer(deltas: torch.Tensor, stats: dict[str, float] | None) -> torch.Tensor:
        return solve(build_problem(deltas, task_weights(deltas), deltas.sum(dim=0)), p, stats)

    return merge_layers(base, experts, p, ctx, solve_layer)


def wudi2(base: torch.Tensor, experts: torch.Tensor, p: TensorParams, ctx: TensorContext) -> torch.Tensor:
    """OptMerge: L on rank-⌊min(m,n)/N⌋ truncations of τ_i, weights 1/‖τ_i‖² of the full τ_i,
    from M0 = mean τ_i (whose part outside the truncated span every solver but Adam keeps)."""

    def solve_layer(deltas: torch.Tensor, stats: dict[str, float] | None) -> torch.Tensor:
        weights, init = task_weights(deltas), deltas.mean(dim=0)
        truncated = truncate(deltas, min(deltas.shape[1:]) // deltas.shape[0])
        return solve(build_problem(truncated, weights, init), p, stats)

    return merge_layers(base, experts, p, ctx, solve_layer)


def _params(solver: str, lr: float, solvers: tuple[str, ...]) -> tuple[Param, ...]:
    sgd = "sgd" in solvers
    closed = "/".join(s for s in solvers if s not in ITERATIVE)
    steps = "adam / sgd / sgd_spectral" if sgd else "adam"
    return (
        Param(
            "solver",
            solver,
            False,
            f"{closed}: closed forms from one eigh(G); adam (WUDI paper)"
            + (", sgd (OptMerge)" if sgd else "")
            + ": iterative",
            solvers,
        ),
        Param("iterations", 300, False, f"steps of {steps}"),
        Param("lr", lr, False, f"learning rate of {steps}"),
        *((Param("momentum", 0.9, False, "momentum of sgd / sgd_spectral"),) if sgd else ()),
        Param(
            "t",
            None,
            False,
            f"gradient-flow time of flow (default {FLOW_TIME:g}) and swudi "
            f"(default {SWUDI_TIME:g}); flow of L/2, G has trace N",
        ),
        Param("rank_ratio", 0.65, False, "swudi: share of G's eigen-directions kept"),
        Param(
            "scope",
            "linear",
            False,
            "linear: attention/MLP projections solved, all else kept at the base (official code); "
            "all_2d: every 2-D weight but embeddings/lm_head solved, all else the mean of τ_i",
            ("linear", "all_2d"),
        ),
        Param("lambda", 1.0, False, "scale of the merged task vector"),
        Param("eigh_dtype", "float32", False, "precision of the eigendecomposition", ("float32", "float64")),
    )


def _gram_workspace(shape: tuple[int, ...], n: int) -> int:
    """G, its eigenvectors and the eigh workspace: a few in×in fp32 matrices."""
    return 4 * 4 * shape[-1] ** 2 if len(shape) == 2 else 0


register(
    MethodSpec(
        "wudi",
        wudi,
        _params("aswudi", 1e-5, WUDI_SOLVERS),
        needs_base=True,
        workspace=_gram_workspace,
        summary="WUDI: per linear layer, minimise Σ‖(M − τᵢ)τᵢᵀ‖²/‖τᵢ‖² (data-free); closed form or Adam",
        citation="Cheng et al., Whoever Started the Interference Should End It: Guiding Data-Free Model "
        "Merging via Task Vectors, ICML 2025 (arXiv:2503.08099)",
    )
)
register(
    MethodSpec(
        "wudi2",
        wudi2,
        _params("sgd_spectral", 1e-4, SOLVERS),
        needs_base=True,
        workspace=_gram_workspace,
        summary="OptMerge (WUDI v2): the WUDI loss on rank-⌊min(m,n)/N⌋ task vectors, from their mean",
        citation="Wei et al., Unifying Multimodal Large Language Model Capabilities and Modalities via "
        "Model Merging (OptMerge), 2025 (arXiv:2505.19892); Cheng et al., ICML 2025",
    )
)

__all__ = [
    "ITERATIVE",
    "SOLVERS",
    "WUDI_SOLVERS",
    "Spectrum",
    "WudiProblem",
    "apply_filter",
    "build_problem",
    "closed_form_filter",
    "filtered_loss_change",
    "gradient",
    "loss",
    "participation_rank",
    "solve",
    "solve_adam",
    "solve_sgd",
    "spectrum",
    "task_weights",
    "wudi",
    "wudi2",
]
