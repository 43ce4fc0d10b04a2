"""The benchmark's stages, each cached under the output folder.

    data/<task>.npz            uint8 splits of every task
    base/                      the pretrained ViT (save_pretrained; its pretext head is unused)
    experts/<task>/            the expert (save_pretrained, safetensors) with its frozen probe
                               head, and metrics.json (probe and expert accuracy)
    auxiliary.safetensors      RI's unlabeled inputs, key "inputs": float32 [M, 1, 28, 28]
    recipes/<key>.yaml         every recipe the benchmark handed to ri-merge
    results/<key>.json         per-task validation and test accuracy of one merge

Expert training and merge jobs run in a pool of worker processes, one torch thread each: on two
cores, two single-threaded jobs beat one two-threaded job, and single-threaded runs give the same
numbers whichever worker gets them.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import cache
from .data import Sizes, Split, Task, build_tasks, make_auxiliary, make_pretext, pixel_values
from .model import Arch, Schedule, accuracy, features, finetune_expert, fit_probe, pretrain, with_head

DATA_VERSION = 2  # bump when a generator changes: rebuilds the data and everything after it


@dataclass(frozen=True)
class RISettings:
    """The recipe's `resolve_interference` section at tiny scale (see benchmark_notes: the paper's
    lr 1e-6 / 2500 steps is for CLIP-size weights and barely moves a model this small)."""

    steps: int = 300
    lr: float = 1e-4
    batch_size: int = 128
    alpha: float = 1.0
    weight_decay: float = 1e-4


@dataclass(frozen=True)
class Config:
    """Everything that decides the numbers."""

    tasks: tuple[str, ...]
    sizes: Sizes
    arch: Arch
    pretext_samples: int
    pretrain: Schedule
    probe_shots: int  # examples per class the head is fitted on (0: the whole training split)
    probe_weight_decay: float
    expert: Schedule
    grid: tuple[float, ...]
    aux_samples: int
    ri: RISettings = field(default_factory=RISettings)
    seed: int = 0


@dataclass(frozen=True)
class Paths:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def base(self) -> Path:
        return self.root / "base"

    def expert(self, task: str) -> Path:
        return self.root / "experts" / task

    @property
    def auxiliary(self) -> Path:
        return self.root / "auxiliary.safetensors"

    @property
    def recipes(self) -> Path:
        return self.root / "recipes"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def merges(self) -> Path:
        return self.root / "merged"


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------- worker pool


def quiet_torch() -> None:
    """One thread, and no transformers warnings or progress bars (the table is the output)."""
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def pool(workers: int) -> ProcessPoolExecutor:
    """Spawned workers (no forked torch state), one thread each."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=quiet_torch)


def run_all(
    executor: ProcessPoolExecutor,
    fn: Callable[..., Any],
    jobs: Iterable[tuple],
    on_done: Callable[[Any], None],
) -> list[Any]:
    """Submit every job, report each as it finishes, return results in job order."""
    futures = [executor.submit(fn, *job) for job in jobs]
    pending = set(futures)
    while pending:
        done = {f for f in pending if f.done()}
        for f in done:
            on_done(f.result())
        pending -= done
        if pending:
            time.sleep(0.05)
    return [f.result() for f in futures]


# ---------------------------------------------------------------- data


def save_task(task: Task, path: Path) -> None:
    np.savez_compressed(
        path,
        labels=np.array(task.labels),
        source=np.array(task.source),
        **{f"{s}_{k}": getattr(getattr(task, s), k) for s in ("train", "val", "test") for k in ("x", "y")},
    )


def load_task(path: Path) -> Task:
    with np.load(path) as f:
        splits = {s: Split(f[f"{s}_x"], f[f"{s}_y"]) for s in ("train", "val", "test")}
        return Task(path.stem, [str(v) for v in f["labels"]], source=str(f["source"]), **splits)


def data_inputs(cfg: Config) -> dict[str, Any]:
    return {"version": DATA_VERSION, "tasks": cfg.tasks, "sizes": cfg.sizes, "seed": cfg.seed}


