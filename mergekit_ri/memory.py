"""The memory cap: how a merge is laid out so that its peak stays under `--max-memory`.

The engine holds, at any moment, the unit it is merging (a tensor, a block of its rows, or the
row chunks a streaming method reads), the units read ahead of it and the results waiting for the
writer. Each of those is known from the headers, so the peak is planned, not hoped for: given a
cap, `plan_memory` picks the row-chunk size, which tensors a streaming method (TIES, DARE-TIES)
reads by rows instead of whole, the read-ahead depth and budget and the writer queue, most
generous first, and takes the first layout whose planned peak fits. When even the most frugal
layout does not fit (a method that needs whole tensors in fp32, such as slerp or model_stock, on a
tensor too big for the cap), the merge is refused before any weight is read, naming the tensor
and the least it needs.

On a GPU the host holds the page-locked staging buffers instead (`staging.pinned_layout`: a few
buffers the size of the largest unit's inputs, row chunk and result, reused throughout), plus
the tensors that are copied unmerged; the merge's tensors themselves live on the device, whose
memory the cap does not count.

The cap counts the bytes of tensors the merge holds; the process itself (Python, torch and their
libraries, `RUNTIME_BYTES`) comes on top of it. No torch here: `--dry-run` plans without it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError
from .hugepages import HUGE_PAGE as HUGE_PAGE
from .hugepages import advise_huge_pages as advise_huge_pages
from .sizes import MEMORY_UNITS, read_size

if TYPE_CHECKING:
    from .plan import MergePlan
    from .reading import WorkUnit

MiB = 2**20
# RSS of a merging process before it holds any tensor: Python, torch, numpy, the C kernels and the
# threads' stacks (measured: 0.22-0.24 GiB on Linux x86-64 with torch 2.x)
RUNTIME_BYTES = 240 * MiB
DEFAULT_SHARE = 0.5  # of the machine's memory (or its cgroup's limit), when no cap is given
WRITER_QUEUE = 2  # merged results that may wait for the writer thread
MIN_CHUNK = 1 << 16  # entries: the smallest row chunk the planner goes down to
BIG_CHUNK = 1 << 20  # entries: below this, per-chunk costs outweigh one more read (see _layouts)
MIN_STREAM_BYTES = 4 * MiB  # the smallest inputs a streaming method is made to read by rows
NATIVE_BLOCK = 1 << 19  # entries per C-kernel call (kernels/native.py BLOCK)
TORCH_BLOCK = 1 << 18  # entries per torch-kernel block (kernels/blocked.py BLOCK)
BAND_ENTRIES = 1 << 20  # |τ| values a TIES threshold search keeps at most (kernels/blocked.py)
HISTOGRAM_BYTES = (1 << 16) * 8  # one expert's 65,536-bucket int64 histogram (radix select)
SMALL = 1 << 16  # entries: below this a threshold is selected from the whole |τ| (kernels/select.py)


# ---------------------------------------------------------------- sizes


def parse_memory(value: int | str, where: str = "max_memory") -> int:
    """Bytes from 512MiB, 2G or 2GiB (binary, as `free -g` and docker count), 1.5GB (decimal)
    or a plain number of bytes; a one-line UserError naming `where` for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UserError(f"{where}: expected a size such as 512MiB, 2G or 1.5GB, not {type(value).__name__}")
    if isinstance(value, int):
        size = value
    else:
        read = read_size(value, MEMORY_UNITS)
        if read is None:
            shown = value if len(value) <= 40 else value[:37] + "..."
            raise UserError(
                f"{where}: cannot read size '{shown}'; write e.g. 512MiB, 2G (= 2GiB) or 1.5GB (= 1.5·10^9 bytes)"
            )
        size = read
    if size <= 0:
        raise UserError(f"{where}: must be a positive size, e.g. 512MiB")
    if size >= 2**63:
        raise UserError(f"{where}: {value} is more memory than any machine has")
    return size


