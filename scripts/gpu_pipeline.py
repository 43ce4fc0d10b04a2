#!/usr/bin/env python
"""How close a GPU merge comes to reading its inputs from the page cache, and whether it writes
the CPU's result.

    python scripts/gpu_pipeline.py --device cuda --params 1B --methods ties,task_arithmetic \\
        --reps 2 --workdir /tmp/bench --out pipeline.md --json pipeline.json

Generates (once, cached in the workdir, as `bench_speed.py` does) a bf16 base and 3 fine-tune-like
experts, warms the page cache, then measures the page cache's read bandwidth beside the merge:
`cat` of every input file to /dev/null, `dd bs=16M` of each, and Python reading them into one
buffer. Each method is merged in this process once to start up (CUDA, the Triton kernels), then
`--reps` more times, timed around `mergekit_ri.merge` alone: the GB/s of input after start-up,
and its ratio to the faster of `cat` and `dd` (the target is 70 %). The same recipe is then
merged on the CPU and the outputs compared tensor by tensor: bit for bit (linear, task
arithmetic), or the same kept entries and the largest difference (TIES: fp32 sums in another
order, one rounding to bf16). It also reports the staging pools' use (buffers lent, copies
waited for, buffers made outside the pools: should be 0).

`--tiny` uses a small model instead of `--params` (for a quick run of the script itself, e.g.
`--device cpu --tiny` on a machine without a GPU; then both sides are the CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_speed  # noqa: E402  (the models and recipes of the speed benchmark)

import mergekit_ri as m  # noqa: E402
from mergekit_ri import engine  # noqa: E402
from mergekit_ri.synthetic import LlamaShape, make_family  # noqa: E402

TINY = LlamaShape(vocab=512, hidden=64, intermediate=176, layers=2, heads=2, kv_heads=2)
TARGET = 0.70  # of the page cache's read bandwidth


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def page_cache(files: list[Path], reps: int) -> dict[str, float]:
    """Median seconds to read every file from the (warm) page cache, three ways."""
    bench_speed.read_all(files)  # warm
    ways = {
        "cat": lambda: timed(["cat", *map(str, files)]),
        "dd": lambda: sum(timed(["dd", f"if={f}", "of=/dev/null", "bs=16M"]) for f in files),
        "python": lambda: bench_speed.time_read(files, 1),
    }
    return {name: statistics.median(way() for _ in range(max(1, reps))) for name, way in ways.items()}


def merge_once(recipe: Path, out: Path, device: str, stats: list) -> float:
    """Seconds `mergekit_ri.merge` takes, start-up (imports, CUDA) excluded by the caller."""
    original = engine.stager_for

    def spy(*args):
        stats.append(original(*args))
        return stats[-1]

    engine.stager_for = spy
    try:
        options = m.MergeOptions(device=device, force=True, checksums=False, write_model_card=False)
        start = time.perf_counter()
        m.merge(recipe, out, options=options)
        return time.perf_counter() - start
    finally:
        engine.stager_for = original


def tensors(folder: Path):
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def compare(got: Path, want: Path, base: dict[str, torch.Tensor] | None) -> dict:
    """Tensor by tensor: identical ones, differing entries, the largest difference and (with the
    base) entries kept on one side and not the other."""
    wanted = dict(tensors(want))
    found = {"tensors": 0, "identical": 0, "entries_differing": 0, "max_abs_diff": 0.0, "kept_differs": 0}
    for name, tensor in tensors(got):
        other = wanted.pop(name)
        found["tensors"] += 1
        if torch.equal(tensor, other):
            found["identical"] += 1
            continue
        differs = tensor != other
        found["entries_differing"] += int(differs.sum())
        diff = (tensor.float() - other.float()).abs().max().item()
        found["max_abs_diff"] = max(found["max_abs_diff"], diff)
        if base is not None and name in base:
            kept = (tensor != base[name]) != (other != base[name])
            found["kept_differs"] += int(kept.sum())
    found["missing"] = sorted(wanted)
    return found


def verdict(method: str, found: dict) -> str:
    if found["missing"]:
        return "MISSING TENSORS"
    if found["identical"] == found["tensors"]:
        return "bit-identical"
    if method in ("ties", "dare_ties", "dare_linear") and not found["kept_differs"]:
        return f"same kept entries, max |Δ| {found['max_abs_diff']:.3g}"
    return f"DIFFERS ({found['entries_differing']} entries, max |Δ| {found['max_abs_diff']:.3g})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="the device timed (cuda, cuda:N; cpu for a dry run)")
    parser.add_argument("--params", default="1B", help="approximate parameters per model (1B: 953M)")
    parser.add_argument("--tiny", action="store_true", help="a small model instead of --params")
    parser.add_argument("--methods", default="ties,task_arithmetic")
    parser.add_argument("--reps", type=int, default=2, help="timed merges per method, after one to start up")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench"))
    parser.add_argument("--no-compare", action="store_true", help="skip the CPU merge and comparison")
    parser.add_argument("--out", type=Path, help="also write the table here")
    parser.add_argument("--json", type=Path, help="every figure, as JSON")
    args = parser.parse_args(argv)

    work = args.workdir.resolve()
    if args.tiny:
        folders = make_family(work / "tiny", ["expert1", "expert2", "expert3"], shape=TINY, dtype="bfloat16")
        folders = {"base": folders["base"], **{k: v for k, v in folders.items() if k != "base"}}
    else:
        shape = bench_speed.shape_for(bench_speed.parse_count(args.params))
        folders = bench_speed.ensure_models(work / (bench_speed.shape_key(shape) + "-finetune"), shape, 3)
    files = bench_speed.input_files(folders)
    input_bytes = sum(f.stat().st_size for f in files)
    cache = page_cache(files, 3)
    reference = min(cache["cat"], cache["dd"])  # the faster of the two
    gbs = {name: input_bytes / s / 1e9 for name, s in cache.items()}
    print(
        f"inputs {input_bytes / 1e9:.3f} GB in {len(files)} files; page cache: cat {gbs['cat']:.2f} GB/s, "
        f"dd {gbs['dd']:.2f} GB/s, python {gbs['python']:.2f} GB/s",
        flush=True,
    )
    base = dict(tensors(folders["base"])) if not args.no_compare else None
    rows, report = [], {"input_bytes": input_bytes, "page_cache_gbs": gbs, "methods": {}}
    for method in [x.strip() for x in args.methods.split(",") if x.strip()]:
        recipe = bench_speed.write_recipe(
            work / "recipes" / f"pipeline-{method}.yaml", bench_speed.recipe_for(method, folders)
        )
        out = work / f"pipeline-{method}-{args.device.replace(':', '')}"
        stagers: list = []
        startup = merge_once(recipe, out, args.device, stagers)
        seconds = [merge_once(recipe, out, args.device, stagers) for _ in range(max(1, args.reps))]
        best = min(seconds)
        rate = input_bytes / best / 1e9
        ratio = rate / (input_bytes / reference / 1e9)
        entry = {
            "first_merge_s": startup,
            "seconds": seconds,
            "gbs": rate,
            "ratio": ratio,
            "staging": stagers[-1].stats() if stagers else {},
        }
        if not args.no_compare:
            cpu = out  # a dry run on the CPU: compared with itself
            if args.device != "cpu":
                cpu = work / f"pipeline-{method}-cpu"
                merge_once(recipe, cpu, "cpu", [])
            entry["against_cpu"] = compare(out, cpu, base)
            entry["verdict"] = verdict(method, entry["against_cpu"])
        report["methods"][method] = entry
        extra = sum(pool["extra"] for pool in entry["staging"].values())
        rows.append(
            f"| {method} | {args.device} | {startup:.2f} | {statistics.median(seconds):.2f} | {best:.2f} "
            f"| {rate:.2f} | {ratio:.0%} | {'yes' if ratio >= TARGET else 'NO'} "
            f"| {entry.get('verdict', '—')} | {extra} |"
        )
        print(rows[-1], flush=True)
    table = "\n".join(
        [
            f"inputs {input_bytes / 1e9:.3f} GB (base + 3 experts, bf16); page cache read: cat "
            f"{gbs['cat']:.2f} GB/s, dd {gbs['dd']:.2f} GB/s, python {gbs['python']:.2f} GB/s; "
            f"ratio against the faster of cat and dd; target {TARGET:.0%}",
            "",
            "| method | device | first merge s (start-up) | median s | best s | GB/s of input | "
            "of page cache | ≥ target | against the CPU | buffers outside the pools |",
            "|---|---|---:|---:|---:|---:|---:|---|---|---:|",
            *rows,
        ]
    )
    print("\n" + table)
    if args.out:
        args.out.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    bad = [
        x for x in report["methods"].values() if not str(x.get("verdict", "bit")).startswith(("bit", "same"))
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