def build_data(cfg: Config, paths: Paths, rebuild: bool) -> list[Task]:
    def build(folder: Path) -> None:
        for task in build_tasks(list(cfg.tasks), cfg.sizes, cfg.seed):
            save_task(task, folder / f"{task.name}.npz")

    if cache.stage(paths.data, data_inputs(cfg), build, rebuild):
        log(f"data: built {len(cfg.tasks)} tasks")
    return [load_task(paths.data / f"{name}.npz") for name in cfg.tasks]


# ---------------------------------------------------------------- base


def base_inputs(cfg: Config) -> dict[str, Any]:
    return {
        "data": data_inputs(cfg),
        "arch": cfg.arch,
        "samples": cfg.pretext_samples,
        "schedule": cfg.pretrain,
    }


def build_base(cfg: Config, paths: Paths, tasks: list[Task], rebuild: bool) -> bool:
    def build(folder: Path) -> None:
        x, y, labels = make_pretext(cfg.pretext_samples, cfg.seed, {t.name: t.train.x for t in tasks})
        model = pretrain(cfg.arch, pixel_values(x), torch.from_numpy(y), labels, cfg.pretrain, cfg.seed)
        model.save_pretrained(folder)

    return cache.stage(paths.base, base_inputs(cfg), build, rebuild)


def load_vit(folder: Path):
    from transformers import ViTForImageClassification

    return ViTForImageClassification.from_pretrained(folder).eval()


# ---------------------------------------------------------------- probe heads and experts


def expert_inputs(cfg: Config, task: str) -> dict[str, Any]:
    return {
        "base": base_inputs(cfg),
        "task": task,
        "probe_shots": cfg.probe_shots,
        "probe_weight_decay": cfg.probe_weight_decay,
        "expert": cfg.expert,
    }


def probe_split(split: Split, shots: int) -> Split:
    """The first `shots` training examples of each class (all of them for 0): the head's data."""
    if shots <= 0:
        return split
    keep = np.concatenate([np.flatnonzero(split.y == c)[:shots] for c in np.unique(split.y)])
    return Split(split.x[keep], split.y[keep])


def train_expert(
    root: str,
    task_name: str,
    arch: Arch,
    probe_shots: int,
    probe_weight_decay: float,
    schedule: Schedule,
    seed: int,
) -> dict[str, Any]:
    """Worker: fit the task's probe head on pretrained features, fine-tune the backbone under it,
    save the expert, and measure probe and expert accuracy (the expert as reloaded from disk)."""
    paths = Paths(Path(root))
    start = time.perf_counter()
    task = load_task(paths.data / f"{task_name}.npz")
    base = load_vit(paths.base)
    shots = probe_split(task.train, probe_shots)
    head = fit_probe(
        features(base, shots.pixel_values()),
        torch.from_numpy(shots.y),
        task.num_labels,
        probe_weight_decay,
        seed=seed,
    )
    model = with_head(base, head, task.labels, arch)
    probe = {"val": accuracy(model, task.val), "test": accuracy(model, task.test)}
    losses = finetune_expert(model, task.train, schedule, seed + 1)
    folder = paths.expert(task_name)
    model.save_pretrained(folder)
    reloaded = load_vit(folder)
    metrics = {
        "task": task_name,
        "probe": probe,
        "expert": {"val": accuracy(reloaded, task.val), "test": accuracy(reloaded, task.test)},
        "losses": losses,
        "seconds": time.perf_counter() - start,
    }
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def build_experts(
    cfg: Config, paths: Paths, executor: ProcessPoolExecutor, rebuild: bool
) -> dict[str, dict[str, Any]]:
    """Train the experts whose cache is stale; return every task's metrics."""
    stale = [t for t in cfg.tasks if rebuild or not cache.is_fresh(paths.expert(t), expert_inputs(cfg, t))]
    for task in stale:
        if paths.expert(task).exists():
            shutil.rmtree(paths.expert(task))

    def done(metrics: dict[str, Any]) -> None:
        cache.mark_done(paths.expert(metrics["task"]), expert_inputs(cfg, metrics["task"]))
        log(
            f"expert {metrics['task']:>10}: probe {metrics['probe']['test']:.3f} → expert "
            f"{metrics['expert']['test']:.3f} ({metrics['seconds']:.0f}s)"
        )

    run_all(
        executor,
        train_expert,
        [
            (str(paths.root), t, cfg.arch, cfg.probe_shots, cfg.probe_weight_decay, cfg.expert, cfg.seed)
            for t in stale
        ],
        done,
    )
    return {t: json.loads((paths.expert(t) / "metrics.json").read_text()) for t in cfg.tasks}


