"""Page-locked staging between the files and a GPU: reused host buffers, copies on their own streams.

On a GPU each unit's inputs are read into one of a few page-locked (pinned) host buffers, reused
round-robin; the copy to the device is issued on a copy stream, ahead of the kernels of the unit
before it, and the kernels' stream waits for that copy's event alone. Each merged result is
copied back on a download stream into another pinned buffer, and the writer thread waits for
that copy's event before it writes, so the merging loop itself never waits for the device. A
buffer is refilled only once the event recorded after its last copy has fired.

On the CPU (`ops` None) every call hands its tensors through unchanged: no pinning, no streams,
no events, the same bytes as without this module.

Every CUDA call goes through `DeviceOps`, so that the bookkeeping (which buffer, which event, who
waits for what, when) runs in the tests with fake streams and events on a machine with no GPU.
Nothing here touches CUDA before a `CudaOps` is made, which the engine does only once a CUDA
device has been chosen. No torch at import: the planner sizes the buffers with `pinned_layout`.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .lazy import torch

if TYPE_CHECKING:
    from .reading import WorkUnit

ALIGN = 64  # bytes: every tensor carved from a staging buffer starts on a cache line
CHUNK_SLOTS = 3  # row chunks of a streamed tensor: one merged, one read, one whose copy may be running


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def input_slots(depth: int) -> int:
    """Buffers for units' inputs: `depth` read ahead, the one being copied, and one whose copy to
    the device may still be running (refilling it waits for that copy alone)."""
    return max(0, depth) + 2


def result_slots(writer_queue: int) -> int:
    """Buffers for results: those waiting for the writer, and the one being copied back."""
    return max(0, writer_queue) + 1


# ---------------------------------------------------------------- sizes (no torch)


@dataclass(frozen=True)
class PinnedLayout:
    """The page-locked buffers a GPU merge holds: count × bytes for inputs, row chunks, results."""

    input_slots: int
    input_bytes: int
    chunk_slots: int
    chunk_bytes: int
    result_slots: int
    result_bytes: int

    @property
    def nbytes(self) -> int:
        return (
            self.input_slots * self.input_bytes
            + self.chunk_slots * self.chunk_bytes
            + self.result_slots * self.result_bytes
        )


def pinned_layout(units: Sequence[WorkUnit], depth: int, writer_queue: int, chunk: int) -> PinnedLayout:
    """Buffers sized for the largest merged unit of each kind: inputs of units read whole or by
    row blocks, row chunks of streamed tensors and figures passes (`chunk` entries), results of
    every merged unit."""
    from .reading import chunk_rows

    merged = [u for u in units if u.task.merge]
    whole = [u.staged_nbytes for u in merged if not u.streamed]
    chunks = [  # streamed tensors, and the figures pass of tensors merged by blocks (`stats`)
        type(u)(u.task, (0, chunk_rows(u.task, u.chunk or chunk))).staged_nbytes
        for u in merged
        if u.streamed or u.stats
    ]
    results = [aligned(u.out_nbytes) for u in merged]
    return PinnedLayout(
        input_slots(depth) if whole else 0,
        max(whole, default=0),
        CHUNK_SLOTS if chunks else 0,
        max(chunks, default=0),
        result_slots(writer_queue) if results else 0,
        max(results, default=0),
    )


# ---------------------------------------------------------------- the device


class DeviceOps(Protocol):
    """The stream and event calls staging makes (CUDA's, or a test's fakes)."""

    def new_stream(self, name: str) -> Any: ...
    def current_stream(self) -> Any: ...
    def use(self, stream: Any) -> AbstractContextManager: ...
    def record(self, stream: Any) -> Any: ...  # a new event, recorded on `stream` now
    def wait(self, stream: Any, event: Any) -> None: ...  # `stream`'s later work waits for `event`
    def synchronize(self, event: Any) -> None: ...  # this thread waits for `event`
    def done(self, event: Any) -> bool: ...
    def host_buffer(self, nbytes: int) -> torch.Tensor: ...  # page-locked uint8
    def to_device(self, tensor: torch.Tensor) -> torch.Tensor: ...  # on the current stream, async
    def to_host(self, host: torch.Tensor, tensor: torch.Tensor) -> None: ...  # likewise
    def keep_for(self, tensor: torch.Tensor, stream: Any) -> None: ...  # not reused before `stream` is done


class CudaOps:
    """`DeviceOps` on one CUDA device. Making one initialises CUDA; the engine makes it only once a
    CUDA device has been chosen."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def new_stream(self, name: str) -> Any:
        return torch.cuda.Stream(self.device)

    def current_stream(self) -> Any:
        return torch.cuda.current_stream(self.device)

    def use(self, stream: Any) -> AbstractContextManager:
        return torch.cuda.stream(stream)

    def record(self, stream: Any) -> Any:
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait(self, stream: Any, event: Any) -> None:
        stream.wait_event(event)

    def synchronize(self, event: Any) -> None:
        event.synchronize()

    def done(self, event: Any) -> bool:
        return bool(event.query())

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=True)

    def to_host(self, host: torch.Tensor, tensor: torch.Tensor) -> None:
        host.copy_(tensor, non_blocking=True)

    def keep_for(self, tensor: torch.Tensor, stream: Any) -> None:
        if tensor.is_cuda:
            tensor.record_stream(stream)