def human(n: float) -> str:
    """1.50 GiB, 300.0 MiB: binary units, as the cap is usually written."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}" if unit != "GiB" else f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def machine_memory() -> int | None:
    """Bytes of memory this process may use: the machine's RAM, or less when a cgroup limits us.

    The total, not what is free right now, so that the same recipe gets the same plan on the same
    machine (a busy machine is what --max-memory is for)."""
    found: list[int] = []
    try:
        found.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        pass
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit != "max":
                found.append(int(limit))
        except (OSError, ValueError):
            pass
    found = [n for n in found if n > 0]
    return min(found) if found else None


def default_cap() -> tuple[int | None, str]:
    """The cap when none is given: a share of the machine's memory (None: unknown)."""
    memory = machine_memory()
    if memory is None:
        return None, "none: the machine's memory is unknown"
    return int(memory * DEFAULT_SHARE), f"default: {DEFAULT_SHARE:.0%} of the machine's {human(memory)}"


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class MemoryPlan:
    """How the engine runs under the cap, and the peak that layout holds (runtime not included)."""

    cap: int | None  # bytes of tensors allowed; None: no cap known
    cap_source: str  # where the cap comes from, for --dry-run
    chunk: int  # entries per row block (element-wise methods) and per row chunk (streamed tensors)
    stream_bytes: int  # a streaming method reads a tensor by row chunks once its inputs exceed this
    depth: int  # units read ahead of the merge (0: each read when it is wanted)
    read_ahead: int  # bytes the read-ahead may hold (at least the next unit when depth > 0)
    writer_queue: int  # merged results that may wait for the writer
    peak: int  # planned peak bytes of tensors
    largest: str  # the unit that holds the most at the peak
    streamed: int  # tensors read by row chunks
    pinned: int = 0  # of the peak, page-locked staging buffers (a GPU merge)
    # what the hashers may hold of out-of-order bytes: the room the cap leaves above the peak
    content_hash_bytes: int = 0  # --fingerprint-inputs: reads ahead of their turn (io.contenthash)
    file_hash_bytes: int = 0  # checksums: writes ahead of their turn (io.filehash)
    # a streaming method's tensors whose result exceeds this are merged by row blocks after a
    # pass for their whole-tensor figures (`MethodSpec.block_stats`); None: none are
    block_bytes: int | None = None
    blocked: int = 0  # tensors merged that way

    @property
    def mmap_threshold(self) -> int:
        """Freed buffers from this size up go back to the system (`return_freed_memory`): 1 MiB,
        or less when the row chunks are small enough to pile up in malloc's arenas instead."""
        return MMAP_THRESHOLD if self.chunk >= 1 << 20 else SMALL_CHUNK_MMAP_THRESHOLD

    @property
    def total(self) -> int:
        """The planned peak RSS: tensors plus the runtime."""
        return self.peak + RUNTIME_BYTES

    def summary(self) -> dict[str, Any]:
        return {
            "cap": self.cap,
            "cap_source": self.cap_source,
            "planned_peak": self.peak,
            "runtime": RUNTIME_BYTES,
            "largest": self.largest,
            "chunk_elements": self.chunk,
            "stream_bytes": self.stream_bytes,
            "streamed_tensors": self.streamed,
            "read_ahead_units": self.depth,
            "read_ahead_bytes": self.read_ahead,
            "writer_queue": self.writer_queue,
            "pinned": self.pinned,
            "hash_buffers": self.content_hash_bytes + self.file_hash_bytes,
            "blocked_tensors": self.blocked,
        }


@dataclass(frozen=True)
class _Knobs:
    chunk: int
    stream_bytes: int
    depth: int
    read_ahead: int
    writer_queue: int
    block_bytes: int | None = None


def plan_memory(
    plan: MergePlan,
    cap: int | None = None,
    prefetch: int = 2,
    device: str = "cpu",
    threads: int | None = None,
) -> MemoryPlan:
    """The most generous layout whose planned peak fits `cap` (default: `plan.max_memory`, else a
    share of the machine's memory); a UserError naming the tensor if none does."""
    source = "given"
    if cap is None:
        cap, source = plan.max_memory, plan.max_memory_source
    if cap is None:
        cap, source = default_cap()
    model, layouts = _search(plan, prefetch, device, threads)
    frugal: tuple[int, str, _Knobs] | None = None
    for knobs in layouts:
        peak, largest = model.peak(knobs)
        if frugal is None or peak < frugal[0]:
            frugal = (peak, largest, knobs)
        if cap is None or peak <= cap:
            return _result(model, knobs, peak, largest, cap, source)
    assert frugal is not None and cap is not None
    peak, largest, knobs = frugal
    raise UserError(
        f"max_memory {human(cap)} ({source}) is too small for this merge: tensor {largest} needs "
        f"at least {human(peak)}{model.why()}; give --max-memory {math.ceil(peak / MiB)}MiB or more"
    )


