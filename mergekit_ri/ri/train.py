"""Training adapted experts into the cache: one device in this process, or several in parallel.

Every cache entry `<key>/<expert>/` is guarded by a file lock `<key>/<expert>.lock` held around
"is it cached? → train → publish": two merges started together on a cold cache do not both
train; the second waits and then finds the entry. An entry is written into a temporary folder
beside it, given a manifest of its files' sha256 (`cache.py`) and renamed into place; an entry
found damaged (tampered, truncated, no manifest) is discarded under its lock and trained again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..heads import head_selector
from ..io.sources import ModelSource, TensorReader, load_source
from .adapt import RISettings, StepReport, adapt_expert, head_module_name
from .cache import discard, entry_problem, warn_bad_entry, write_manifest
from .data import AuxiliaryData

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process lock (documented)
    fcntl = None

ReportFactory = Callable[[str, int], StepReport]


@dataclass
class TrainJob:
    """Everything a (possibly separate) process needs to adapt some of the experts."""

    experts: list[ModelSource]
    base: ModelSource
    model_class: Any
    heads: str
    aux: AuxiliaryData
    settings: RISettings
    folders: dict[str, Path]  # expert label → its cache entry
    seeds: dict[str, int]


def is_cached(folder: Path) -> bool:
    """A complete entry whose files match its manifest (each file hashed: a cache hit costs a read)."""
    return entry_problem(folder) is None


def lock_path(folder: Path) -> Path:
    return folder.parent / f"{folder.name}.lock"


@contextlib.contextmanager
def cache_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on one cache entry (blocks while another process or thread holds it)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path(folder), "a+") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def train_experts(
    job: TrainJob, labels: list[str], device: torch.device, report: ReportFactory | None = None
) -> dict[str, bool]:
    """Adapt the experts named by `labels` on `device` into their cache entries, one at a time.

    Returns label → True if trained here, False if another merge had cached it meanwhile."""
    done: dict[str, bool] = {}
    loaded = None
    for label in labels:
        folder = job.folders[label]
        with cache_lock(folder):
            problem = entry_problem(folder)
            if problem is None:
                done[label] = False
                continue
            if problem != "missing":
                warn_bad_entry(folder, problem)
                discard(folder)
            if loaded is None:
                loaded = _load(job, labels)
            models, heads, base_model, head_name, is_head = loaded
            source = next(m for m in job.experts if m.label == label)
            others = [head for other, head in heads.items() if other != label]
            batches = job.aux.batches(job.settings.batch_size, job.settings.steps, job.seeds[label])
            step_report = report(label, job.settings.steps) if report else None
            adapted = adapt_expert(
                models.pop(label),
                base_model,
                others,
                head_name,
                batches,
                job.settings,
                device,
                step_report,
                label=label,
            )
            save_adapted(adapted, source, folder, is_head)
            del adapted
            done[label] = True
    return done


def _load(job: TrainJob, labels: list[str]):
    """The experts to adapt (whole), every expert's head, the base, the head's module name."""
    is_head = head_selector(job.heads, job.experts[0].config(), "resolve_interference")
    models, heads, head_name = {}, {}, None
    for source in job.experts:
        model = job.model_class.from_pretrained(source.folder, use_safetensors=True).eval()
        head_name = head_name or head_module_name(model, is_head)
        heads[source.label] = model.get_submodule(head_name)
        if source.label in labels:
            models[source.label] = model
    base_model = job.model_class.from_pretrained(
        job.base.folder,
        config=next(iter(models.values())).config,
        ignore_mismatched_sizes=True,
        use_safetensors=True,
    ).eval()
    return models, heads, base_model, head_name, is_head


def save_adapted(adapted, source: ModelSource, folder: Path, is_head) -> None:
    """save_pretrained into a temporary folder, check names and heads against the original, rename."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        adapted.to("cpu").save_pretrained(staging)
        saved = load_source(str(staging), source.label)
        if set(saved.tensors) != set(source.tensors):
            raise RuntimeError(
                f"RI: transformers saved {source.label} under other tensor names than its checkpoint; "
                f"e.g. {sorted(set(saved.tensors) ^ set(source.tensors))[:3]}"
            )
        with TensorReader() as reader:
            for name, ref in source.tensors.items():
                if is_head(name) and not torch.equal(reader.read(ref), reader.read(saved.tensors[name])):
                    raise RuntimeError(f"RI changed head tensor {name} of {source.label}")
        for name in os.listdir(source.folder):  # tokenizer/preprocessor files travel with the expert
            if (
                not (staging / name).exists()
                and not name.endswith(".safetensors")
                and name != "model.safetensors.index.json"
            ):
                if (source.folder / name).is_file():
                    shutil.copyfile(source.folder / name, staging / name)
        write_manifest(staging)
        publish_entry(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish_entry(staging: Path, folder: Path) -> None:
    """Rename a complete entry (manifest written) into place, replacing a damaged leftover; the
    caller holds the entry's lock. Readers see the whole entry or none."""
    discard(folder)
    os.rename(staging, folder)


def train_parallel(
    job: TrainJob, labels: list[str], devices: list[torch.device], report: ReportFactory | None = None
) -> dict[str, bool]:
    """`train_experts` in one spawned worker process per device, experts dealt round-robin.

    Each expert gets the same seed and batches as in the sequential run, so the results are the
    same up to floating-point reduction order. Progress comes back through a queue and is
    reported from this process; a worker's error (a UserError included) is raised here."""
    import queue as queue_module
    from concurrent.futures import ProcessPoolExecutor, wait

    import torch.multiprocessing as torch_mp

    groups = [(devices[i], labels[i :: len(devices)]) for i in range(min(len(devices), len(labels)))]
    context = torch_mp.get_context("spawn")
    progress = context.Queue() if report is not None else None
    threads = max(1, (os.cpu_count() or 1) // len(groups))
    bars: dict[str, StepReport] = {}

    def drain(timeout: float) -> None:
        while progress is not None:
            try:
                label, steps, step, l1, l2 = progress.get(timeout=timeout)
            except queue_module.Empty:
                return
            if label not in bars:
                bars[label] = report(label, steps)
            bars[label](step, l1, l2)
            timeout = 0.0

    with ProcessPoolExecutor(
        len(groups), mp_context=context, initializer=_worker_init, initargs=(progress, threads)
    ) as pool:
        futures = [pool.submit(_worker, job, group, str(device)) for device, group in groups]
        pending = set(futures)
        while pending:
            pending = wait(pending, timeout=0.2).not_done
            drain(0.0)
        drain(0.5)  # the last steps' messages may trail the results
    done: dict[str, bool] = {}
    for future in futures:
        done.update(future.result())  # re-raises a worker's exception
    return done


_PROGRESS = None


def _worker_init(progress, threads: int) -> None:
    global _PROGRESS
    _PROGRESS = progress
    torch.set_num_threads(threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _worker(job: TrainJob, labels: list[str], device: str) -> dict[str, bool]:
    target = torch.device(device)
    if target.type == "cuda" and target.index is not None:
        torch.cuda.set_device(target)
    return train_experts(job, labels, target, _queue_report if _PROGRESS is not None else None)


def _queue_report(label: str, steps: int) -> StepReport:
    return lambda step, l1, l2: _PROGRESS.put((label, steps, step, l1, l2))
