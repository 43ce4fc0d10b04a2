"""What the engine reads, and when: work units, read-ahead, rows on demand.

A `WorkUnit` is a tensor or a block of its rows; `stream_inputs` reads the next units on reader
threads into stacked buffers (on a GPU: reused page-locked buffers, see `staging`) up to a byte
budget; `RowSource` gives the kernels that need a whole tensor twice (TIES, DARE-TIES) its rows a
chunk at a time instead, so memory stays a few tensors whatever the model's size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .io.sources import ST_DTYPES, ST_ITEMSIZE, TensorReader
from .kernels.source import Source
from .lazy import torch  # --dry-run's peak estimate imports this module, and needs no torch
from .memory import advise_huge_pages
from .plan import MergePlan, TensorTask
from .staging import BufferPool, HostInputs, Stager, Uploaded, aligned

if TYPE_CHECKING:  # annotations only: --dry-run imports this module for its peak estimate
    from concurrent.futures import Future, ThreadPoolExecutor

RowCheck = Callable[[TensorTask, tuple[int, int], "torch.Tensor", "torch.Tensor"], None]
CHUNK_ELEMENTS = 1 << 22  # rows per work unit of an elementwise method: ~4M elements per model
GPU_CHUNK_FACTOR = 8
# TIES-like methods read a tensor by row chunks (twice) rather than whole once it would take more
# than this with all its inputs: memory then stays flat as models grow, for a re-read of a few
# big tensors from the page cache
STREAM_BYTES = 64 * 2**20


@dataclass(frozen=True)
class WorkUnit:
    """A whole tensor, or a block of its rows for methods that work element by element."""

    task: TensorTask
    rows: tuple[int, int] | None = None
    streamed: bool = False  # a huge tensor the method reads itself, by row chunks (RowSource)
    chunk: int | None = None  # entries per row chunk of a streamed unit or stats pass (None: CHUNK_ELEMENTS)
    # a block of rows of a tensor whose method needs whole-tensor figures first (`block_stats`:
    # TIES's thresholds and balance), found by reading the tensor by row chunks before its first block
    stats: bool = False

    @property
    def held_nbytes(self) -> int:
        """Bytes its read-ahead holds in memory: none for a streamed unit, which reads lazily."""
        return 0 if self.streamed else self.in_nbytes

    @property
    def in_nbytes(self) -> int:
        return self._share(self.task.in_nbytes)

    @property
    def numel(self) -> int:
        """Entries of the tensor in this unit (per input)."""
        return self._share(self.task.reference.numel)

    @property
    def out_nbytes(self) -> int:
        return self._share(self.task.out_nbytes)

    @property
    def staged_nbytes(self) -> int:
        """Bytes of a staging buffer its inputs take (`read_unit` with buffers): the base, then the
        experts stacked in their common dtype (fp32 when they differ), each cache-line aligned."""
        task = self.task
        base = aligned(self._share(task.base.nbytes)) if task.base is not None else 0
        dtypes = {ref.dtype for ref in task.experts}
        itemsize = ST_ITEMSIZE[dtypes.pop()] if len(dtypes) == 1 else 4
        return base + aligned(len(task.experts) * self.numel * itemsize)

    def _share(self, nbytes: int) -> int:
        """The part of a tensor's bytes in this unit's rows."""
        return nbytes if self.rows is None else nbytes // self.task.shape[0] * (self.rows[1] - self.rows[0])


def work_units(
    plan: MergePlan,
    tasks: list[TensorTask] | None = None,
    chunk: int | None = None,
    device: torch.device | str | None = None,
    rows_for_all: bool = False,
    stream_bytes: int | None = None,
    block_bytes: int | None = None,
) -> list[WorkUnit]:
    """Split big tensors of elementwise methods into row blocks of about `chunk` entries so memory
    stays bounded (bigger blocks on a GPU, where each one costs a few kernel launches and a
    synchronisation); tensors whose inputs exceed `stream_bytes` (default STREAM_BYTES) are read
    by a streaming method in row chunks; with `block_bytes`, a streaming method's tensors whose
    result exceeds it are merged by row blocks too, after a pass that finds its whole-tensor
    figures (`MethodSpec.block_stats`), so no result is held whole. `memory.plan_memory` picks
    all three under a cap."""
    gpu = getattr(device, "type", device) == "cuda"
    whole = CHUNK_ELEMENTS * GPU_CHUNK_FACTOR if gpu else CHUNK_ELEMENTS
    chunk = chunk or whole
    stream_bytes = STREAM_BYTES if stream_bytes is None else stream_bytes
    units = []
    blocks = block_bytes is not None and plan.method.block_stats is not None
    for task in plan.tasks if tasks is None else tasks:
        numel = task.reference.numel
        stats = (  # (a method with block_stats is not elementwise)
            blocks
            and not rows_for_all
            and task.merge
            and task.base is not None
            and task.out_nbytes > block_bytes  # type: ignore[operator]
        )
        if task.merge and (plan.method.elementwise or rows_for_all or stats) and task.shape and numel > chunk:
            step = max(1, chunk // max(1, numel // task.shape[0]))
            units += [
                WorkUnit(task, (r, min(r + step, task.shape[0])), chunk=chunk if stats else None, stats=stats)
                for r in range(0, task.shape[0], step)
            ]
        elif (
            task.merge
            and plan.method.streams
            and task.base is not None
            and task.shape
            and (numel > whole or task.in_nbytes > stream_bytes)
        ):
            units.append(WorkUnit(task, streamed=True, chunk=chunk))
        else:
            units.append(WorkUnit(task))
    return units


def read_unit(
    reader: TensorReader, unit: WorkUnit, pin: bool, buffers: BufferPool | None = None
) -> list[torch.Tensor]:
    """A unit's inputs in their file dtype: [tensor] for a copied one; [base, experts] for a merged
    one, the experts read straight into one stacked [N, ...] buffer (page-locked when `pin`, so
    the copy to the GPU is asynchronous). Experts of mixed dtypes are stacked as fp32. With
    `buffers`, a merged unit's inputs are read into one staging buffer lent by that pool
    (`HostInputs.lease`, given back once they are copied to the device)."""
    task = unit.task
    if unit.streamed:
        return []
    if not task.merge:
        return [reader.read(task.reference, unit.rows)]
    shape = task.experts[0].shape
    if unit.rows is not None:
        shape = (unit.rows[1] - unit.rows[0], *shape[1:])
    dtypes = {ref.dtype for ref in task.experts}
    dtype = ST_DTYPES[dtypes.pop()] if len(dtypes) == 1 else torch.float32
    lease = buffers.acquire(unit.staged_nbytes) if buffers is not None else None
    try:
        raws: list[torch.Tensor] = HostInputs(lease=lease)
        if task.base is not None:
            out = None
            if lease is not None:
                rows = task.base.shape[0] if unit.rows is None else unit.rows[1] - unit.rows[0]
                out = lease.take((rows, *task.base.shape[1:]), ST_DTYPES[task.base.dtype])
            raws.append(reader.read(task.base, unit.rows, out=out, pin=pin))
        if lease is not None:
            stack = lease.take((len(task.experts), *shape), dtype)
        else:
            stack = torch.empty((len(task.experts), *shape), dtype=dtype, pin_memory=pin)
            if not pin:
                advise_huge_pages(stack.data_ptr(), stack.numel() * stack.element_size())
        for i, ref in enumerate(task.experts):
            if ST_DTYPES[ref.dtype] == dtype:
                reader.read(ref, unit.rows, out=stack[i])
            else:
                stack[i].copy_(reader.read(ref, unit.rows))
    except BaseException:
        if lease is not None:
            lease.release()
        raise
    raws.append(stack)
    return raws


def load_inputs(
    raws: list[torch.Tensor] | Uploaded, has_base: bool, device: torch.device, fp32: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Base and stacked experts [N, ...] on the device, in fp32 or (for raw-input kernels) as read.
    Inputs already `Uploaded` by the staging are taken as they are (once their copy is done)."""
    non_blocking = device.type == "cuda"
    if isinstance(raws, Uploaded):
        raws = raws.take()
    experts = raws.pop().to(device, non_blocking=non_blocking)
    base = raws.pop().to(device, non_blocking=non_blocking) if has_base else None
    if fp32:
        experts = experts.float()
        base = base.float() if base is not None else None
    return base, experts


