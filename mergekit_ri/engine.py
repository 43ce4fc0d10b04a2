"""Executes a `MergePlan`: read → compute → write, tensor by tensor, overlapped.

Reader threads (`reading`) fetch the next tensors' bytes while the current one is merged; a
writer thread puts finished tensors at their planned offsets. At most `prefetch` tensors wait in
memory, so the peak is a few tensors' worth whatever the model's size. The maths lives in
`methods` and `kernels`, the files in `io`.
"""

from __future__ import annotations

import shutil
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .io.artifacts import copy_tokenizer, write_config, write_heads, write_model_card
from .io.output import check_target, make_staging, publish
from .io.sources import ST_DTYPES, TensorReader
from .io.writer import ShardWriter, write_index
from .methods import TensorContext
from .kernels.parallel import single_threaded_ops
from . import kernels
from .kernels.select import BUCKETS, bits_to_float, bucket_of_kth
from .plan import PREFETCH_DEFAULT, MergePlan
from .reading import RowSource, WorkUnit, load_inputs, stream_inputs, work_units

Progress = Callable[[int], None]
LayerReport = Callable[[str, dict[str, float]], None]  # per solved layer: name, e.g. its loss before/after


@dataclass
class MergeResult:
    out: Path
    seconds: float
    bytes_read: int
    bytes_written: int
    shards: int
    tensors: int
    device: str
    files: list[str]


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


def compute(plan: MergePlan, unit: WorkUnit, raws: list[torch.Tensor], device: torch.device,
            thresholds: tuple[float, ...] | None, report: LayerReport | None = None,
            reader: TensorReader | None = None, pool: ThreadPoolExecutor | None = None) -> torch.Tensor:
    """One output tensor (or block of rows), on the CPU in its output dtype."""
    task = unit.task
    if not task.merge:
        return raws[0]
    source = None
    if unit.streamed:
        base = experts = None
        source = RowSource(reader, task, device, pool)
    else:
        base, experts = load_inputs(raws, plan.base is not None, device, fp32=not plan.method.raw_inputs)
    offset = unit.rows[0] * (task.reference.numel // task.shape[0]) if unit.rows else 0
    ctx = TensorContext(task.name, plan.recipe.seed, thresholds, offset=offset, report=report,
                        out_dtype=ST_DTYPES[task.out_dtype], source=source)
    merged = plan.method.fn(base, experts, task.params, ctx)
    return merged.to(ST_DTYPES[task.out_dtype]).cpu()


def model_thresholds(plan: MergePlan, reader: TensorReader, pool: ThreadPoolExecutor, device: torch.device,
                     prefetch: int, progress: Progress) -> tuple[float, ...]:
    """TIES `trim_scope: model`: each expert's exact k-th largest |τ| over all merged tensors.

    Two streaming passes of a radix select (high then low 16 bits of the fp32 magnitude), so the
    threshold equals that of a whole-model sort while memory stays at a few tensors.
    """
    tasks = [t for t in plan.tasks if t.merge]
    densities = {tuple(t.params.per_model["density"]) for t in tasks}
    if len(densities) != 1:
        raise UserError("trim_scope: model needs one density per model for all tensors (no filters or gradients)")
    density = next(iter(densities))
    total = sum(t.reference.numel for t in tasks)
    count = len(plan.experts)
    keep = [int(d * total) for d in density]

    def histograms(bucket: list[int] | None) -> torch.Tensor:
        hist = torch.zeros((count, BUCKETS), dtype=torch.int64, device=device)
        pin = device.type == "cuda"
        for unit, raws in stream_inputs(plan, reader, pool, prefetch, work_units(plan, tasks, device=device, rows_for_all=True), pin):
            base, experts = load_inputs(raws, True, device, fp32=False)
            wanted = None if bucket is None else [b if keep[i] > 0 else None for i, b in enumerate(bucket)]
            hist += kernels.magnitude_histograms(base.reshape(-1), experts.reshape(count, -1), wanted)
            progress(unit.in_nbytes)
        return hist

    high_hist = histograms(None)
    highs, ranks = zip(*(bucket_of_kth(high_hist[i], max(keep[i], 1)) for i in range(count)))
    low_hist = histograms(list(highs))
    thresholds = []
    for i in range(count):
        if keep[i] <= 0:
            thresholds.append(float("inf"))
        elif keep[i] >= total:
            thresholds.append(0.0)
        else:
            low, _ = bucket_of_kth(low_hist[i], ranks[i])
            thresholds.append(bits_to_float(highs[i], low))
    return tuple(thresholds)


def needs_model_prepass(plan: MergePlan) -> bool:
    first = next((t for t in plan.tasks if t.merge), None)
    return first is not None and first.params.globals.get("trim_scope") == "model"


def total_work_bytes(plan: MergePlan) -> int:
    """Bytes the progress bar will see: one read of everything, plus two for a model-wide pre-pass."""
    prepass = 2 * sum(t.in_nbytes for t in plan.tasks if t.merge) if needs_model_prepass(plan) else 0
    return plan.bytes_read + prepass


def run_merge(plan: MergePlan, out: Path, *, device: str = "auto", force: bool = False,
              prefetch: int = PREFETCH_DEFAULT, progress: Progress | None = None,
              report: LayerReport | None = None) -> MergeResult:
    """Merge into a hidden staging folder, then rename it to `out`."""
    started = time.perf_counter()
    target = resolve_device(device if device != "auto" else plan.recipe.device)
    inputs = [Path(m.folder or m.tensors[next(iter(m.tensors))].path) for m in ([plan.base] if plan.base else []) + plan.experts]
    check_target(out, inputs, force)
    advance = progress or (lambda n: None)
    staging = make_staging(out)
    try:
        with TensorReader() as reader, ThreadPoolExecutor(2, "ri-read") as reads, \
                ThreadPoolExecutor(1, "ri-write") as writes, ShardWriter(staging, plan) as writer:
            blocked = plan.method.raw_inputs and target.type == "cpu"
            with single_threaded_ops() if blocked else nullcontext():
                thresholds = model_thresholds(plan, reader, reads, target, prefetch, advance) \
                    if needs_model_prepass(plan) else None
                written: deque[Future] = deque()
                units = work_units(plan, device=target)
                for unit, raws in stream_inputs(plan, reader, reads, prefetch, units, target.type == "cuda"):
                    result = compute(plan, unit, raws, target, thresholds, report, reader, reads)
                    written.append(writes.submit(writer.write, unit.task, result, unit.rows))
                    while len(written) > 2:
                        written.popleft().result()
                    advance(unit.in_nbytes)
                for future in written:
                    future.result()
            write_heads(staging, plan, reader)
        write_index(staging, plan)
        write_config(staging, plan)
        copy_tokenizer(staging, plan)
        write_model_card(staging, plan)
        files = sorted(p.name for p in staging.iterdir())
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return MergeResult(out, time.perf_counter() - started, plan.bytes_read, plan.bytes_written,
                       len(plan.shards), len(plan.tasks), str(target), files)
