"""The tiny ViT and everything that trains or evaluates it.

The protocol is the CLIP one the merging papers use: a head per task is fitted on the
*pretrained* frozen features and then frozen; each expert fine-tunes the whole backbone for its
task under its frozen head. Merges then change only the backbone, and every task keeps reading
the merged features through the head it had from the start — so a merge that drifts a task's
features away from what its head expects costs that task accuracy, which is what we measure.

All training is seeded and single-threaded per process (see `bench_quality.py`): results are
the same whichever worker runs them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import ViTConfig, ViTForImageClassification

from .data import PATCH, SIZE, Split


@dataclass(frozen=True)
class Arch:
    """Backbone shape. Width matters more than depth for how well task vectors merge."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 256


@dataclass(frozen=True)
class Schedule:
    """One training run: AdamW with linear warm-up and cosine decay."""

    epochs: float
    lr: float
    batch: int = 64
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of the steps
    decay: bool = True  # cosine decay to zero after the warm-up; else constant


def vit_config(arch: Arch, labels: list[str]) -> ViTConfig:
    """A ViTForImageClassification config for 28×28 grayscale images in 7×7 patches."""
    return ViTConfig(
        image_size=SIZE,
        patch_size=PATCH,
        num_channels=1,
        hidden_size=arch.hidden,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        intermediate_size=arch.intermediate,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )


def new_model(config: ViTConfig, seed: int) -> ViTForImageClassification:
    torch.manual_seed(seed)
    return ViTForImageClassification(config)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- loops


def batches(n: int, batch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches of one shuffled epoch (the last, shorter one included)."""
    order = torch.randperm(n, generator=generator)
    yield from order.split(batch)


def schedule_lr(step: int, total: int, schedule: Schedule) -> float:
    warm = max(1, int(schedule.warmup * total))
    if step < warm:
        return schedule.lr * (step + 1) / warm
    if not schedule.decay:
        return schedule.lr
    progress = (step - warm) / max(1, total - warm)
    return schedule.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train(
    model: ViTForImageClassification,
    x: torch.Tensor,
    y: torch.Tensor,
    schedule: Schedule,
    seed: int,
    augment: bool = False,
) -> list[float]:
    """Training of the parameters that require grad: cross-entropy for integer labels, binary
    cross-entropy for a multi-hot float target (the pretext). Returns the loss per epoch."""
    criterion = F.binary_cross_entropy_with_logits if y.is_floating_point() else F.cross_entropy
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=schedule.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(y) / schedule.batch)
    total = max(1, round(schedule.epochs * steps_per_epoch))
    model.train()
    losses: list[float] = []
    step = 0
    while step < total:
        running, seen = 0.0, 0
        for idx in batches(len(y), schedule.batch, generator):
            if step >= total:
                break
            inputs = shift_augment(x[idx], generator) if augment else x[idx]
            loss = criterion(model(pixel_values=inputs).logits, y[idx])
            for group in optimiser.param_groups:
                group["lr"] = schedule_lr(step, total, schedule)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            running += loss.item() * len(idx)
            seen += len(idx)
            step += 1
        losses.append(running / max(1, seen))
    model.eval()
    return losses


def shift_augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translations by up to `max_shift` pixels (pretraining only): features that do not
    hinge on the exact patch grid transfer better."""
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=generator))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


@torch.no_grad()
def features(model: ViTForImageClassification, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """What the classifier reads: the final-layer-normed CLS token."""
    model.eval()
    return torch.cat(
        [model.vit(pixel_values=x[i : i + batch]).last_hidden_state[:, 0] for i in range(0, len(x), batch)]
    )


@torch.no_grad()
def predict(model: ViTForImageClassification, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat(
        [model(pixel_values=x[i : i + batch]).logits.argmax(-1) for i in range(0, len(x), batch)]
    )


def accuracy(model: ViTForImageClassification, split: Split) -> float:
    return (predict(model, split.pixel_values()) == torch.from_numpy(split.y)).float().mean().item()


# ---------------------------------------------------------------- the three stages


def pretrain(
    arch: Arch, x: torch.Tensor, y: torch.Tensor, labels: list[str], schedule: Schedule, seed: int
) -> ViTForImageClassification:
    """The base: the whole ViT trained on the pretext (its pretext head is thrown away by every
    task, which fits its own probe)."""
    model = new_model(vit_config(arch, labels), seed)
    train(model, x, y, schedule, seed, augment=True)
    return model


def fit_probe(
    train_features: torch.Tensor,
    train_y: torch.Tensor,
    num_labels: int,
    weight_decay: float,
    steps: int = 300,
    seed: int = 0,
) -> torch.nn.Linear:
    """A linear head on frozen features: full-batch L-BFGS on L2-regularised cross-entropy
    (deterministic, and a few hundred milliseconds for these sizes)."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(train_features.shape[1], num_labels)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    optimiser = torch.optim.LBFGS(
        head.parameters(), lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(head(train_features), train_y) + weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return head


def with_head(
    base: ViTForImageClassification, head: torch.nn.Linear, labels: list[str], arch: Arch
) -> ViTForImageClassification:
    """A copy of the base backbone wearing a task's head, with the task's labels in its config."""
    model = ViTForImageClassification(vit_config(arch, labels))
    state = {k: v for k, v in base.state_dict().items() if not k.startswith("classifier.")}
    state["classifier.weight"] = head.weight.detach().clone()
    state["classifier.bias"] = head.bias.detach().clone()
    model.load_state_dict(state)
    model.eval()
    return model


def finetune_expert(
    model: ViTForImageClassification, split: Split, schedule: Schedule, seed: int
) -> list[float]:
    """Fine-tune the backbone for one task with its head frozen (the CLIP protocol)."""
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith("classifier."))
    return train(model, split.pixel_values(), torch.from_numpy(split.y), schedule, seed)
