"""`ri-merge demo --ri`: RI shown working in about a minute on a CPU, from nothing.

It generates a tiny `ViTForImageClassification` base and one expert per procedural image task
(`demo_tasks.py`), each with its own head, plus unlabeled auxiliary images (procedural
noise and strokes, and unlabeled images of the tasks' kinds); merges the experts with task arithmetic with and without `resolve_interference:`;
and measures every task's test accuracy for the base, each expert, the plain merge and RI +
merge, and the interference ξ of both merges. The recipes it ran are written beside the models.

The protocol is the CLIP one of the merging papers (as in `scripts/bench_quality.py`): each
task's head is a probe fitted on the *base's* frozen features, then frozen; its expert
fine-tunes the whole backbone under it. Task arithmetic at its defaults (λ = 1, weight 1 each)
adds four full task vectors, so each task's features drift under the other tasks' vectors —
the interference RI removes. Everything is seeded and runs on one CPU thread, so the numbers
are the same on every machine with the same torch.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .demo_tasks import PATCH, SIZE, TaskData, make_auxiliary, make_pretext, make_tasks
from .errors import UserError
from .events import MergeEvents

MARKER = ".ri-merge-demo-ri"
ROWS = ("base", "experts", "merge", "ri_merge")
ROW_NAMES = {
    "base": "base (probe heads)",
    "experts": "each expert, own task",
    "merge": "task arithmetic",
    "ri_merge": "RI + task arithmetic",
}


@dataclass(frozen=True)
class DemoSettings:
    """Everything that decides the numbers (`FULL` for the CLI, `QUICK` for tests: the same base
    and experts, fewer RI steps and test images). Chosen so that RI + merge beats the plain merge
    clearly on this seed (docs/heads-and-ri.md gives the margins seen on other draws)."""

    tasks: tuple[str, ...] = ("shapes", "stripes", "textures", "digits")
    train: int = 600  # examples per task
    test: int = 400
    pretext: int = 2400
    hidden: int = 48
    layers: int = 2
    pretrain_epochs: float = 6.0
    pretrain_lr: float = 2e-3
    probe_shots: int = 20  # examples per class each probe head is fitted on
    expert_epochs: float = 10.0
    expert_lr: float = 2e-3
    batch: int = 64
    aux: int = 512
    aux_task_like: bool = True  # half of the auxiliary images unlabeled ones of the tasks' kinds
    ri_steps: int = 150
    ri_lr: float = 2e-3
    ri_batch: int = 64
    seed: int = 0


FULL = DemoSettings()
QUICK = replace(FULL, test=200, ri_steps=80)


@dataclass
class DemoReport:
    """What the demo measured: accuracies per row and task (fractions), ξ, and where it wrote."""

    rows: dict[str, dict[str, float]]
    interference: dict[str, float]
    seconds: float
    folder: Path
    recipe: Path
    plain_recipe: Path

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "interference": self.interference,
            "seconds": round(self.seconds, 1),
            "recipe": str(self.recipe),
        }


class DemoProgress:
    """Progress bars on stderr for the training parts (rich), or nothing when `show` is False."""

    def __init__(self, show: bool) -> None:
        self._bars: Any = None
        if show:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bars = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )

    def __enter__(self) -> "DemoProgress":
        if self._bars is not None:
            self._bars.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bars is not None:
            self._bars.__exit__(None, None, None)

    def task(self, description: str, total: int) -> Callable[..., None]:
        """A new bar; the returned function sets its progress (and optionally its text)."""
        if self._bars is None:
            return lambda completed, text=None: None
        bar = self._bars.add_task(description, total=total)

        def update(completed: int, text: str | None = None) -> None:
            self._bars.update(bar, completed=completed, **({"description": text} if text else {}))

        return update


class _RIBars(MergeEvents):
    """The RI steps of the merge, as bars of the demo's progress."""

    def __init__(self, progress: DemoProgress) -> None:
        self.progress = progress
        self.bars: dict[str, Callable[..., None]] = {}

    def on_ri_start(self, expert: str, steps: int) -> None:
        self.bars[expert] = self.progress.task(f"RI {expert}", steps)

    def on_ri_step(self, expert: str, step: int, l1: float, l2: float) -> None:
        self.bars[expert](step, f"RI {expert}  L1 {l1:.4f}  L2 {l2:.4f}")


# ---------------------------------------------------------------- the model


def vit_config(settings: DemoSettings, labels: list[str]):
    from transformers import ViTConfig

    return ViTConfig(
        image_size=SIZE,
        patch_size=PATCH,
        num_channels=1,
        hidden_size=settings.hidden,
        num_hidden_layers=settings.layers,
        num_attention_heads=4,
        intermediate_size=2 * settings.hidden,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )


