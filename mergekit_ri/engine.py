"""Executes a `MergePlan`: read → compute → write, tensor by tensor, overlapped.

Reader threads (`reading`) fetch the next tensors' bytes while the current one is merged; a
writer thread puts finished tensors at their planned offsets. How much is read ahead, how many
results wait for the writer and which tensors are read by rows is laid out by `memory` under the
merge's memory cap, so the peak is a few tensors' worth whatever the model's size. The maths lives
in `methods` and `kernels`, the files in `io`.
"""

from __future__ import annotations

import shutil
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .artifacts import copy_tokenizer, write_config, write_heads, write_model_card
from .errors import MergeInterrupted, ResumableError, UserError
from .io.contenthash import ReadHashes
from .io.manifest import FileRecord, file_manifest
from .io.output import (
    OutputLock,
    check_space,
    check_target,
    clean_stale,
    make_staging,
    mark_stopped,
    output_error,
    publish,
)
from .io.sources import ST_DTYPES, ModelSource, TensorReader
from .io.writer import ShardWriter, write_index
from .kernels import native
from .kernels.parallel import single_threaded_ops
from .memory import MemoryPlan, plan_memory, return_freed_memory
from .methods import TensorContext
from .methods.registry import PassFold, PassMap, PassScan
from .nonfinite import NonFiniteGuard
from .plan import PREFETCH_DEFAULT, MergePlan, TensorTask
from .reading import RowSource, WorkUnit, load_inputs, stream_inputs, work_units
from .resume import Journal, adopt_staging, fingerprint, journaled
from .staging import Download, Stager, Uploaded, stager_for
from .units import OutputUnit, UnitHashes, input_digests, plan_units, restore_input_digests, unit_tasks

if TYPE_CHECKING:
    from .distributed import Distributed
    from .ri.keys import RIProvenance, RIStatus

Progress = Callable[[int], None]
LayerReport = Callable[[str, dict[str, float]], None]  # per solved layer: name, e.g. its loss before/after


@dataclass(frozen=True)
class MergeResult:
    """What a merge wrote. `run_merge` fills in the merge itself; `mergekit_ri.merge` adds what
    the steps around it found (RI, per-layer figures, ξ), so callers get one record."""

    out: Path
    method: str
    device: str
    seconds: float
    tensors: int
    shards: int
    bytes_read: int
    bytes_written: int
    files: tuple[FileRecord, ...]  # every file written, relative to `out`; sha256 only if asked
    warnings: tuple[str, ...] = ()
    ri: RIStatus | None = None  # what RI did, when the recipe asks for it
    layers: Mapping[str, Mapping[str, float]] | None = None  # per solved layer, when reported
    interference: Mapping[str, float] | None = None  # ξ without/with RI, when asked
    units: Mapping[str, tuple[int, ...]] | None = None  # work units "kept" (resumed) and "computed"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device '{name}' requested but no CUDA GPU is available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device '{name}' does not exist: {torch.cuda.device_count()} GPU(s) visible")
    return device


