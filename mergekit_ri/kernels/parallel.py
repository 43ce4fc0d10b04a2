"""Block-level CPU parallelism for the kernels.

torch's own intra-op threads split every op into a parallel region; the blocked kernels run
~40 small ops per block, and each region's barrier costs milliseconds as soon as the cores are
shared with anything else (measured: a TIES merge 15x slower on a busy 2-core machine). So the
engine turns intra-op threading off for these kernels (`single_threaded_ops`) and the blocks are
spread over a pool of `workers()` threads instead: no barriers, one block per core at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

from ..lazy import torch  # geometry.py imports this with the method modules

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

T = TypeVar("T")

_state = threading.local()
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def workers() -> int:
    """Block workers in this thread's current `single_threaded_ops` scope (1 outside it)."""
    return getattr(_state, "workers", 1)


@contextmanager
def single_threaded_ops(threads: int | None = None) -> Iterator[int]:
    """Run torch ops single-threaded and let the kernels use `threads` block workers instead
    (default: torch's thread count on entry). Restores the previous setting on exit."""
    previous_torch, previous_workers = torch.get_num_threads(), workers()
    count = max(1, threads or previous_torch)
    torch.set_num_threads(1)
    _state.workers = count
    try:
        yield count
    finally:
        _state.workers = previous_workers
        torch.set_num_threads(previous_torch)


def _pool(count: int) -> ThreadPoolExecutor:
    from concurrent.futures import ThreadPoolExecutor  # here: it imports logging, unused by `methods`

    with _pools_lock:
        if count not in _pools:
            _pools[count] = ThreadPoolExecutor(count, thread_name_prefix="ri-kernel")
        return _pools[count]


def run_blocks(fn: Callable[[int, int], T], blocks: list[tuple[int, int]]) -> list[T]:
    """fn over the blocks, in order of the results; in parallel when workers() > 1."""
    count = workers()
    if count <= 1 or len(blocks) <= 1:
        return [fn(start, stop) for start, stop in blocks]
    return list(_pool(count).map(lambda span: fn(*span), blocks))