def train(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: float,
    lr: float,
    batch: int,
    seed: int,
    bar: Callable[..., None],
) -> None:
    """AdamW with a short warm-up and cosine decay on the parameters that require grad."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    total = max(1, round(epochs * math.ceil(len(y) / batch)))
    warm = max(1, total // 20)
    model.train()
    step = 0
    while step < total:
        for idx in torch.randperm(len(y), generator=generator).split(batch):
            if step >= total:
                break
            scale = (
                (step + 1) / warm
                if step < warm
                else 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
            )
            for group in optimiser.param_groups:
                group["lr"] = lr * scale
            loss = F.cross_entropy(model(pixel_values=x[idx]).logits, y[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            step += 1
            bar(step)
    model.eval()


@torch.no_grad()
def features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the classifier reads: the final-layer-normed CLS token."""
    return model.vit(pixel_values=x).last_hidden_state[:, 0]


def fit_probe(feats: torch.Tensor, y: torch.Tensor, classes: int) -> torch.nn.Linear:
    """A linear head on frozen features: full-batch L-BFGS, from zeros (deterministic)."""
    head = torch.nn.Linear(feats.shape[1], classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    optimiser = torch.optim.LBFGS(
        head.parameters(), max_iter=200, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(head(feats), y) + 1e-3 * head.weight.square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return head


def probe_indices(y: torch.Tensor, shots: int) -> torch.Tensor:
    return torch.cat([torch.nonzero(y == c).flatten()[:shots] for c in torch.unique(y)])


@torch.no_grad()
def accuracy(model: torch.nn.Module, task: TaskData) -> float:
    model.eval()
    return (model(pixel_values=task.test_x).logits.argmax(-1) == task.test_y).float().mean().item()


# ---------------------------------------------------------------- the stages


def build_models(
    folder: Path, tasks: list[TaskData], settings: DemoSettings, progress: DemoProgress
) -> dict[str, float]:
    """Base, probe heads and experts under `folder`; returns the base's accuracy per task."""
    from transformers import ViTForImageClassification

    x, y, labels = make_pretext(tasks, settings.pretext, settings.seed)
    torch.manual_seed(settings.seed)
    base = ViTForImageClassification(vit_config(settings, labels))
    steps = round(settings.pretrain_epochs * math.ceil(len(y) / settings.batch))
    train(
        base,
        x,
        y,
        settings.pretrain_epochs,
        settings.pretrain_lr,
        settings.batch,
        settings.seed,
        progress.task("pretraining the base", steps),
    )
    base.save_pretrained(folder / "base")
    base_scores = {}
    for i, task in enumerate(tasks):
        shots = probe_indices(task.train_y, settings.probe_shots)
        head = fit_probe(features(base, task.train_x[shots]), task.train_y[shots], len(task.labels))
        expert = ViTForImageClassification(vit_config(settings, task.labels))
        state = {k: v for k, v in base.state_dict().items() if not k.startswith("classifier.")}
        expert.load_state_dict(
            {**state, "classifier.weight": head.weight.detach(), "classifier.bias": head.bias.detach()}
        )
        base_scores[task.name] = accuracy(expert, task)
        for name, param in expert.named_parameters():
            param.requires_grad_(not name.startswith("classifier."))
        steps = round(settings.expert_epochs * math.ceil(len(task.train_y) / settings.batch))
        train(
            expert,
            task.train_x,
            task.train_y,
            settings.expert_epochs,
            settings.expert_lr,
            settings.batch,
            settings.seed + 1 + i,
            progress.task(f"fine-tuning expert_{task.name}", steps),
        )
        expert.save_pretrained(folder / f"expert_{task.name}")
    return base_scores


def recipe_text(settings: DemoSettings, tasks: list[TaskData], folder: Path, ri: bool) -> str:
    """The recipe the demo runs, commented so that it can be edited and rerun."""
    models = "".join(f"  - model: expert_{t.name}\n    parameters:\n      weight: 1.0\n" for t in tasks)
    text = (
        "# Written by `ri-merge demo --ri`. Rerun from this folder:\n"
        f"#   ri-merge {'recipe.yaml' if ri else 'recipe-no-ri.yaml'} -o my-merge -v\n"
        "# (-v also reports the interference ξ). Paths are relative to this file's folder.\n"
        "merge_method: task_arithmetic\n"
        "base_model: base\n"
        f"models:\n{models}"
        "parameters:\n  lambda: 1.0\n"
        "heads: auto            # each expert keeps its own classifier head, under heads/\n"
        "dtype: float32\nout_dtype: float32\n"
        "device: cpu            # the demo's numbers are CPU numbers\n"
        f"seed: {settings.seed}\n"
    )
    if ri:
        text += (
            "resolve_interference:\n"
            "  auxiliary_data: auxiliary.safetensors   # unlabeled images (key 'inputs'), none a training image\n"
            f"  steps: {settings.ri_steps}\n"
            f"  batch_size: {settings.ri_batch}\n"
            f"  lr: {settings.ri_lr}                # the paper's 1e-6 is for CLIP-size weights\n"
            "  weight_decay: 1.0e-4\n"
            "  alpha: 1.0\n"
            f"  cache_dir: {json.dumps(str((folder / 'ri-cache').resolve()))}   # adapted experts\n"
        )
    return text


def evaluate_merged(merged: Path, tasks: list[TaskData]) -> dict[str, float]:
    from transformers import AutoModelForImageClassification

    from .heads import load_with_head

    return {
        t.name: accuracy(load_with_head(merged, f"expert_{t.name}", AutoModelForImageClassification), t)
        for t in tasks
    }


def with_average(scores: dict[str, float]) -> dict[str, float]:
    rounded = {k: round(v, 4) for k, v in scores.items()}
    return {**rounded, "average": round(sum(scores.values()) / len(scores), 4)}


# ---------------------------------------------------------------- the demo


def prepare_folder(folder: Path) -> None:
    """A fresh demo folder; refuses one that holds something else, so a typo deletes no user data."""
    marker = folder / MARKER
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not marker.exists())):
        raise UserError(
            f"{folder} exists and is not a previous `ri-merge demo --ri` folder; pass --dir elsewhere"
        )
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    marker.touch()