# ---------------------------------------------------------------- RI's auxiliary data


def build_auxiliary(cfg: Config, paths: Paths) -> Path:
    """Written once: `inputs`, model-ready pixel_values from a source no task draws from."""
    from safetensors.torch import save_file

    inputs = {"version": DATA_VERSION, "samples": cfg.aux_samples, "seed": cfg.seed}
    mark = paths.root / "auxiliary.fingerprint"
    if paths.auxiliary.exists() and mark.exists() and mark.read_text() == cache.canonical(inputs):
        return paths.auxiliary
    save_file({"inputs": make_auxiliary(cfg.aux_samples, cfg.seed).contiguous()}, paths.auxiliary)
    mark.write_text(cache.canonical(inputs))
    return paths.auxiliary


# ---------------------------------------------------------------- merged models


def heads_untouched(merged: Path, experts: dict[str, Path]) -> bool:
    """Every head the merge wrote equals, bit for bit, the head of the expert it came from."""
    from safetensors.torch import load_file

    index = json.loads((merged / "heads" / "index.json").read_text())
    for label, expert in experts.items():
        written = load_file(merged / "heads" / index["heads"][label]["file"])
        original = {k: v for k, v in load_file(expert / "model.safetensors").items() if k in written}
        if set(original) != set(written) or not all(torch.equal(written[k], original[k]) for k in written):
            return False
    return True


def evaluate_merged(merged: Path, tasks: list[Task], splits: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Each task's accuracy on `splits`, through `load_with_head` as a user would."""
    from transformers import AutoModelForImageClassification

    from mergekit_ri.heads import load_with_head

    scores: dict[str, dict[str, float]] = {split: {} for split in splits}
    for task in tasks:
        model = load_with_head(merged, task.name, AutoModelForImageClassification).eval()
        for split in splits:
            scores[split][task.name] = accuracy(model, getattr(task, split))
    return scores


def result_path(paths: Paths, key: str) -> Path:
    return paths.results / f"{key}.json"


def cached_result(paths: Paths, key: str) -> dict[str, Any]:
    path = result_path(paths, key)
    return json.loads(path.read_text()) if path.exists() else {}


def merge_and_evaluate(
    root: str,
    key: str,
    label: str,
    recipe_path: str,
    task_names: list[str],
    splits: tuple[str, ...],
    env_extra: dict[str, str],
) -> dict[str, Any]:
    """Worker: merge with the API, check the heads, evaluate `splits`, delete the merged folder,
    and add the scores to the job's result file, where the next run finds them."""
    from .merging import merge_recipe

    paths = Paths(Path(root))
    out = paths.merges / key
    outcome = merge_recipe(Path(recipe_path), out, env_extra)
    result: dict[str, Any] = {
        "key": key,
        "label": label,
        "ok": outcome.ok,
        "error": outcome.error,
        "merge_seconds": round(outcome.seconds, 2),
    }
    if not outcome.ok:
        return result
    start = time.perf_counter()
    tasks = [load_task(paths.data / f"{t}.npz") for t in task_names]
    result["heads_untouched"] = heads_untouched(out, {t: paths.expert(t) for t in task_names})
    scores = evaluate_merged(out, tasks, splits)
    result["eval_seconds"] = round(time.perf_counter() - start, 2)
    shutil.rmtree(out, ignore_errors=True)
    previous = cached_result(paths, key)
    changed = [s for s in splits if s in previous and previous[s] != scores[s]]
    if changed:  # the same recipe and tool gave other numbers: say so loudly, keep the new ones
        result["irreproducible"] = changed
    merged = {**previous, **result, **scores}
    paths.results.mkdir(parents=True, exist_ok=True)
    result_path(paths, key).write_text(json.dumps(merged, indent=1))
    return merged


def config_dict(cfg: Config) -> dict[str, Any]:
    return json.loads(cache.canonical(cfg))
