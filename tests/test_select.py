"""The radix select equals a sort-based k-th largest magnitude on awkward inputs."""

from __future__ import annotations

import pytest
import torch

from mergekit_ri.kernels.select import kth_largest_abs, topk_mask


def sorted_kth(x: torch.Tensor, k: int) -> float:
    return torch.sort(x.abs().flatten().float(), descending=True).values[k - 1].item()


CASES = {
    "odd 2-D": torch.randn(37, 53),
    "1-D": torch.randn(1001),
    "single": torch.tensor([-3.5]),
    "all zero": torch.zeros(64, 3),
    "many ties (bf16)": (torch.randn(300, 70) * 0.01).to(torch.bfloat16).float(),
    "negative and positive ties": torch.tensor([1.0, -1.0, 1.0, -1.0, 0.5, 2.0, -2.0]),
    "tiny and huge": torch.tensor([1e-38, 3e38, -1e-45, 5.0, -7e-20, 0.0]),
}


@pytest.fixture(params=["selection", "radix"])
def path(request, monkeypatch):
    """Run each case through both code paths: kthvalue (small tensors) and the radix select."""
    import mergekit_ri.kernels.select as select

    if request.param == "radix":
        monkeypatch.setattr(select, "SMALL", 0)
    return request.param


@pytest.mark.parametrize("name", list(CASES))
def test_kth_equals_sort_for_every_k(name, path):
    x = CASES[name]
    n = x.numel()
    for k in sorted({1, min(2, n), n // 3 or 1, n // 2 or 1, n - 1 or 1, n}):
        assert kth_largest_abs(x, k) == sorted_kth(x, k), (name, k)


@pytest.mark.parametrize("density", [0.0, 0.01, 0.2, 0.5, 0.999, 1.0])
def test_mask_keeps_everything_tied_with_the_threshold(density, path):
    x = (torch.randn(129, 31) * 0.02).to(torch.bfloat16).float()
    mask = topk_mask(x, density)
    k = int(density * x.numel())
    if k == 0:
        assert not mask.any()
        return
    threshold = sorted_kth(x, k)
    assert torch.equal(mask, x.abs() >= threshold)
    assert int(mask.sum()) >= k


def test_k_out_of_range_is_refused():
    with pytest.raises(ValueError):
        kth_largest_abs(torch.ones(3), 0)
    with pytest.raises(ValueError):
        kth_largest_abs(torch.ones(3), 4)
