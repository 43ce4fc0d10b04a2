#!/usr/bin/env python
"""Seconds per layer of WUDI's Adam solver against its closed forms, and the loss each reaches.

    python scripts/bench_wudi.py [--quick] [--experts 4 8] [--devices cpu cuda] [--adam-iters K]
                                 [--shapes 4096x4096 ...] [--threads T] [--seed 0]

For each LLM-shaped layer (`out×in`; default Llama-3-8B's attention 4096×4096, MLP up/gate
14336×4096 and down 4096×14336) and number of experts N, draws N synthetic task vectors with a
realistic structure (a shared low-rank part, a task-specific low-rank part with a decaying
spectrum, and dense noise), then times on each device:
  - Gram: accumulating G, B (and c) expert by expert — shared by every solver here;
  - eigh: one eigendecomposition of G — shared by every closed form;
  - each closed form's filter and products (aswudi, swudi, flow, exact);
  - Adam: the paper's 300 iterations. At LLM scale on CPU that takes hours, so by default only
    K = 3 iterations are run and the time is extrapolated linearly to 300 (the table says so, and
    its loss column is then empty); `--quick` and CUDA run all 300.
"per layer" totals are Gram + eigh + filter for a closed form, Gram + 300 iterations for Adam.
The loss L(M) is reported at the init (Σ τ_i) and as a fraction of it after each solver.
`--quick` uses 1/8-size layers (512×512, 1792×512, 512×1792).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from mergekit_ri.methods import wudi as W
from mergekit_ri.methods.registry import TensorParams

FULL_SHAPES = ("4096x4096", "14336x4096", "4096x14336")
QUICK_SHAPES = ("512x512", "1792x512", "512x1792")
CLOSED_FORMS = ("aswudi", "swudi", "flow", "exact")
ADAM_ITERATIONS = 300
T = TypeVar("T")


@dataclass
class Row:
    device: str
    shape: str
    experts: int
    gram_s: float
    eigh_s: float
    closed_s: dict[str, float]
    adam_s: float
    adam_measured: int
    init_loss: float
    losses: dict[str, float]


def synthetic_task_vectors(experts: int, out: int, inp: int, seed: int, device: torch.device) -> torch.Tensor:
    """Low-rank-plus-noise deltas of fine-tune magnitude (~1e-3 per entry), partly shared."""
    g = torch.Generator().manual_seed(seed)
    rank = max(8, min(out, inp) // 64)
    decay = torch.arange(1, rank + 1, dtype=torch.float32) ** -0.5

    def low_rank() -> torch.Tensor:
        a = torch.randn(out, rank, generator=g) * decay
        return (a @ torch.randn(rank, inp, generator=g)) / rank ** 0.5

    shared = low_rank()
    deltas = torch.empty(experts, out, inp)
    for i in range(experts):
        deltas[i] = 0.5 * shared + low_rank() + 0.3 * torch.randn(out, inp, generator=g)
    return (deltas * 1e-3).to(device)


def timed(device: torch.device, fn: Callable[..., T], *args: object) -> tuple[T, float]:
    """fn(*args) and its wall time, with the device's queue drained on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def build(deltas: torch.Tensor) -> W.WudiProblem:
    return W.build_problem(deltas, W.task_weights(deltas), deltas.sum(0))


def closed_form(problem: W.WudiProblem, spec: W.Spectrum, solver: str) -> torch.Tensor:
    """A closed-form solver with the method's defaults, on an eigendecomposition already made."""
    p = TensorParams({}, {"solver": solver, "t": None, "rank_ratio": 0.65})
    return W.apply_filter(problem, spec, W.closed_form_filter(solver, spec, p))


def bench_layer(device: torch.device, shape: str, experts: int, adam_iters: int, seed: int) -> Row:
    out, inp = map(int, shape.split("x"))
    deltas = synthetic_task_vectors(experts, out, inp, seed, device)
    problem, gram_s = timed(device, build, deltas)
    del deltas
    spec, eigh_s = timed(device, W.spectrum, problem.gram)
    closed_s, losses = {}, {}
    for solver in CLOSED_FORMS:
        merged, closed_s[solver] = timed(device, closed_form, problem, spec, solver)
        losses[solver] = W.loss(problem, merged)
        del merged
    del spec
    merged, seconds = timed(device, W.solve_adam, problem, adam_iters, 1e-5)
    adam_s = seconds * ADAM_ITERATIONS / adam_iters
    if adam_iters == ADAM_ITERATIONS:
        losses["adam"] = W.loss(problem, merged)
    return Row(device.type, shape, experts, gram_s, eigh_s, closed_s, adam_s, adam_iters, W.loss(problem, problem.init), losses)


def markdown(rows: list[Row]) -> str:
    head = ["device", "layer (out×in)", "N", "Gram s", "eigh s", *(f"{s} s" for s in CLOSED_FORMS),
            "Adam×300 s", "Adam ÷ aswudi", "L(init)", *(f"L {s}/init" for s in (*CLOSED_FORMS, "adam"))]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        closed = {s: r.gram_s + r.eigh_s + t for s, t in r.closed_s.items()}
        adam_total = r.gram_s + r.adam_s
        adam = f"{adam_total:.1f}" + ("" if r.adam_measured == ADAM_ITERATIONS else f" (from {r.adam_measured} it.)")
        ratios = [f"{r.losses[s] / r.init_loss:.3f}" if s in r.losses else "—" for s in (*CLOSED_FORMS, "adam")]
        cells = [r.device, r.shape, str(r.experts), f"{r.gram_s:.1f}", f"{r.eigh_s:.1f}",
                 *(f"{closed[s]:.1f}" for s in CLOSED_FORMS), adam, f"{adam_total / closed['aswudi']:.0f}×",
                 f"{r.init_loss:.4g}", *ratios]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1/8-size layers, all 300 Adam iterations")
    parser.add_argument("--shapes", nargs="+", help="layers as OUTxIN (default: Llama-3-8B's, or --quick's)")
    parser.add_argument("--experts", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when available")
    parser.add_argument("--adam-iters", type=int, default=None,
                        help="Adam iterations actually run (default: 300 with --quick or on cuda, else 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (1 on a shared machine: 2 contended threads can be 10-50x slower)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else FULL_SHAPES)
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""), flush=True)
    rows = []
    for name in devices:
        device = torch.device(name)
        for shape in shapes:
            for experts in args.experts:
                iters = args.adam_iters or (ADAM_ITERATIONS if args.quick or device.type == "cuda" else 3)
                rows.append(bench_layer(device, shape, experts, iters, args.seed))
                r = rows[-1]
                print(f"{r.device} {r.shape} N={r.experts}: Gram {r.gram_s:.1f}s eigh {r.eigh_s:.1f}s "
                      f"aswudi {r.closed_s['aswudi']:.1f}s Adam×300 {r.adam_s:.1f}s"
                      + ("" if iters == ADAM_ITERATIONS else f" (extrapolated from {iters} iterations)"), flush=True)
    print()
    print(markdown(rows))
    print("\nper layer: closed form = Gram + eigh + filter; Adam = Gram + 300 iterations"
          + ("" if all(r.adam_measured == ADAM_ITERATIONS for r in rows)
             else "; 'from K it.': Adam timed over K iterations and extrapolated linearly to 300 (no loss)"))


if __name__ == "__main__":
    main()
