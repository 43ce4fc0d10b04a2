"""Merge kernels: the hot loops of the element-wise methods.

`blocked` holds the plain-torch implementations (the reference, and the CPU path: it walks
tensors in cache-sized blocks so the half-dozen passes per entry hit L2, not DRAM); `rng`
the counter-based random numbers DARE draws, identical on every device; `triton` fused
single-pass GPU versions, used only when Triton and a CUDA device are present and checked
against `blocked` in the tests (under TRITON_INTERPRET=1 on CPU).
"""

from .blocked import (
    dare,
    magnitude_thresholds,
    task_arithmetic,
    task_vectors,
    ties_apply,
    weighted_sum,
)

__all__ = ["dare", "magnitude_thresholds", "task_arithmetic", "task_vectors", "ties_apply", "weighted_sum"]
