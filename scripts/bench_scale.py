#!/usr/bin/env python
"""One process against Ray with 1 and 2 local workers, on a bench_speed model family.

    python scripts/bench_scale.py --family bench-data/llama-h1024-i2816-l16-v32000-kv16-finetune \\
                                  [--methods ties,task_arithmetic] [--workers 1,2] [--reps 1] [--markdown]

Each configuration runs in its own child process, which imports ri-merge and (for Ray) starts a
local cluster with N CPUs *before* the clock starts, then times `mergekit_ri.merge` into a fresh
folder (`--reps` times, median): the numbers compare the merges, not Python's or Ray's start-up,
which are printed beside them. Every Ray output is compared byte for byte with the single
process's. Run `scripts/bench_speed.py` first to generate the family (base + expert1..3).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
from pathlib import Path
started = time.perf_counter()
import mergekit_ri as m
from mergekit_ri.api import MergeOptions
recipe, out, workers, reps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ray_start = 0.0
if workers:
    import ray
    t = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t
times = []
for rep in range(reps):
    t = time.perf_counter()
    result = m.merge(recipe, out, options=MergeOptions(force=True, ray="local" if workers else None))
    times.append(time.perf_counter() - t)
print(json.dumps({"times": times, "ray_start": ray_start, "units": len(result.units["computed"]),
                  "read": result.bytes_read, "import": started}))
"""


def recipe_text(family: Path, method: str) -> str:
    experts = sorted(p for p in family.iterdir() if p.name.startswith("expert"))
    params = {
        "ties": "    parameters: {weight: 1.0, density: 0.2}\n",
        "task_arithmetic": "    parameters: {weight: 0.5}\n",
    }
    models = "".join(f"  - model: {e}\n{params.get(method, '')}" for e in experts)
    return f"merge_method: {method}\nbase_model: {family / 'base'}\nmodels:\n{models}dtype: bfloat16\n"


def same_tree(a: Path, b: Path) -> bool:
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    if names != sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", type=Path, required=True, help="a bench_speed folder: base, expert1..N")
    parser.add_argument("--methods", default="ties,task_arithmetic")
    parser.add_argument("--workers", default="1,2", help="local Ray workers (CPUs) to try")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for method in args.methods.split(","):
            recipe = Path(tmp) / f"{method}.yaml"
            recipe.write_text(recipe_text(args.family, method))
            base_time, reference = None, Path(tmp) / f"{method}-single"
            for workers in [0] + [int(w) for w in args.workers.split(",")]:
                out = reference if workers == 0 else Path(tmp) / f"{method}-ray{workers}"
                command = [sys.executable, "-c", CHILD, str(recipe), str(out), str(workers), str(args.reps)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"{method}, {workers} workers failed:\n{done.stderr}")
                report = json.loads(done.stdout.strip().splitlines()[-1])
                median = statistics.median(report["times"])
                base_time = base_time or median
                identical = "—" if workers == 0 else ("yes" if same_tree(reference, out) else "NO")
                rows.append(
                    (
                        method,
                        "one process" if workers == 0 else f"Ray, {workers} worker(s)",
                        median,
                        report["read"] / median / 1e9,
                        median / base_time,
                        report["units"],
                        report["ray_start"],
                        identical,
                    )
                )
                if workers:
                    shutil.rmtree(out, ignore_errors=True)
    header = (
        "method",
        "layout",
        "merge s",
        "input GB/s",
        "vs one process",
        "units",
        "Ray start s",
        "same bytes",
    )
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for r in rows:
            print(
                f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.2f}× | {r[5]} | {r[6]:.1f} | {r[7]} |"
            )
    else:
        for r in rows:
            print(
                f"{r[0]:16} {r[1]:20} {r[2]:8.2f}s {r[3]:6.2f} GB/s {r[4]:5.2f}x units {r[5]:3} start {r[6]:.1f}s {r[7]}"
            )


if __name__ == "__main__":
    main()
