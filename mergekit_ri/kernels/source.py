"""Where a kernel gets its inputs: tensors already in memory, or rows read on demand.

TIES and DARE-TIES need the whole tensor twice (a k-th magnitude, a majority sign) before an
entry can be written, so a kernel cannot just be handed row blocks like task arithmetic. A
`Source` lets it walk the tensor in row chunks as often as it needs instead: `TensorSource`
wraps tensors in memory (one chunk, no copies), and the engine's row reader (`RowSource` in
`reading.py`) reads each chunk from the files when asked, so a 500M-entry embedding costs a few
MB of inputs at a time, not N+1 full copies.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: --dry-run imports this (reading.py) without torch
    import torch


class Source:
    """Base [n] and experts [N, n] (flat, file dtype) of one tensor, readable by chunks."""

    numel: int
    count: int
    device: torch.device
    shape: tuple[int, ...]  # of the tensor, for the merged result

    def chunks(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(start, base[start:stop], experts[:, start:stop]) covering the tensor in order."""
        raise NotImplementedError

    def sample(self, target: int) -> tuple[torch.Tensor, torch.Tensor]:
        """About `target` entries of base and experts spread over the tensor."""
        raise NotImplementedError

    def gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Base [k] and experts [N, k] at flat entry indices (int64, on self.device)."""
        raise NotImplementedError


class TensorSource(Source):
    def __init__(self, base: torch.Tensor, experts: torch.Tensor) -> None:
        self.shape = tuple(base.shape)
        self.base, self.experts = base.reshape(-1), experts.reshape(experts.shape[0], -1)
        self.numel, self.count, self.device = self.base.shape[0], self.experts.shape[0], self.base.device

    def chunks(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        yield 0, self.base, self.experts

    def sample(self, target: int) -> tuple[torch.Tensor, torch.Tensor]:
        stride = max(1, self.numel // max(target, 1))
        return self.base[::stride], self.experts[:, ::stride]

    def gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base[index], self.experts[:, index]