def device_ops(device: torch.device) -> DeviceOps | None:
    """The ops for a device the merge runs on: None (hand tensors through) for the CPU."""
    return CudaOps(device) if device.type == "cuda" else None


# ---------------------------------------------------------------- buffers


class Lease:
    """One staging buffer lent out: tensors are carved from it in order (`take`), and `release`
    gives it back, with the event after which its bytes are no longer read (None: now)."""

    def __init__(self, pool: BufferPool, buffer: torch.Tensor, slot: int | None) -> None:
        self.pool, self.buffer, self.slot = pool, buffer, slot
        self._used = 0
        self._released = False

    def take(self, shape: Iterable[int], dtype: torch.dtype) -> torch.Tensor:
        shape = tuple(shape)
        numel = 1
        for d in shape:
            numel *= d
        start = aligned(self._used)
        end = start + numel * dtype.itemsize
        if end > self.buffer.numel():
            raise AssertionError(f"staging buffer of {self.buffer.numel()} bytes too small for {end}")
        self._used = end
        return self.buffer[start:end].view(dtype).view(shape)

    def release(self, event: Any = None) -> None:
        if not self._released:
            self._released = True
            self.pool._give_back(self, event)


class BufferPool:
    """`slots` page-locked buffers of `slot_bytes`, made on first use and lent round-robin: the one
    given back longest ago goes out next, after its event (the copy that last read it) has fired.
    A request larger than a slot, or made while every slot is lent out (the engine sizes the pool
    so that neither happens), gets a buffer of its own, counted in `extra`."""

    def __init__(self, ops: DeviceOps, slots: int, slot_bytes: int, name: str = "staging") -> None:
        self.ops, self.slot_bytes, self.name = ops, slot_bytes, name
        self._buffers: list[torch.Tensor | None] = [None] * slots
        self._free: deque[tuple[int, Any]] = deque((i, None) for i in range(slots))
        self._lock = threading.Lock()
        self.lent = 0  # leases handed out
        self.waited = 0  # of which waited for a copy still running
        self.extra = 0  # buffers made outside the pool

    @property
    def slots(self) -> int:
        return len(self._buffers)

    def acquire(self, nbytes: int) -> Lease:
        with self._lock:
            self.lent += 1
            if nbytes > self.slot_bytes or not self._free:
                self.extra += 1
                slot, event = None, None
            else:
                slot, event = self._free.popleft()
        if slot is None:
            return Lease(self, self.ops.host_buffer(aligned(nbytes)), None)
        if event is not None and not self.ops.done(event):
            self.waited += 1
            self.ops.synchronize(event)
        buffer = self._buffers[slot]
        if buffer is None:
            buffer = self._buffers[slot] = self.ops.host_buffer(self.slot_bytes)
        return Lease(self, buffer, slot)

    def _give_back(self, lease: Lease, event: Any) -> None:
        if lease.slot is not None:
            with self._lock:
                self._free.append((lease.slot, event))

    def stats(self) -> dict[str, int]:
        made = sum(b is not None for b in self._buffers)
        return {"slots": self.slots, "slot_bytes": self.slot_bytes, "made": made, "lent": self.lent,
                "waited": self.waited, "extra": self.extra}  # fmt: skip


class HostInputs(list):
    """A unit's raw input tensors as read, and the staging buffer they were read into (if any)."""

    def __init__(self, tensors: Iterable[torch.Tensor] = (), lease: Lease | None = None) -> None:
        super().__init__(tensors)
        self.lease = lease