def compute(
    plan: MergePlan,
    unit: WorkUnit,
    raws: list[torch.Tensor] | Uploaded,
    device: torch.device,
    thresholds: tuple[float, ...] | None,
    report: LayerReport | None = None,
    reader: TensorReader | None = None,
    pool: ThreadPoolExecutor | None = None,
    guard: NonFiniteGuard | None = None,
    staging: Stager | None = None,
    block_stats: dict[str, Any] | None = None,
) -> torch.Tensor | Download:
    """One output tensor (or block of rows) in its output dtype: on the CPU, or with GPU `staging`
    its copy back to a pinned buffer issued (`Download`; the writer waits for it). With a `guard`,
    NaN or ±Inf in its inputs are caught: by the C kernel as it merges, else by torch as they load.
    A block of a tensor whose method needs whole-tensor figures (`unit.stats`) gets them from
    `block_stats` (tensor name → figures), found by reading the tensor by rows at its first block."""
    task = unit.task
    if not task.merge:
        return raws[0]
    in_kernel = guard is not None and guard.native_checks(task, device)
    torch_check = guard.check if guard is not None and not in_kernel else None
    source = None
    if unit.streamed:
        base = experts = None
        source = RowSource(reader, task, device, pool, check=torch_check, chunk=unit.chunk, staging=staging)
    else:
        base, experts = load_inputs(raws, task.base is not None, device, fp32=not plan.method.raw_inputs)
        if torch_check is not None:
            torch_check(task, unit.rows, base, experts)
    offset = unit.rows[0] * (task.reference.numel // task.shape[0]) if unit.rows else 0
    ctx = TensorContext(
        task.name,
        plan.recipe.seed,
        thresholds,
        offset=offset,
        report=report,
        out_dtype=ST_DTYPES[task.out_dtype],
        source=source,
    )
    if unit.stats:
        ctx = replace(
            ctx, block_stats=_block_stats(plan, unit, ctx, reader, pool, device, staging, block_stats)
        )
    native.WATCH.start()
    merged = plan.method.fn(base, experts, task.params, ctx)
    if in_kernel:
        _after_kernel(guard, unit, base, experts, source)
    merged = merged.to(ST_DTYPES[task.out_dtype])
    return staging.download(merged) if staging is not None else merged.cpu()


def _block_stats(
    plan: MergePlan,
    unit: WorkUnit,
    ctx: TensorContext,
    reader: TensorReader | None,
    pool: ThreadPoolExecutor | None,
    device: torch.device,
    staging: Stager | None,
    known: dict[str, Any] | None,
) -> Any:
    """The whole-tensor figures a block of `unit.task` is merged with (`MethodSpec.block_stats`),
    found from the tensor read by row chunks — once per tensor when `known` keeps them (a merge's
    units come in order, so only the current tensor's are kept). Its inputs are checked for NaN
    and Inf block by block, as they are merged."""
    task = unit.task
    if known is not None and task.name in known:
        return known[task.name]
    assert reader is not None and pool is not None and plan.method.block_stats is not None
    source = RowSource(reader, task, device, pool, chunk=unit.chunk, staging=staging)
    whole = replace(ctx, offset=0, source=source)
    figures = plan.method.block_stats(source, task.params, whole)
    if known is not None:
        known.clear()
        known[task.name] = figures
    return figures


def _after_kernel(
    guard: NonFiniteGuard,
    unit: WorkUnit,
    base: torch.Tensor | None,
    experts: torch.Tensor | None,
    source: RowSource | None,
) -> None:
    """What the C kernel saw; where it did not see every entry (a chunk it could not take went to
    torch), the inputs are checked here instead."""
    if native.WATCH.nonfinite:
        guard.found(unit.task, unit.rows)
    elif native.WATCH.entries < unit.numel:
        if source is None:
            guard.check(unit.task, unit.rows, base, experts)
        else:
            for _, chunk_base, chunk_experts in source.chunks():
                guard.check(unit.task, None, chunk_base, chunk_experts)


def prepass_reads(plan: MergePlan) -> int:
    """How many times the method's whole-model pre-pass (`MethodSpec.prepass`) reads every merged
    tensor for this plan's parameters: 0 when it has none or needs none."""
    prepass = plan.method.prepass
    return prepass.reads([t.params for t in plan.tasks if t.merge]) if prepass is not None else 0


def run_prepass(
    plan: MergePlan,
    reader: TensorReader,
    pool: ThreadPoolExecutor,
    device: torch.device,
    memory: MemoryPlan,
    progress: Progress,
    remote: PassScan | None = None,
) -> tuple[float, ...] | None:
    """The method's pre-pass over the whole model, if it needs one (e.g. TIES `trim_scope: model`):
    the engine streams every merged tensor to it as often as it asks, a few tensors in memory, or
    `remote` spreads each pass over a cluster's tasks."""
    if not prepass_reads(plan):
        return None
    tasks = [t for t in plan.tasks if t.merge]

    def scan(part: PassMap, fold: PassFold) -> Any:
        return scan_tasks(plan, tasks, reader, pool, device, memory, part, fold, progress)

    return plan.method.prepass.run([t.params for t in tasks], remote or scan)


def scan_tasks(
    plan: MergePlan,
    tasks: list[TensorTask],
    reader: TensorReader,
    pool: ThreadPoolExecutor,
    device: torch.device,
    memory: MemoryPlan,
    part: PassMap,
    fold: PassFold,
    progress: Progress,
) -> Any:
    """One pre-pass read of `tasks` (merged tensors, by row blocks): `part` of each, folded."""
    count = len(plan.experts)
    units = work_units(plan, tasks, chunk=memory.chunk, device=device, rows_for_all=True)
    folded = None
    for unit, raws in stream_inputs(
        plan, reader, pool, memory.depth, units, device.type == "cuda", memory.read_ahead
    ):
        base, experts = load_inputs(raws, True, device, fp32=False)
        piece = part(base.reshape(-1), experts.reshape(count, -1))
        folded = piece if folded is None else fold(folded, piece)
        progress(unit.in_nbytes)
    return folded


def total_work_bytes(plan: MergePlan) -> int:
    """Bytes the progress bar will see: one read of everything, plus the pre-pass's reads."""
    return plan.bytes_read + prepass_reads(plan) * sum(t.in_nbytes for t in plan.tasks if t.merge)


def source_paths(sources: list[ModelSource]) -> list[Path]:
    """Every path read of these models: weight files, folders and what the folders hold."""
    paths: list[Path] = []
    for model in sources:
        paths += model.files()
        if model.folder is not None:
            try:
                paths += list(model.folder.iterdir())
            except OSError:
                pass
    return paths


def input_paths(plan: MergePlan) -> list[Path]:
    """What the output may never be, contain or lie inside: every path the merge reads, and
    `plan.protected` (the experts as given, when RI merges adapted copies)."""
    return list(plan.protected) + source_paths(([plan.base] if plan.base else []) + plan.experts)


def run_merge(
    plan: MergePlan,
    out: Path,
    *,
    device: str = "auto",
    force: bool = False,
    prefetch: int = PREFETCH_DEFAULT,
    progress: Progress | None = None,
    report: LayerReport | None = None,
    checksums: bool = False,
    provenance: RIProvenance | None = None,
    model_card: bool = True,
    resume: bool = False,
    distributed: Distributed | None = None,
    unit_bytes: int | None = None,
    fingerprint_inputs: bool = False,
) -> MergeResult:
    """Merge into a hidden staging folder, then rename it to `out` (under the output's lock).

    The staging folder journals each finished work unit (`resume`); with `resume`, the one an
    interrupted merge left is adopted and only its unfinished units are computed. A
    KeyboardInterrupt (Ctrl-C; SIGTERM in the CLI) once a unit is journaled keeps the staging
    folder and raises `MergeInterrupted`; before that, the folder is removed as on any failure. `distributed`
    runs the units elsewhere (Ray tasks) instead of in this process."""
    started = time.perf_counter()
    target = resolve_device(device if device != "auto" else plan.recipe.device)
    if distributed is not None:
        target = distributed.device(device if device != "auto" else plan.recipe.device)
    out = Path(out)
    staging = None
    journal: Journal | None = None
    units = plan_units(plan, unit_bytes)
    try:
        check_target(out, input_paths(plan), force)
        out.parent.mkdir(parents=True, exist_ok=True)
        with OutputLock(out):
            staging = adopt_staging(out) if resume else None
            plan.warnings.extend(clean_stale(out, keep=staging))
            check_target(out, input_paths(plan), force)  # again, now that no other merge can race us
            check_space(out, plan.bytes_written)
            if staging is None:
                if resume:
                    plan.warnings.append(f"--resume: no interrupted merge of {out} to resume; merging it all")
                staging = make_staging(out)
            journal = Journal.begin(staging, out, plan, units, fingerprint(plan, target.type), resume)
            if resume and journal.kept:
                plan.warnings.append(
                    f"resuming {out}: {len(journal.kept)} of {len(units)} work units finished and verified, "
                    f"{len(units) - len(journal.kept)} to compute"
                )
            files, nonfinite = _merge_into(
                plan,
                staging,
                target,
                prefetch,
                progress or (lambda n: None),
                report,
                checksums,
                provenance,
                model_card,
                journal,
                units,
                distributed,
                fingerprint_inputs,
            )
            plan.warnings.extend(nonfinite)
            publish(staging, out, force)
            staging = None
    except OSError as exc:
        raise output_error(exc, out, staging, plan.bytes_written) from None
    except ResumableError:
        if staging is not None:
            mark_stopped(staging)
        staging = None  # its finished units stay for --resume
        raise
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM as the CLI turns it: keep what is finished
        kept = journaled(staging, journal) if staging is not None else 0
        if not kept:
            raise
        if journal is not None:
            journal.close()
        mark_stopped(staging)
        staging = None
        raise MergeInterrupted(out, kept, len(units)) from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return MergeResult(
        out,
        plan.method.name,
        str(target),
        time.perf_counter() - started,
        len(plan.tasks),
        len(plan.shards),
        plan.bytes_read,
        plan.bytes_written,
        files,
        tuple(plan.warnings),
        units={
            "kept": journal.kept,
            "computed": tuple(i for i in range(len(units)) if i not in journal.kept),
        },
    )


def merge_tasks(
    plan: MergePlan,
    tasks: list[TensorTask],
    reader: TensorReader,
    reads: ThreadPoolExecutor,
    writer: ShardWriter,
    target: torch.device,
    memory: MemoryPlan,
    advance: Progress,
    report: LayerReport | None,
    thresholds: tuple[float, ...] | None,
    guard: NonFiniteGuard,
) -> dict[str, dict[str, int]]:
    """Read, merge and write `tasks`, in order: the reads run ahead, a thread writes behind, as
    far as the memory plan allows. On a GPU the next unit's inputs are copied to the device while
    this one is merged, and results are copied back while the next is (`staging`); returns the
    staging buffers' use (empty on the CPU)."""
    units = work_units(
        plan,
        tasks,
        chunk=memory.chunk,
        device=target,
        stream_bytes=memory.stream_bytes,
        block_bytes=memory.block_bytes,
    )
    stager = stager_for(target, units, memory.depth, memory.writer_queue, memory.chunk)
    writes = ThreadPoolExecutor(1, "ri-write")
    block_stats: dict[str, Any] = {}  # the current tensor's figures, when it is merged by blocks
    try:
        written: deque[Future] = deque()

        def merge(unit: WorkUnit, inputs: list[torch.Tensor] | Uploaded) -> None:
            result = compute(
                plan, unit, inputs, target, thresholds, report, reader, reads, guard, stager, block_stats
            )
            written.append(writes.submit(stager.write, writer, unit.task.name, result, unit.rows))
            del result  # held by the writer's queue alone: freed once written
            while len(written) > memory.writer_queue:
                written.popleft().result()
            advance(unit.in_nbytes)

        staged: deque[tuple[WorkUnit, list[torch.Tensor] | Uploaded]] = deque()
        pin = target.type == "cuda"
        for unit, raws in stream_inputs(
            plan, reader, reads, memory.depth, units, pin, memory.read_ahead, stager.inputs
        ):
            staged.append((unit, stager.upload(raws)))  # on a GPU: its copy issued now
            del raws
            if len(staged) > stager.lookahead:
                merge(*staged.popleft())
        while staged:
            merge(*staged.popleft())
        for future in written:
            future.result()
    finally:
        _join_writer(writes)
    return stager.stats()


def write_units(
    plan: MergePlan,
    folder: Path,
    units: list[OutputUnit],
    reader: TensorReader,
    reads: ThreadPoolExecutor,
    target: torch.device,
    memory: MemoryPlan,
    advance: Progress,
    report: LayerReport | None,
    thresholds: tuple[float, ...] | None,
    guard: NonFiniteGuard,
    finished: Callable[[OutputUnit, str], None],
    kept: list[OutputUnit] | None = None,
    **writer_options: Any,
) -> ShardWriter:
    """Compute `units` into their byte ranges of `folder`'s shard files, each unit's sha256 handed
    to `finished` once its last byte is written (the driver's merge and a worker's alike); the
    ranges of `kept` units are already there (a resume). Returns the closed writer, whose file
    hashes (`hash_files`) cover the kept ranges too."""
    hashes = UnitHashes(plan, folder, units, finished)
    with ShardWriter(
        folder, plan.shard_layouts(), on_write=hashes, hash_limit=memory.file_hash_bytes, **writer_options
    ) as writer:
        for unit in kept or []:
            writer.kept(unit.shard, unit.start, unit.end)
        hashes.empty_units(units)
        merge_tasks(
            plan,
            unit_tasks(plan, units),
            reader,
            reads,
            writer,
            target,
            memory,
            advance,
            report,
            thresholds,
            guard,
        )
    return writer


def _join_writer(writes: ThreadPoolExecutor) -> None:
    """Wait for the writes already queued (a few tensors: the units they finish are journaled and
    kept). A second Ctrl-C drops the queued ones but still waits for the write in progress, whose
    shard file is closed next: never a write into a closed (or reused) file descriptor."""
    try:
        writes.shutdown(wait=True)
    except KeyboardInterrupt:
        writes.shutdown(wait=False, cancel_futures=True)
        while True:
            try:
                writes.shutdown(wait=True)
                break
            except KeyboardInterrupt:
                continue
        raise


def _merge_into(
    plan: MergePlan,
    staging: Path,
    target: torch.device,
    prefetch: int,
    advance: Progress,
    report: LayerReport | None,
    checksums: bool = False,
    provenance: RIProvenance | None = None,
    model_card: bool = True,
    journal: Journal | None = None,
    units: list[OutputUnit] | None = None,
    distributed: Distributed | None = None,
    fingerprint_inputs: bool = False,
) -> tuple[tuple[FileRecord, ...], list[str]]:
    """Every file of the merged checkpoint, written into `staging`: (file names, the warnings about
    non-finite inputs merged under `on_nonfinite: warn`). Units the journal has as finished are
    not computed again."""
    memory = plan_memory(plan, prefetch=prefetch, device=target.type)
    return_freed_memory(memory.mmap_threshold)
    units = units if units is not None else plan_units(plan)
    journal = journal or Journal.begin(staging, staging, plan, units, {}, False)
    todo = [u for u in units if u.index not in journal.done]
    advance(sum(u.in_nbytes for u in units if u.index in journal.done))
    written: dict[str, str] = {}  # shard files' sha256, hashed as they were written
    content = (
        ReadHashes(memory.content_hash_bytes) if model_card and fingerprint_inputs else None
    )  # for the card
    with TensorReader() as reader, ThreadPoolExecutor(2, "ri-read") as reads:
        guard = NonFiniteGuard(plan, reader, plan.recipe.on_nonfinite)
        blocked = plan.method.raw_inputs and target.type == "cpu"
        with single_threaded_ops() if blocked else nullcontext():
            remote = None
            if distributed is not None and prepass_reads(plan):
                remote = distributed.scan(plan, units, target, prefetch, advance)
            thresholds = run_prepass(plan, reader, reads, target, memory, advance, remote)
            reader.observe = content  # the main pass's reads (and the heads'), not the pre-pass's
            if distributed is not None:
                with ShardWriter(staging, plan.shard_layouts(), reuse=True):
                    pass  # the shard files, created here: the workers fill their ranges
                nonfinite = distributed.run(
                    plan, staging, todo, target, prefetch, thresholds, journal, advance, content is not None
                )
            else:
                seen = len(guard.warnings)

                def finished(unit: OutputUnit, digest: str) -> None:
                    nonlocal seen
                    inputs = input_digests(plan, unit, content) if content is not None else None
                    journal.record(unit, digest, plan, guard.warnings[seen:], inputs)
                    seen = len(guard.warnings)

                writer = write_units(
                    plan,
                    staging,
                    todo,
                    reader,
                    reads,
                    target,
                    memory,
                    advance,
                    report,
                    thresholds,
                    guard,
                    finished,
                    kept=[u for u in units if u.index in journal.done],
                    reuse=True,
                    hash_files=checksums,
                )
                nonfinite = list(guard.warnings)
                if writer.hashes is not None:
                    written = {
                        p.relative_to(staging).as_posix(): d for p, d in writer.hashes.digests().items()
                    }
        write_heads(staging, plan, reader)
        reader.observe = None
    fingerprints: dict[str, str | None] = {}
    if content is not None:  # the units this run did not read: their inputs' digests as recorded
        for unit in units:
            restore_input_digests(plan, unit, journal.inputs.get(unit.index), content)
        fingerprints = {m.label: content.model(m) for m in plan.sources}
    nonfinite = list(dict.fromkeys(journal.warnings + nonfinite))
    journal.finish()
    write_index(staging, plan.shard_layouts())
    write_config(staging, plan)
    copy_tokenizer(staging, plan)
    if model_card:  # README.md and mergekit_config.yml (mergekit's --no-write-model-card leaves them out)
        write_model_card(staging, plan, provenance, fingerprints)
    return file_manifest(staging, checksums, written), nonfinite
