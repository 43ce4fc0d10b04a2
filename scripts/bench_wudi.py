#!/usr/bin/env python
"""Seconds per layer of WUDI's Adam solver against its closed forms, the loss each reaches, and
(on a GPU) the peak device memory of each layer.

    python scripts/bench_wudi.py [--quick] [--experts 4 8] [--device cpu|cuda ...] [--adam-iters K]
                                 [--shapes 4096x4096 ...] [--threads T] [--seed 0] [--out FILE]
                                 [--budget SECONDS]

    python scripts/bench_wudi.py --device cuda --budget 80 --out wudi_cuda.md   # the GPU table (~1 min, H200)

For each LLM-shaped layer (`out×in`; default Llama-3-8B's attention 4096×4096, MLP up/gate
14336×4096 and down 4096×14336) and number of experts N (default 4 and 8), draws N synthetic
task vectors on the device with a realistic structure (a shared low-rank part, a task-specific
low-rank part with a decaying spectrum, and dense noise), then times, in fp32 (TF32 off), with
the device's queue drained around each timed call (torch.cuda.synchronize):
  - Gram: accumulating G, B (and c) expert by expert — shared by every solver here;
  - eigh: one eigendecomposition of G — shared by every closed form;
  - each closed form's filter and products (aswudi, swudi, flow, exact);
  - Adam: the paper's 300 iterations. By default only K iterations are run (3 on CPU, where 300
    take hours at LLM scale; 10 on CUDA, to fit a short GPU slot) and the time is extrapolated
    linearly to 300: the table marks those cells "extrapolated from K it." and leaves their loss
    empty. `--adam-iters 300` (or `--quick`) runs them all.
"per layer" totals are Gram + eigh + filter for a closed form, Gram + 300 iterations for Adam.
The loss L(M) is reported at the init (Σ τ_i) and as a fraction of it after each solver.
On CUDA, "peak GiB" is torch.cuda.max_memory_allocated over the layer's solve, counted from
the N task vectors already on the device (so: τ_1..τ_N + G, B + eigh or Adam workspace; the
engine also holds the base layer, out·in·4 bytes more). Each device's first use is warmed up
outside the timings (CUDA context, cuBLAS and cuSOLVER handles).
`--quick` uses 1/8-size layers (512×512, 1792×512, 512×1792) and all 300 Adam iterations.
`--out FILE` also writes the markdown table to FILE, rewritten after every layer so that an
interrupted run keeps what it measured; `--budget S` starts no new layer after S seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a bare checkout too (no install)
from mergekit_ri.methods import wudi as W
from mergekit_ri.methods.registry import TensorParams

FULL_SHAPES = ("4096x4096", "14336x4096", "4096x14336")
QUICK_SHAPES = ("512x512", "1792x512", "512x1792")
CLOSED_FORMS = ("aswudi", "swudi", "flow", "exact")
ADAM_ITERATIONS = 300
ADAM_SAMPLE = {"cpu": 3, "cuda": 10}  # Adam iterations timed by default, then extrapolated to 300
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
    peak_bytes: int | None  # device memory high-water mark over the layer (CUDA only)


def synthetic_task_vectors(experts: int, out: int, inp: int, seed: int, device: torch.device) -> torch.Tensor:
    """Low-rank-plus-noise deltas of fine-tune magnitude (~1e-3 per entry), partly shared, drawn
    on the device itself (a device's generator: the draws differ between CPU and CUDA)."""
    g = torch.Generator(device=device).manual_seed(seed)
    rank = max(8, min(out, inp) // 64)
    decay = torch.arange(1, rank + 1, dtype=torch.float32, device=device) ** -0.5

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device)

    def low_rank() -> torch.Tensor:
        return (randn(out, rank) * decay) @ randn(rank, inp) / rank**0.5

    shared = low_rank()
    deltas = torch.empty(experts, out, inp, device=device)
    for i in range(experts):
        deltas[i] = 0.5 * shared + low_rank() + 0.3 * randn(out, inp)
    return deltas.mul_(1e-3)


def warm_up(device: torch.device) -> None:
    """First-use costs (CUDA context, cuBLAS and cuSOLVER handles) outside every timing."""
    deltas = synthetic_task_vectors(2, 96, 64, 0, device)
    problem = build(deltas)
    closed_form(problem, W.spectrum(problem.gram), "aswudi")
    W.solve_adam(problem, 2, 1e-5)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    deltas = synthetic_task_vectors(experts, out, inp, seed, device)  # kept, as the engine keeps them
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    problem, gram_s = timed(device, build, deltas)
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
    del merged
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return Row(
        device.type,
        shape,
        experts,
        gram_s,
        eigh_s,
        closed_s,
        adam_s,
        adam_iters,
        W.loss(problem, problem.init),
        losses,
        peak,
    )


def seconds(value: float) -> str:
    return f"{value:.1f}" if value >= 0.95 else f"{value:.2f}" if value >= 0.01 else f"{value:.3f}"


def markdown(rows: list[Row]) -> str:
    head = [
        "device",
        "layer (out×in)",
        "N",
        "Gram s",
        "eigh s",
        *(f"{s} s" for s in CLOSED_FORMS),
        "Adam×300 s",
        "Adam ÷ aswudi",
        "peak GiB",
        "L(init)",
        *(f"L {s}/init" for s in (*CLOSED_FORMS, "adam")),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        closed = {s: r.gram_s + r.eigh_s + t for s, t in r.closed_s.items()}
        adam_total = r.gram_s + r.adam_s
        adam = seconds(adam_total) + (
            "" if r.adam_measured == ADAM_ITERATIONS else f" (extrapolated from {r.adam_measured} it.)"
        )
        ratios = [
            f"{r.losses[s] / r.init_loss:.3f}" if s in r.losses else "—" for s in (*CLOSED_FORMS, "adam")
        ]
        peak = "—" if r.peak_bytes is None else f"{r.peak_bytes / 2**30:.2f}"
        cells = [
            r.device,
            r.shape.replace("x", "×"),
            str(r.experts),
            seconds(r.gram_s),
            seconds(r.eigh_s),
            *(seconds(closed[s]) for s in CLOSED_FORMS),
            adam,
            f"{adam_total / closed['aswudi']:.0f}×",
            peak,
            f"{r.init_loss:.4g}",
            *ratios,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def footnote(rows: list[Row]) -> str:
    sampled = sorted({r.adam_measured for r in rows if r.adam_measured != ADAM_ITERATIONS})
    return (
        "per layer: closed form = Gram + eigh + filter; Adam = Gram + 300 iterations; fp32"
        + (
            ""
            if not sampled
            else f"; 'extrapolated from K it.': Adam timed over K = {', '.join(map(str, sampled))} iterations and "
            "scaled linearly to 300 (so no Adam loss in those rows)"
        )
        + (
            "; peak GiB: torch.cuda.max_memory_allocated over the layer, its N task vectors included"
            if any(r.peak_bytes is not None for r in rows)
            else ""
        )
    )


def report(header: str, rows: list[Row], out: Path | None) -> str:
    text = f"{header}\n\n{markdown(rows)}\n\n{footnote(rows)}\n"
    if out is not None:
        out.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1/8-size layers, all 300 Adam iterations")
    parser.add_argument("--shapes", nargs="+", help="layers as OUTxIN (default: Llama-3-8B's, or --quick's)")
    parser.add_argument("--experts", nargs="+", type=int, default=[4, 8])
    parser.add_argument(
        "--devices",
        "--device",
        nargs="+",
        default=None,
        help="cpu and/or cuda[:i] (default: cpu, and cuda when available)",
    )
    parser.add_argument(
        "--adam-iters",
        type=int,
        default=None,
        help="Adam iterations actually run, the time extrapolated to 300 "
        "(default: 300 with --quick, else 3 on cpu and 10 on cuda)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table to this file")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="start no new layer after this many seconds (the table keeps what was measured)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (1 on a shared machine: 2 contended threads can be 10-50x slower)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("highest")  # fp32 products: no TF32 on the GPU
    shapes = args.shapes or (QUICK_SHAPES if args.quick else FULL_SHAPES)
    devices = [
        torch.device(name)
        for name in args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ]
    if any(d.type == "cuda" for d in devices) and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to torch")
    gpus = sorted({torch.cuda.get_device_name(d) for d in devices if d.type == "cuda"})
    header = (
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
        + "".join(f", {name}" for name in gpus)
        + ", fp32"
    )
    print(header, flush=True)
    started, rows = time.perf_counter(), []
    for device in devices:
        warm_up(device)
        for shape in shapes:
            for experts in args.experts:
                if args.budget is not None and time.perf_counter() - started > args.budget:
                    print(
                        f"budget of {args.budget:g}s spent: skipping {device} {shape} N={experts}", flush=True
                    )
                    continue
                iters = args.adam_iters or (
                    ADAM_ITERATIONS if args.quick else ADAM_SAMPLE.get(device.type, 3)
                )
                rows.append(bench_layer(device, shape, experts, iters, args.seed))
                r = rows[-1]
                print(
                    f"{r.device} {r.shape} N={r.experts}: Gram {seconds(r.gram_s)}s eigh {seconds(r.eigh_s)}s "
                    f"aswudi {seconds(r.closed_s['aswudi'])}s Adam×300 {seconds(r.adam_s)}s"
                    + ("" if iters == ADAM_ITERATIONS else f" (extrapolated from {iters} iterations)")
                    + ("" if r.peak_bytes is None else f", peak {r.peak_bytes / 2**30:.2f} GiB")
                    + f" [{time.perf_counter() - started:.0f}s elapsed]",
                    flush=True,
                )
                report(header, rows, args.out)
    print()
    print(report(header, rows, args.out), end="")
    if args.out is not None:
        print(f"(table written to {args.out})")


if __name__ == "__main__":
    main()
