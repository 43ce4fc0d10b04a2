#!/usr/bin/env python
"""Time RI's adaptation of one expert: seconds per step, extrapolated to a full run.

    python scripts/bench_ri.py --device cuda --out bench-ri.md          # ~1 min on one modern GPU
    python scripts/bench_ri.py --device cpu --steps 2 --vit-b-layers 2 --vit-b-batch 4 --quality-batch 16

Models (random weights: the cost of a step does not depend on what the weights are, so nothing is
trained or downloaded):
- `quality`: the merge-quality benchmark's tiny ViT (scripts/quality: 28×28×1, 7×7 patches,
  hidden 128, 4 layers, 8 tasks), at the benchmark's RI settings (batch 128, 300 steps).
- `vit-b/16`, `vit-b/32`: ViT-B-sized classifiers (hidden 768, 12 layers, 12 heads, MLP 3072,
  224×224×3), at the paper's settings (batch 128, 2500 steps; the paper's 7–9 min per expert on
  one A40 are for ViT-B/32).

Each row runs the library's own `adapt_expert` (student forward + backward, the expert and the
base as frozen teachers, every other expert's head, AdamW) on `gaussian` auxiliary batches drawn
on the host as `ri-merge` does, for `--warmup` steps and then `--steps` timed ones. The time per
expert is the median step time × the configured steps: an EXTRAPOLATION, not a full run. Only
torch, transformers and safetensors are needed; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mergekit_ri.ri.adapt import RISettings, adapt_expert  # noqa: E402
from mergekit_ri.ri.data import AuxiliaryData  # noqa: E402

# the merge-quality benchmark's model and RI settings (scripts/quality/model.py Arch, pipeline.py RISettings);
# head sizes are approximate (a head is one small Linear: the cost is in the backbone)
QUALITY = dict(
    image=28,
    channels=1,
    patch=7,
    hidden=128,
    layers=4,
    heads=4,
    intermediate=256,
    labels=[10, 10, 10, 10, 10, 12, 8, 5],
    steps=300,
)


@dataclass
class Row:
    model: str
    params: int
    shape: str
    batch: int
    others: int
    device: str
    step_s: float
    step_min_s: float
    data_s: float
    steps: int
    peak_gib: float | None

    @property
    def expert_s(self) -> float:
        return self.step_s * self.steps


def vit(
    image: int,
    channels: int,
    patch: int,
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int,
    labels: int,
    seed: int,
    device: torch.device,
):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=image,
        patch_size=patch,
        num_channels=channels,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        num_labels=labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    with device:  # initialise where it will run: fast on a GPU
        return ViTForImageClassification(config).eval()


def time_expert(
    name: str, spec: dict, batch: int, steps: int, warmup: int, configured: int, device: torch.device
) -> Row:
    labels = spec["labels"]
    arch = {k: spec[k] for k in ("image", "channels", "patch", "hidden", "layers", "heads", "intermediate")}
    expert = vit(**arch, labels=labels[0], seed=1, device=device)
    base = vit(**arch, labels=2, seed=0, device=device)
    torch.manual_seed(2)
    others = [nn.Linear(spec["hidden"], n, device=device) for n in labels[1:]]  # every other expert's head
    shape = (spec["channels"], spec["image"], spec["image"])
    aux = AuxiliaryData("pixel_values", "gaussian", example_shape=shape)

    start = time.perf_counter()  # the host's share: drawing the batches (ri-merge does this per step)
    for _ in aux.batches(batch, 3, seed=0):
        pass
    data_s = (time.perf_counter() - start) / 3

    stamps: list[float] = []

    def report(step: int, l1: float, l2: float) -> None:  # .item() on the losses has synchronised
        stamps.append(time.perf_counter())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    settings = RISettings(steps=warmup + steps, lr=1e-6, weight_decay=1e-4, alpha=1.0, batch_size=batch)
    stamps.append(time.perf_counter())
    adapt_expert(
        expert,
        base,
        others,
        "classifier",
        aux.batches(batch, warmup + steps, seed=1),
        settings,
        device,
        report,
    )
    durations = [b - a for a, b in zip(stamps, stamps[1:])][warmup:]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    params = sum(p.numel() for p in expert.parameters())
    del expert, base, others
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Row(
        name,
        params,
        "×".join(map(str, shape)),
        batch,
        len(labels) - 1,
        str(device),
        statistics.median(durations),
        min(durations),
        data_s,
        configured,
        peak,
    )


def table(rows: list[Row], args: argparse.Namespace) -> str:
    gpu = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available() and args.device == "cuda"
        else platform.processor() or "CPU"
    )
    import transformers

    lines = [
        f"RI adaptation time per expert — {gpu}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"fp32 (TF32 matmul {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}), "
        f"{args.steps} timed steps after {args.warmup} warm-up steps.",
        "",
        "**Extrapolated**: s per expert = median s/step × the configured steps; no full run was made.",
        "",
        "| model | params | input | batch | other heads | device | s/step (median) | s/step (min) | host data s/step | "
        "configured steps | s per expert (extrapolated) | min per expert (extrapolated) | peak GPU GiB |",
        "|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        peak = f"{r.peak_gib:.2f}" if r.peak_gib is not None else "—"
        lines.append(
            f"| {r.model} | {r.params / 1e6:.1f}M | {r.shape} | {r.batch} | {r.others} | {r.device} | "
            f"{r.step_s:.4f} | {r.step_min_s:.4f} | {r.data_s:.4f} | {r.steps} | {r.expert_s:.1f} | "
            f"{r.expert_s / 60:.2f} | {peak} |"
        )
    lines += [
        "",
        "The N experts of a merge cost N× this one after another, or about 1× with one GPU each "
        "(`resolve_interference.devices`). Host data is the share of a step spent drawing `gaussian` "
        "batches on the CPU (included in s/step).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument(
        "--models", default="quality,vit-b/16,vit-b/32", help="comma-separated: quality, vit-b/16, vit-b/32"
    )
    parser.add_argument("--quality-batch", type=int, default=128)
    parser.add_argument("--vit-b-batch", type=int, default=128)
    parser.add_argument("--vit-b-layers", type=int, default=12, help="fewer for a quick check")
    parser.add_argument(
        "--vit-b-experts", type=int, default=8, help="experts in the merge (2+): the other heads"
    )
    parser.add_argument(
        "--vit-b-steps", type=int, default=2500, help="configured steps to extrapolate to (paper: 2500)"
    )
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (ri-merge itself does not)")
    parser.add_argument("--threads", type=int, help="CPU threads")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA GPU is visible")
    if args.vit_b_experts < 2 or args.steps < 1:
        parser.error("--vit-b-experts needs 2+ and --steps 1+")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    device = torch.device(args.device)
    vit_b = dict(
        image=224,
        channels=3,
        hidden=768,
        layers=args.vit_b_layers,
        heads=12,
        intermediate=3072,
        labels=[10] * args.vit_b_experts,
        steps=args.vit_b_steps,
    )
    specs = {
        "quality": (QUALITY, args.quality_batch),
        "vit-b/16": ({**vit_b, "patch": 16}, args.vit_b_batch),
        "vit-b/32": ({**vit_b, "patch": 32}, args.vit_b_batch),
    }
    rows = []
    for name in args.models.split(","):
        if name not in specs:
            parser.error(f"unknown model '{name}'; choose from {', '.join(specs)}")
        spec, batch = specs[name]
        label = (
            name if name == "quality" or args.vit_b_layers == 12 else f"{name} ({args.vit_b_layers} layers)"
        )
        started = time.perf_counter()
        rows.append(time_expert(label, spec, batch, args.steps, args.warmup, spec["steps"], device))
        print(
            f"{label}: {rows[-1].step_s:.4f} s/step ({time.perf_counter() - started:.1f}s)",
            file=sys.stderr,
            flush=True,
        )
    text = table(rows, args)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