def least_memory(plan: MergePlan, prefetch: int = 2, device: str = "cpu", threads: int | None = None) -> int:
    """The smallest cap this merge can run under: its most frugal layout's planned peak."""
    model, layouts = _search(plan, prefetch, device, threads)
    return min(model.peak(knobs)[0] for knobs in layouts)


def _search(
    plan: MergePlan, prefetch: int, device: str, threads: int | None
) -> tuple[_Model, Iterator[_Knobs]]:
    """The plan's memory model and its layouts, most generous first."""
    from . import reading  # its constants are read when asked (tests patch them)

    gpu = device.startswith("cuda")
    model = _Model(plan, max(1, threads or os.cpu_count() or 1), gpu)
    chunk = reading.CHUNK_ELEMENTS * (reading.GPU_CHUNK_FACTOR if gpu else 1)
    blocks = plan.method.block_stats is not None
    return model, _layouts(chunk, reading.STREAM_BYTES, reading.PREFETCH_BYTES, prefetch, blocks)


def _result(
    model: _Model, knobs: _Knobs, peak: int, largest: str, cap: int | None, source: str
) -> MemoryPlan:
    units = model.units(knobs)
    content, files = hash_allowances(None if cap is None else cap - peak)
    return MemoryPlan(
        cap,
        source,
        knobs.chunk,
        knobs.stream_bytes,
        knobs.depth,
        knobs.read_ahead,
        knobs.writer_queue,
        peak,
        largest,
        sum(u.streamed for u in units),
        model.pinned(knobs),
        content,
        files,
        block_bytes=knobs.block_bytes,
        blocked=len({u.task.name for u in units if u.stats}),
    )


def hash_allowances(room: int | None) -> tuple[int, int]:
    """(content hash, file hash) bytes out-of-order data may take while waiting to be hashed:
    their usual limits, within the `room` the cap leaves above the planned peak (None: no cap).

    Not part of the planned peak — in a plain merge reads and writes come in order and nothing
    waits — but kept under the cap for when they do not (a resumed or distributed merge). The
    content hash comes first: what it cannot hold is missing from the fingerprint, while a file
    hash reads what it could not hold back from the file at the end."""
    from .io import contenthash, filehash

    room = contenthash.PENDING_LIMIT + filehash.PENDING_LIMIT if room is None else max(room, 0)
    content = min(contenthash.PENDING_LIMIT, room)
    return content, min(filehash.PENDING_LIMIT, room - content)


