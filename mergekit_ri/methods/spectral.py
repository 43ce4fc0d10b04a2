"""TSV-M, Iso-C and Iso-CTS: data-free merges in the singular bases of the task vectors.

Maths from `shared/reference/methods.md` (Gargiulo et al. 2025; Marczak et al. 2025), per 2-D
weight `[out, in]`; the merged task vector is scaled by `alpha` (1.0, the no-validation default
of both papers). Embedding tables, output heads and non-2-D tensors take the mean of the task
vectors, as the authors' codes do for every tensor they do not decompose (`layers.py` says
why embeddings are not decomposed); set `alpha: 0` with a filter to keep any of them at the base.
"""

from __future__ import annotations

from collections.abc import Callable

from ..lazy import torch
from .arithmetic import task_vectors
from .layers import is_matrix
from .registry import MethodSpec, Param, TensorContext, TensorParams, register

ALPHA = Param("alpha", 1.0, False, "scale of the merged task vector")
COMMON_SPACE_FRACTION = Param(
    "common_space_fraction",
    0.8,
    False,
    "share of the singular directions of Σ τ_i kept as the common subspace",
)


def top_components(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `rank` leading singular triplets (U_r, S_r, V_rᵀ) of a matrix."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor P Qᵀ of P S Qᵀ: the nearest matrix with orthonormal columns
    (or rows, if wide). This is how both papers orthogonalise concatenated singular vectors."""
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


def recombine(blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], isotropic: bool) -> torch.Tensor:
    """Concatenate singular blocks, orthogonalise U and V, and rebuild U⊥ diag(S) V⊥ᵀ.

    With `isotropic`, every singular value is replaced by their mean (Iso-C/CTS's flat spectrum).
    """
    u = polar(torch.cat([b[0] for b in blocks], dim=1))
    s = torch.cat([b[1] for b in blocks])
    vh = polar(torch.cat([b[2] for b in blocks], dim=0))
    if isotropic:
        return s.mean() * (u @ vh)
    return (u * s) @ vh


def tsv_merge(deltas: torch.Tensor) -> torch.Tensor:
    """TSV-M: each task keeps its top ⌊min(m,n)/N⌋ singular components with their own singular
    values; U and V blocks are concatenated and orthogonalised. With more tasks than
    dimensions no component fits, and the tensor falls back to the mean of τ_i."""
    rank = min(deltas.shape[1:]) // deltas.shape[0]
    if rank == 0:
        return deltas.mean(dim=0)
    return recombine([top_components(tau, rank) for tau in deltas], isotropic=False)


def iso_c_merge(deltas: torch.Tensor) -> torch.Tensor:
    """Iso-C: the singular vectors of Σ τ_i with a flat spectrum at their mean singular value."""
    u, s, vh = torch.linalg.svd(deltas.sum(dim=0), full_matrices=False)
    return s.mean() * (u @ vh)


def common_space_size(rank: int, tasks: int, fraction: float) -> tuple[int, int]:
    """Iso-CTS's split of `rank` directions: (common, per task), as in the authors' code.

    The common share ⌊fraction·rank⌋ is adjusted so that the remainder divides by the number of
    tasks (Python's round, i.e. half to even, as the reference code does).
    """
    common = int(rank * fraction)
    per_task = round((rank - common) / tasks)
    return max(rank - per_task * tasks, 0), per_task


def iso_cts_merge(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """Iso-CTS: the common subspace of Σ τ_i plus each task's top directions outside it,
    orthogonalised, with one flat spectrum over all of them."""
    common, per_task = common_space_size(min(deltas.shape[1:]), deltas.shape[0], fraction)
    blocks = [top_components(deltas.sum(dim=0), common)]
    u_common = blocks[0][0]
    if per_task > 0:
        blocks += [top_components(tau - u_common @ (u_common.T @ tau), per_task) for tau in deltas]
    return recombine(blocks, isotropic=True)


def merge_matrices(
    base: torch.Tensor,
    experts: torch.Tensor,
    p: TensorParams,
    ctx: TensorContext,
    merge: Callable[[torch.Tensor], torch.Tensor],
    directions: Callable[[int, int], int],
) -> torch.Tensor:
    """θ0 + α·merge(τ) for projection-like 2-D weights, θ0 + α·mean(τ) for every other tensor.

    Each decomposed tensor is reported to `ctx.report` (if any) with the number of singular
    directions the merge keeps, `directions(min(m, n), N)`: free, no extra decomposition."""
    deltas = task_vectors(base, experts)
    if not is_matrix(ctx.name, base):
        return base + float(p["alpha"]) * deltas.mean(dim=0)
    merged = merge(deltas)
    if ctx.report is not None:
        ctx.report(ctx.name, {"directions": float(directions(min(base.shape), deltas.shape[0]))})
    return base + float(p["alpha"]) * merged


def tsv(base: torch.Tensor, experts: torch.Tensor, p: TensorParams, ctx: TensorContext) -> torch.Tensor:
    # N·⌊k/N⌋ singular directions; with ⌊k/N⌋ = 0 the tensor is the mean of τ_i (up to k)
    return merge_matrices(base, experts, p, ctx, tsv_merge, lambda k, n: n * (k // n) if k >= n else k)


def iso_c(base: torch.Tensor, experts: torch.Tensor, p: TensorParams, ctx: TensorContext) -> torch.Tensor:
    return merge_matrices(base, experts, p, ctx, iso_c_merge, lambda k, n: k)


def iso_cts(base: torch.Tensor, experts: torch.Tensor, p: TensorParams, ctx: TensorContext) -> torch.Tensor:
    fraction = p["common_space_fraction"]

    def directions(k: int, n: int) -> int:
        common, per_task = common_space_size(k, n, fraction)
        return common + n * per_task

    return merge_matrices(base, experts, p, ctx, lambda deltas: iso_cts_merge(deltas, fraction), directions)


def _svd_workspace(shape: tuple[int, ...], n: int) -> int:
    """SVD factors of the N task vectors and of their concatenation."""
    return 4 * 4 * (n + 2) * shape[0] * shape[-1] if len(shape) == 2 else 0


register(
    MethodSpec(
        "tsv",
        tsv,
        (ALPHA,),
        needs_base=True,
        workspace=_svd_workspace,
        summary="TSV-M: top ⌊min(m,n)/N⌋ singular components per task, orthogonalised (data-free)",
        citation="Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, "
        "CVPR 2025 (arXiv:2412.00081)",
        aliases=("tsv_m",),
    )
)
register(
    MethodSpec(
        "iso_c",
        iso_c,
        (ALPHA,),
        needs_base=True,
        workspace=_svd_workspace,
        summary="Iso-C: singular vectors of Σ τ_i with a flat (isotropic) spectrum (data-free)",
        citation="Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and "
        "Task-Specific Subspaces, ICML 2025 (arXiv:2502.04959)",
    )
)
register(
    MethodSpec(
        "iso_cts",
        iso_cts,
        (ALPHA, COMMON_SPACE_FRACTION),
        needs_base=True,
        workspace=_svd_workspace,
        summary="Iso-CTS: common subspace of Σ τ_i plus task-specific directions, isotropic spectrum (data-free)",
        citation="Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and "
        "Task-Specific Subspaces, ICML 2025 (arXiv:2502.04959)",
    )
)

__all__ = ["iso_c", "iso_c_merge", "iso_cts", "iso_cts_merge", "polar", "top_components", "tsv", "tsv_merge"]
