#!/usr/bin/env python
"""What shipping an adapted expert back to the driver costs in RI on Ray (`ri/remote.py`).

    python scripts/bench_ri_ship.py [--sizes 64,256,1024] [--reps 3] [--markdown]

For each size (MiB of weights) a Ray task on a local one-CPU cluster writes a cache entry the
way a worker does (random weights, config, manifest: its own time is the first column) and
returns its files; the driver times fetching the finished task's result, then `publish_shipped`
(write into a staging folder beside the entry, re-hash against the manifest, rename). Writing
the entry straight into a shared cache instead would save the shipping and cost about the same
write and hash, over the network. Medians of `--reps`; the cluster is started before the clock.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def make_entry(mib: int) -> tuple[dict[str, bytes], float]:
    """A worker's side: an entry in a scratch folder, its files as bytes (as `_adapt` returns),
    and the seconds it took to write, hash and read them."""
    from mergekit_ri.ri.cache import write_manifest

    weights = os.urandom(mib << 20)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        entry = Path(scratch) / "e0"
        entry.mkdir()
        (entry / "model.safetensors").write_bytes(weights)
        (entry / "config.json").write_text("{}")
        write_manifest(entry)
        files = {p.name: p.read_bytes() for p in entry.iterdir()}
    return files, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,256,1024")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    import ray

    from mergekit_ri.ri.remote import publish_shipped

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    task = ray.remote(make_entry)
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for mib in (int(s) for s in args.sizes.split(",")):
            works, ships, publishes = [], [], []
            for rep in range(args.reps):
                ref = task.remote(mib)
                ray.wait([ref], fetch_local=False)  # the task is done; its result not yet here
                start = time.perf_counter()
                files, worked = ray.get(ref)
                ships.append(time.perf_counter() - start)
                works.append(worked)
                start = time.perf_counter()
                publish_shipped(files, Path(cache) / f"{mib}-{rep}" / "e0", "e0")
                publishes.append(time.perf_counter() - start)
                del files
            work, ship, publish = (statistics.median(t) for t in (works, ships, publishes))
            rows.append((mib, work, ship, publish))
    ray.shutdown()
    header = ["MiB", "worker: write + hash + read s", "ship to driver s", "driver: write + check + rename s"]
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for mib, work, ship, publish in rows:
            print(f"| {mib} | {work:.2f} | {ship:.2f} | {publish:.2f} |")
    else:
        print("  ".join(header))
        for mib, work, ship, publish in rows:
            print(f"{mib:>5}  {work:8.2f}  {ship:8.2f}  {publish:8.2f}")


if __name__ == "__main__":
    main()