def _layouts(chunk: int, stream_bytes: int, read_ahead: int, prefetch: int, blocks: bool) -> Iterator[_Knobs]:
    """Layouts from the default down to the most frugal: first less read-ahead and writer queue
    (costs a little overlap), then smaller row blocks and chunks (costs calls), then streaming
    smaller tensors by rows (costs re-reads from the page cache), then no read-ahead and a
    synchronous writer. For a method with `block_stats` (TIES, DARE-TIES) the tensors with the
    biggest results are then merged by row blocks after a pass for their figures (costs one more
    read of those tensors, holds no result whole) — before chunks go under BIG_CHUNK entries,
    whose per-chunk costs outweigh that read."""
    io = [(prefetch, read_ahead, WRITER_QUEUE)]
    budget = read_ahead // 2
    while budget >= 16 * MiB:
        io.append((prefetch, budget, WRITER_QUEUE))
        budget //= 2
    io += [(1, 0, WRITER_QUEUE), (1, 0, 1)]
    streams = [stream_bytes]
    while streams[-1] > MIN_STREAM_BYTES:
        streams.append(streams[-1] // 2)
    chunks = [chunk]
    while chunks[-1] > MIN_CHUNK:
        chunks.append(max(MIN_CHUNK, chunks[-1] // 2))
    big = [c for c in chunks if c >= BIG_CHUNK] or chunks[:1]
    small = chunks[len(big) :]

    def whole(sizes: list[int], chunks_first: bool) -> Iterator[_Knobs]:
        if chunks_first:
            pairs = [(c, s) for c in sizes for s in streams]
        else:
            pairs = [(c, s) for s in streams for c in sizes]
        for c, s in pairs:
            for depth, budget, queue in io:
                yield _Knobs(c, s, depth, budget, queue)

    def blocked(sizes: list[int]) -> Iterator[_Knobs]:
        for c in sizes if blocks else []:
            for b in [*streams, 0]:  # results above b merged by blocks
                for depth, budget, queue in io:
                    yield _Knobs(c, streams[-1], depth, budget, queue, b)

    yield from whole(big, chunks_first=False)
    yield from blocked(big)
    yield from whole(small, chunks_first=True)  # small chunks: keep them as big as possible
    yield from blocked(small)
    for depth, queue in ((1, 0), (0, 1), (0, 0)):
        yield _Knobs(chunks[-1], streams[-1], depth, 0, queue)
    for depth, queue in ((1, 0), (0, 1), (0, 0)) if blocks else ():
        yield _Knobs(chunks[-1], streams[-1], depth, 0, queue, 0)


class _Model:
    """What each work unit holds while it is merged, for one plan (CPU RSS, in bytes)."""

    def __init__(self, plan: MergePlan, workers: int, gpu: bool) -> None:
        self.plan, self.workers, self.gpu = plan, workers, gpu
        self.count = len(plan.experts)
        self.inputs = self.count + (plan.base is not None)
        self.method = plan.method
        self._units: dict[tuple[int, int, int | None], list[WorkUnit]] = {}

    def units(self, knobs: _Knobs) -> list[WorkUnit]:
        key = (knobs.chunk, knobs.stream_bytes, knobs.block_bytes)
        if key not in self._units:
            from .reading import work_units

            device = "cuda" if self.gpu else None  # the GPU's units, as the engine makes them there
            self._units[key] = work_units(
                self.plan,
                chunk=knobs.chunk,
                device=device,
                stream_bytes=knobs.stream_bytes,
                block_bytes=knobs.block_bytes,
            )
        return self._units[key]

    def holds(self, unit: WorkUnit, chunk: int) -> int:
        """Bytes held while `unit` is merged, besides read-ahead and the writer's queue."""
        task = unit.task
        if not task.merge:
            return unit.in_nbytes  # read, then written as it is
        numel = unit.numel
        if unit.streamed:  # two row chunks of inputs (one merged, the next read), the whole result
            rows = task.shape[0]
            step = min(rows, max(1, chunk // max(1, numel // rows)))
            entries = numel // rows * step
            inputs = 2 * task.in_nbytes // rows * step
            return inputs + task.out_nbytes + self._scratch(entries) + self._select(numel, entries)
        held = unit.in_nbytes + unit.out_nbytes
        if self.gpu:  # inputs and result in the staging buffers (`pinned`), maths on the device
            return 0
        if unit.stats:  # a block, and (before the first) its tensor's figures found from row chunks
            return held + self._scratch(numel) + self._figures(unit, chunk)
        if self.method.raw_inputs:
            select = 0 if self.method.elementwise else self._select(numel, numel)
            return held + self._scratch(numel) + select
        if self.gpu:
            return held
        copies = numel * 4 * (self.inputs + self.count + 2)  # fp32 inputs and the method's own
        return held + copies + self.method.workspace(task.shape, self.count)

    def _figures(self, unit: WorkUnit, chunk: int) -> int:
        """The pass that finds a blocked tensor's figures (TIES: thresholds, then the balance):
        two row chunks of inputs, one chunk of merge thrown away, the threshold search."""
        task = unit.task
        rows, numel = task.shape[0], task.reference.numel
        step = min(rows, max(1, (unit.chunk or chunk) // max(1, numel // rows)))
        entries = numel // rows * step
        inputs = 2 * task.in_nbytes // rows * step
        return inputs + task.out_nbytes // rows * step + self._scratch(entries) + self._select(numel, entries)

    def _scratch(self, entries: int) -> int:
        """The kernels' fp32 blocks (task vectors and temporaries) on each worker thread."""
        return 0 if self.gpu else self.workers * (self.count + 2) * min(entries, TORCH_BLOCK) * 4

    def _select(self, numel: int, chunk: int) -> int:
        """A TIES threshold search: the C kernels' band buffers per worker, the |τ| band kept
        (bounded by BAND_ENTRIES) and its concatenation, and the radix-select histograms."""
        if self.gpu:
            return 0
        if numel <= SMALL:  # |τ| of the whole (small) tensor, selected directly
            return 2 * self.count * numel * 4
        band = min(self.count * (numel // 8), BAND_ENTRIES)
        blocks = self.workers * self.count * min(chunk, NATIVE_BLOCK) * 4
        return blocks + 2 * 4 * band + 2 * self.workers * self.count * HISTOGRAM_BYTES

    def pinned(self, knobs: _Knobs) -> int:
        """Page-locked staging buffers (a GPU merge; 0 on the CPU)."""
        if not self.gpu:
            return 0
        from .staging import pinned_layout

        return pinned_layout(self.units(knobs), knobs.depth, knobs.writer_queue, knobs.chunk).nbytes

    def peak(self, knobs: _Knobs) -> tuple[int, str]:
        """The planned peak and the unit that holds it: for each unit, what it holds, the units
        read ahead of it (the reader's rule: up to `depth` units within `read_ahead` bytes, at least
        one) and the results of the units before it that may still wait for the writer. On a GPU
        the merged units' share of that is in the staging buffers, held throughout."""
        units = self.units(knobs)
        best, where = 0, ""

        def host(u: WorkUnit, nbytes: int) -> int:  # what the host holds for it outside staging
            return 0 if self.gpu and u.task.merge else nbytes

        for i, unit in enumerate(units):
            ahead = 0
            if knobs.depth > 0:
                for j, nxt in enumerate(units[i + 1 : i + 1 + knobs.depth]):
                    if j > 0 and ahead + nxt.held_nbytes > knobs.read_ahead:
                        break
                    ahead += host(nxt, nxt.held_nbytes)
            queued = sum(host(u, u.out_nbytes) for u in units[max(0, i - knobs.writer_queue) : i])
            total = self.holds(unit, knobs.chunk) + ahead + queued
            if total > best:
                best, where = total, _describe(unit)
        if self.gpu:
            staged = [u for u in units if u.task.merge]
            if staged:
                where = _describe(max(staged, key=lambda u: max(u.held_nbytes, u.out_nbytes)))
            best += self.pinned(knobs)
        if self.prepass:
            best = max(best, self._prepass_peak(knobs))
        return best, where

    @property
    def prepass(self) -> bool:
        prepass = self.method.prepass
        return prepass is not None and prepass.reads([t.params for t in self.plan.tasks if t.merge]) > 0

    def _prepass_peak(self, knobs: _Knobs) -> int:
        """A whole-model pre-pass (TIES `trim_scope: model`) streams row blocks with read-ahead."""
        from .reading import work_units

        tasks = [t for t in self.plan.tasks if t.merge]
        units = work_units(self.plan, tasks, chunk=knobs.chunk, rows_for_all=True)
        held = max((u.in_nbytes for u in units), default=0)
        ahead = min(max(knobs.depth, 0) * held, max(held, knobs.read_ahead)) if knobs.depth else 0
        return held + ahead + self.workers * self.count * HISTOGRAM_BYTES

    def why(self) -> str:
        """Why the least a tensor needs cannot be lowered, for the refusal."""
        if self.method.elementwise:
            return ""
        if self.method.streams and self.method.block_stats is None:
            return f" ({self.method.name} holds each tensor's merged result whole)"
        if self.method.streams:
            return f" ({self.method.name} holds a row chunk of every input and its threshold search)"
        return f" ({self.method.name} merges whole tensors, in fp32)"


def _describe(unit: WorkUnit) -> str:
    shape = "×".join(str(d) for d in unit.task.shape)
    how = " read by rows" if unit.streamed else f" rows {unit.rows[0]}-{unit.rows[1]}" if unit.rows else ""
    return f"'{unit.task.name}' [{shape}]{how}"


# ---------------------------------------------------------------- the allocator


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 1 * MiB
# with row chunks under 1M entries (tight caps) their buffers are smaller than that: passed back
# to malloc's arenas by the thread that frees them, they pile up there (TIES at a 32 MiB cap on a
# 271M model: RSS 190 MiB over its plan); given back to the system instead, for more page faults
SMALL_CHUNK_MMAP_THRESHOLD = 128 * 1024


def return_freed_memory(threshold: int = MMAP_THRESHOLD) -> None:
    """Ask glibc's malloc to give every buffer of `threshold` bytes or more (1 MiB; see
    `MemoryPlan.mmap_threshold`) back to the system when freed.

    By default glibc raises its mmap threshold to the size of the largest buffer freed so far (up
    to 32 MiB), after which row chunks come from the heaps of the reader threads' arenas, whose
    freed holes stay resident: RSS then grows by a third over what the merge holds. A fixed
    threshold keeps RSS at the planned peak, for a page fault per fresh page (measured: ~0.1 s per
    GB read). A no-op where the C library is not glibc."""
    import ctypes.util  # here: ctypes is 5 ms of the header-only commands, which never call this

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, threshold)
    mallopt(M_TRIM_THRESHOLD, 2 * threshold)