@dataclass
class Uploaded:
    """A unit's inputs on the device, their copy issued on the copy stream; `take` makes the
    compute stream wait for that copy (and for nothing else)."""

    tensors: list[torch.Tensor]
    event: Any
    stager: Stager
    _waited: bool = False

    def take(self) -> list[torch.Tensor]:
        if not self._waited:
            self.stager.ops.wait(self.stager.compute, self.event)  # type: ignore[union-attr]
            self._waited = True
        tensors, self.tensors = self.tensors, []
        return tensors


@dataclass
class Download:
    """A result being copied back into a pinned buffer; the writer waits for `event`."""

    host: torch.Tensor
    event: Any
    lease: Lease


# ---------------------------------------------------------------- the stager


class Stager:
    """The staging of one merge on one device (pass-through with `ops` None)."""

    def __init__(
        self, device: torch.device, ops: DeviceOps | None, layout: PinnedLayout | None = None
    ) -> None:
        self.device, self.ops = device, ops
        self.inputs = self.chunks = self.results = None
        self.copy = self.download_stream = self.compute = None
        if ops is not None:
            layout = layout or PinnedLayout(0, 0, 0, 0, 0, 0)
            self.compute = ops.current_stream()
            self.copy = ops.new_stream("copy")
            self.download_stream = ops.new_stream("download")
            self.inputs = BufferPool(ops, layout.input_slots, layout.input_bytes, "inputs")
            self.chunks = BufferPool(ops, layout.chunk_slots, layout.chunk_bytes, "chunks")
            self.results = BufferPool(ops, layout.result_slots, layout.result_bytes, "results")

    @property
    def lookahead(self) -> int:
        """Units whose inputs are copied to the device before the unit ahead of them is merged."""
        return 0 if self.ops is None else 1

    def upload(self, raws: list[torch.Tensor]) -> list[torch.Tensor] | Uploaded:
        """Issue the copy of a unit's staged inputs to the device; its buffer goes back to the pool
        with the copy's event. Inputs not in a staging buffer (copied tensors) pass through."""
        lease = getattr(raws, "lease", None)
        if self.ops is None or lease is None:
            return raws
        ops = self.ops
        with ops.use(self.copy):
            tensors = [ops.to_device(t) for t in raws]
            event = ops.record(self.copy)
        for tensor in tensors:  # made on the copy stream, read on the compute stream
            ops.keep_for(tensor, self.compute)
        lease.release(event)
        return Uploaded(tensors, event, self)

    def download(self, tensor: torch.Tensor) -> torch.Tensor | Download:
        """The result on the host: as it is on the CPU, else a copy issued on the download stream
        (after the kernels so far on the compute stream) into a pinned buffer."""
        if self.ops is None:
            return tensor.cpu()
        ops = self.ops
        assert self.results is not None
        lease = self.results.acquire(tensor.numel() * tensor.element_size())
        host = lease.take(tensor.shape, tensor.dtype)
        ops.wait(self.download_stream, ops.record(self.compute))
        with ops.use(self.download_stream):
            ops.to_host(host, tensor)
            event = ops.record(self.download_stream)
        ops.keep_for(tensor, self.download_stream)
        return Download(host, event, lease)

    def write(self, writer: Any, task: Any, result: torch.Tensor | Download, rows: Any) -> None:
        """The writer thread's side: wait for a result's copy, write it, give its buffer back."""
        if not isinstance(result, Download):
            writer.write(task, result, rows)
            return
        try:
            if not self.ops.done(result.event):  # type: ignore[union-attr]
                self.ops.synchronize(result.event)  # type: ignore[union-attr]
            writer.write(task, result.host, rows)
        finally:
            result.lease.release()

    def stats(self) -> dict[str, dict[str, int]]:
        pools = {"inputs": self.inputs, "chunks": self.chunks, "results": self.results}
        return {name: pool.stats() for name, pool in pools.items() if pool is not None}


def stager_for(
    device: torch.device, units: Sequence[WorkUnit], depth: int, writer_queue: int, chunk: int
) -> Stager:
    """The staging for a merge of `units` on `device`, its buffers sized as the memory plan counts them."""
    ops = device_ops(device)
    if ops is None:
        return Stager(device, None)
    return Stager(device, ops, pinned_layout(units, depth, writer_queue, chunk))