@contextmanager
def _one_thread() -> Iterator[None]:
    """One torch thread: the same floating-point sums (so the same numbers) on every machine, and
    faster than several for a model this small."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def ri_demo(
    folder: str | Path = "ri-merge-demo-ri",
    *,
    quick: bool = False,
    progress: bool = False,
    settings: DemoSettings | None = None,
) -> DemoReport:
    """Generate, train, merge with and without RI, evaluate: see the module's docstring.

    `quick` is a smaller run (for tests); `progress` shows rich bars on stderr."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("ri-merge demo --ri needs transformers: pip install 'mergekit-ri[ri]'") from None
    from transformers.utils import logging as hf_logging

    from .api import MergeOptions, merge

    settings = settings or (QUICK if quick else FULL)
    folder = Path(folder)
    start = time.perf_counter()
    prepare_folder(folder)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with _one_thread(), DemoProgress(progress) as bars:
        tasks = make_tasks(settings.tasks, settings.train, settings.test, settings.seed)
        from safetensors.torch import save_file

        save_file(
            {
                "inputs": make_auxiliary(
                    settings.aux, settings.seed, settings.tasks if settings.aux_task_like else ()
                )
            },
            folder / "auxiliary.safetensors",
        )
        base_scores = build_models(folder, tasks, settings, bars)
        (folder / "settings.json").write_text(json.dumps(asdict(settings), indent=1))
        recipe, plain_recipe = folder / "recipe.yaml", folder / "recipe-no-ri.yaml"
        recipe.write_text(recipe_text(settings, tasks, folder, ri=True))
        plain_recipe.write_text(recipe_text(settings, tasks, folder, ri=False))
        merge(plain_recipe, folder / "merged-no-ri", options=MergeOptions(force=True, checksums=False))
        result = merge(
            recipe,
            folder / "merged-ri",
            options=MergeOptions(force=True, checksums=False, interference=True),
            events=_RIBars(bars),
        )
        experts = {}
        from transformers import AutoModelForImageClassification

        for t in tasks:
            experts[t.name] = accuracy(
                AutoModelForImageClassification.from_pretrained(folder / f"expert_{t.name}"), t
            )
        rows = {
            "base": with_average(base_scores),
            "experts": with_average(experts),
            "merge": with_average(evaluate_merged(folder / "merged-no-ri", tasks)),
            "ri_merge": with_average(evaluate_merged(folder / "merged-ri", tasks)),
        }
    xi = {k: round(v, 4) for k, v in (result.interference or {}).items()}
    report = DemoReport(rows, xi, time.perf_counter() - start, folder, recipe, plain_recipe)
    (folder / "results.json").write_text(json.dumps(report.to_json(), indent=1))
    return report


def render_table(report: DemoReport):
    """The rich table: a row per model, a column per task, accuracy in %."""
    from rich.table import Table

    tasks = [k for k in report.rows["base"] if k != "average"]
    table = Table(title="ri-merge demo --ri: test accuracy (%) per task, merged backbone + each task's head")
    table.add_column("model")
    for name in tasks:
        table.add_column(name, justify="right")
    table.add_column("average", justify="right", style="bold")
    for row in ROWS:
        scores = report.rows[row]
        table.add_row(ROW_NAMES[row], *(f"{100 * scores[k]:.1f}" for k in [*tasks, "average"]))
    return table