def chunk_rows(task: TensorTask, chunk: int | None) -> int:
    """Rows per chunk of a streamed tensor: about `chunk` entries, at least one row."""
    row_numel = task.reference.numel // task.shape[0]
    return min(task.shape[0], max(1, (chunk or CHUNK_ELEMENTS) // max(1, row_numel)))


class RowSource(Source):
    """A huge tensor's base and experts, read from the files a chunk of rows at a time (about
    CHUNK_ELEMENTS entries each, the next chunk read while this one is merged). With a GPU
    `staging`, each chunk is read into a pinned buffer and its copy to the device issued by the
    reader thread; the merge waits for that copy when it takes the chunk."""

    SEGMENTS = 64  # the sample is read as this many evenly spaced runs of rows

    def __init__(
        self,
        reader: TensorReader,
        task: TensorTask,
        device: torch.device,
        pool: ThreadPoolExecutor,
        check: RowCheck | None = None,
        chunk: int | None = None,
        staging: Stager | None = None,
    ) -> None:
        self.reader, self.task, self.device, self.pool = reader, task, device, pool
        self.staging = staging if staging is not None and staging.ops is not None else None
        self.chunk = chunk or CHUNK_ELEMENTS  # entries per chunk read (two in memory at a time)
        self.check = check  # sees every chunk read, e.g. for NaN/Inf where no kernel looks
        self.shape = tuple(task.shape)
        self.numel, self.count = task.reference.numel, len(task.experts)
        self.rows = task.shape[0]
        self.row_numel = self.numel // self.rows
        self.pin = device.type == "cuda"

    def _read(self, first: int, last: int) -> list[torch.Tensor] | Uploaded:
        """Rows [first, last) as read (on a reader thread): on the host, or with GPU staging their
        copy to the device issued."""
        if self.staging is None:
            return read_unit(self.reader, WorkUnit(self.task, (first, last)), self.pin)
        raws = read_unit(self.reader, WorkUnit(self.task, (first, last)), self.pin, self.staging.chunks)
        return self.staging.upload(raws)

    def _ready(
        self, raws: list[torch.Tensor] | Uploaded, first: int, last: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What `_read` gave, on the device and flat, as the merge takes it."""
        base, experts = load_inputs(raws, True, self.device, fp32=False)
        if self.check is not None:
            self.check(self.task, (first, last), base, experts)
        return base.reshape(-1), experts.reshape(self.count, -1)

    def _rows(self, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._ready(self._read(first, last), first, last)

    def chunks(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        step = max(1, self.chunk // self.row_numel)
        spans = [(r, min(r + step, self.rows)) for r in range(0, self.rows, step)]
        future = self.pool.submit(self._read, *spans[0])  # the engine's reader threads: no new
        for i, (first, last) in enumerate(spans):  # threads (and malloc arenas) per tensor
            base, experts = self._ready(future.result(), first, last)
            if i + 1 < len(spans):
                future = self.pool.submit(self._read, *spans[i + 1])
            yield first * self.row_numel, base, experts

    def sample(self, target: int) -> tuple[torch.Tensor, torch.Tensor]:
        run = max(1, -(-target // (self.SEGMENTS * self.row_numel)))
        starts = sorted(
            {int(i * (self.rows - run) / max(self.SEGMENTS - 1, 1)) for i in range(self.SEGMENTS)}
        )
        parts = [self._rows(r, min(r + run, self.rows)) for r in starts]
        return torch.cat([b for b, _ in parts]), torch.cat([e for _, e in parts], dim=1)

    def gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        base = torch.empty(index.numel(), dtype=torch.float32, device=self.device)
        experts = torch.empty((self.count, index.numel()), dtype=torch.float32, device=self.device)
        rows = index // self.row_numel
        unique = torch.unique(rows)
        if unique.numel() > self.SEGMENTS:  # entries all over the tensor: one more pass of chunks
            for first, chunk_base, chunk_experts in self.chunks():
                at = ((index >= first) & (index < first + chunk_base.shape[0])).nonzero().reshape(-1)
                base[at] = chunk_base[index[at] - first].float()
                experts[:, at] = chunk_experts[:, index[at] - first].float()
            return base, experts
        for row in unique.tolist():
            at = (rows == row).nonzero().reshape(-1)
            row_base, row_experts = self._rows(row, row + 1)
            cols = index[at] - row * self.row_numel
            base[at] = row_base[cols].float()
            experts[:, at] = row_experts[:, cols].float()
        return base, experts


PREFETCH_BYTES = 256 * 2**20  # read-ahead budget by default (`memory.plan_memory` may lower it)


def stream_inputs(
    plan: MergePlan,
    reader: TensorReader,
    pool: ThreadPoolExecutor,
    prefetch: int,
    units: list[WorkUnit],
    pin: bool = False,
    budget: int | None = None,
    buffers: BufferPool | None = None,
) -> Iterator[tuple[WorkUnit, list[torch.Tensor]]]:
    """Yields each work unit with its raw input tensors, reading ahead up to `prefetch` units and
    `budget` bytes (default PREFETCH_BYTES; always at least the next unit), so huge tensors do not
    pile up. `prefetch` 0 reads each unit only when it is wanted: no read-ahead at all. With
    `buffers` (a GPU's staging pool) merged units are read into its buffers."""
    if prefetch <= 0:
        for unit in units:
            yield unit, read_unit(reader, unit, pin, buffers)
        return
    budget = PREFETCH_BYTES if budget is None else budget
    pending: deque[tuple[WorkUnit, Future]] = deque()
    todo = deque(units)

    def read(unit: WorkUnit) -> list[torch.Tensor]:
        return read_unit(reader, unit, pin, buffers)

    def fill() -> None:
        in_flight = sum(u.held_nbytes for u, _ in pending)
        while todo and len(pending) < prefetch and (not pending or in_flight + todo[0].held_nbytes <= budget):
            unit = todo.popleft()
            in_flight += unit.held_nbytes
            pending.append((unit, pool.submit(read, unit)))

    fill()
    while pending:
        unit, future = pending.popleft()
        raws = future.result()
        fill()
        yield unit, raws
