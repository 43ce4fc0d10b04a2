"""The RI demo's data: procedural 16×16 grayscale image tasks, the base's pretext and RI's
unlabeled auxiliary images — generated from a seed, nothing downloaded.

Images are float32 `pixel_values` `[N, 1, 16, 16]` in [-1, 1] (mean = std = 0.5, as a ViT
image processor would make them).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

SIZE = 16
PATCH = 4

Maker = Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray, list[str]]]


@dataclass
class TaskData:
    name: str
    labels: list[str]
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def seed_for(name: str, seed: int) -> int:
    """A stable per-name seed (Python's hash() is salted per process)."""
    return zlib.crc32(f"{name}:{seed}".encode())


def grid() -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(SIZE) + 0.5) / SIZE * 2 - 1
    return np.meshgrid(c, c)


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """Float images in [0, 1] → model-ready `[N, 1, 16, 16]` in [-1, 1]."""
    return torch.from_numpy(np.clip(images, 0.0, 1.0).astype(np.float32)).sub(0.5).div(0.5).unsqueeze(1)


def smooth_noise(rng: np.random.Generator, n: int, passes: int = 2) -> np.ndarray:
    """Low-pass noise in [0, 1] (box blurs of white noise)."""
    x = rng.standard_normal((n, SIZE, SIZE))
    for _ in range(passes):
        x = (x + np.roll(x, 1, 1) + np.roll(x, -1, 1) + np.roll(x, 1, 2) + np.roll(x, -1, 2)) / 5
    lo, hi = x.min(axis=(1, 2), keepdims=True), x.max(axis=(1, 2), keepdims=True)
    return (x - lo) / (hi - lo + 1e-8)


def finish(images: np.ndarray, rng: np.random.Generator, noise: float = 0.08) -> np.ndarray:
    """Random contrast and offset, a little pixel noise."""
    n = images.shape[0]
    contrast = rng.uniform(0.6, 1.0, (n, 1, 1))
    offset = rng.uniform(0.0, 0.25, (n, 1, 1))
    return np.clip(offset + contrast * images * (1 - offset) + rng.normal(0, noise, images.shape), 0, 1)


def make_shapes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Filled circle / square / triangle / cross at random position, size and rotation."""
    names = ["circle", "square", "triangle", "cross"]
    labels = rng.integers(0, len(names), n)
    gx, gy = grid()
    cx, cy = rng.uniform(-0.15, 0.15, (2, n, 1, 1))
    radius = rng.uniform(0.55, 0.75, (n, 1, 1))
    angle = rng.uniform(-0.3, 0.3, (n, 1, 1))
    x, y = gx - cx, gy - cy
    u = np.cos(angle) * x + np.sin(angle) * y
    v = -np.sin(angle) * x + np.cos(angle) * y
    r = np.hypot(u, v)
    tri = np.max([np.cos(a) * u + np.sin(a) * v for a in (np.pi / 2, 7 * np.pi / 6, 11 * np.pi / 6)], axis=0)
    width = 0.3 * radius
    sdf = np.stack(
        [
            r - radius,
            np.maximum(np.abs(u), np.abs(v)) - 0.8 * radius,
            tri - 0.5 * radius,
            np.minimum(
                np.maximum(np.abs(u) - radius, np.abs(v) - width),
                np.maximum(np.abs(u) - width, np.abs(v) - radius),
            ),
        ]
    )[labels, np.arange(n)]
    shape = 1 / (1 + np.exp(sdf / 0.06))
    return finish(0.2 * smooth_noise(rng, n) + 0.8 * shape, rng), labels, names


def make_stripes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Gratings at 0°, 45°, 90° or 135° (± jitter), random frequency and phase."""
    names = ["0°", "45°", "90°", "135°"]
    labels = rng.integers(0, len(names), n)
    gx, gy = grid()
    angle = labels[:, None, None] * np.pi / 4 + rng.normal(0, 0.1, (n, 1, 1))
    freq = rng.uniform(1.5, 3.0, (n, 1, 1)) * np.pi
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    images = 0.5 + 0.5 * np.sin(freq * (np.cos(angle) * gx + np.sin(angle) * gy) + phase)
    return finish(images, rng, noise=0.12), labels, names


def make_textures(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Checkerboard, dots, rings or waves, at random frequency, angle and phase."""
    names = ["checker", "dots", "rings", "waves"]
    labels = rng.integers(0, len(names), n)
    gx, gy = grid()
    freq = rng.uniform(1.5, 2.5, (n, 1, 1)) * np.pi
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    angle = rng.uniform(0, np.pi, (n, 1, 1))
    u, v = np.cos(angle) * gx + np.sin(angle) * gy, -np.sin(angle) * gx + np.cos(angle) * gy
    s, c = np.sin(freq * u + phase), np.sin(freq * v + phase)
    centre = rng.uniform(-0.5, 0.5, (2, n, 1, 1))
    images = np.stack(
        [
            (s * c > 0).astype(float),
            ((s > 0.5) & (c > 0.5)).astype(float),
            0.5 + 0.5 * np.sin(1.5 * freq * np.hypot(gx - centre[0], gy - centre[1]) + phase),
            0.5 + 0.5 * np.sin(freq * u + 1.5 * np.sin(freq * v) + phase),
        ]
    )[labels, np.arange(n)]
    return finish(images, rng, noise=0.1), labels, names


def make_count(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """How many blobs, 1 to 4: a global question, unlike the others."""
    names = ["1", "2", "3", "4"]
    labels = rng.integers(0, len(names), n)
    gx, gy = grid()
    images = np.zeros((n, SIZE, SIZE))
    for i in range(n):
        centres: list[np.ndarray] = []
        while len(centres) < labels[i] + 1:
            c = rng.uniform(-0.7, 0.7, 2)
            if all(np.hypot(*(c - d)) > 0.6 for d in centres):
                centres.append(c)
        for cx, cy in centres:
            size = rng.uniform(0.1, 0.12)
            images[i] = np.maximum(images[i], np.exp(-((gx - cx) ** 2 + (gy - cy) ** 2) / (2 * size**2)))
    return finish(images, rng), labels, names


FONT = {  # 3×5 dot-matrix digits
    0: "111101101101111",
    1: "010110010010111",
    2: "111001111100111",
    3: "111001111001111",
    4: "101101111001001",
    5: "111100111001111",
    6: "111100111101111",
    7: "111001010010010",
    8: "111101111101111",
    9: "111101111001111",
}


def make_digits(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """3×5 dot-matrix digits, scaled 3×, placed with a little jitter: which digit."""
    labels = rng.integers(0, 10, n)
    images = np.zeros((n, SIZE, SIZE))
    glyphs = {d: np.array([int(c) for c in bits], dtype=float).reshape(5, 3) for d, bits in FONT.items()}
    for i, digit in enumerate(labels):
        glyph = np.kron(glyphs[int(digit)], np.ones((3, 3)))
        h, w = glyph.shape
        top, left = int(rng.integers(0, SIZE - h + 1)), int(rng.integers(2, SIZE - w - 1))
        images[i, top : top + h, left : left + w] = glyph
    return finish(0.15 * smooth_noise(rng, n) + 0.85 * images, rng), labels, [str(d) for d in range(10)]


MAKERS: dict[str, Maker] = {
    "shapes": make_shapes,
    "stripes": make_stripes,
    "textures": make_textures,
    "count": make_count,
    "digits": make_digits,
}


def draw(name: str, split: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """`n` images of task `name`, from a stream of their own per split (so that a smaller test
    split leaves the training split, and everything trained on it, unchanged)."""
    images, labels, label_names = MAKERS[name](np.random.default_rng(seed_for(f"{name}:{split}", seed)), n)
    return pixel_values(images), torch.from_numpy(labels.astype(np.int64)), label_names


def make_tasks(names: tuple[str, ...], train: int, test: int, seed: int) -> list[TaskData]:
    tasks = []
    for name in names:
        train_x, train_y, label_names = draw(name, "train", train, seed)
        test_x, test_y, _ = draw(name, "test", test, seed)
        tasks.append(TaskData(name, label_names, train_x, train_y, test_x, test_y))
    return tasks


def unlabeled_task_images(names: tuple[str, ...], n: int, seed: int) -> np.ndarray:
    """`n` fresh images of the tasks' kinds, labels thrown away, as [0, 1] floats."""
    per = [n // len(names) + (i < n % len(names)) for i in range(len(names))]
    return np.concatenate(
        [
            MAKERS[name](np.random.default_rng(seed_for(f"{name}:unlabeled", seed)), k)[0]
            for name, k in zip(names, per)
        ]
    )


def ink_quadrant(x: torch.Tensor) -> torch.Tensor:
    """Which quadrant holds the most ink (brightness above the image's mean): a label any image
    has, whatever its task."""
    ink = (x[:, 0] - x[:, 0].mean(dim=(1, 2), keepdim=True)).clamp(min=0)
    h = SIZE // 2
    quads = torch.stack(
        [
            ink[:, :h, :h].sum((1, 2)),
            ink[:, :h, h:].sum((1, 2)),
            ink[:, h:, :h].sum((1, 2)),
            ink[:, h:, h:].sum((1, 2)),
        ],
        1,
    )
    return quads.argmax(1)


def make_pretext(tasks: list[TaskData], n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The base's pretraining: `n` images drawn from the tasks' training images and from noise,
    labelled only by where they come from and which quadrant holds most ink — never by a task
    label — so the base has seen every input domain (as CLIP had) without knowing any task."""
    rng = np.random.default_rng(seed_for("pretext", seed))
    per = n // (len(tasks) + 1)
    xs, domains = [], []
    for d, task in enumerate(tasks):
        pick = torch.from_numpy(rng.choice(len(task.train_y), per, replace=per > len(task.train_y)))
        xs.append(task.train_x[pick])
        domains.append(torch.full((per,), d))
    xs.append(pixel_values(finish(smooth_noise(rng, per), rng)))
    domains.append(torch.full((per,), len(tasks)))
    x, domain = torch.cat(xs), torch.cat(domains)
    y = domain * 4 + ink_quadrant(x)
    names = [f"{source}@q{q}" for source in [t.name for t in tasks] + ["noise"] for q in range(4)]
    order = torch.from_numpy(rng.permutation(len(y)))
    return x[order], y[order], names


def scribbles(rng: np.random.Generator, n: int) -> np.ndarray:
    """One to three random smooth strokes (cubic Bézier curves) per image."""
    gx, gy = grid()
    t = np.linspace(0, 1, 32)[None, :, None]
    out = np.zeros((n, SIZE, SIZE))
    strokes = rng.integers(1, 4, n)
    for s in range(3):
        ctrl = rng.uniform(-0.85, 0.85, (n, 4, 2))
        curve = (
            (1 - t) ** 3 * ctrl[:, None, 0]
            + 3 * (1 - t) ** 2 * t * ctrl[:, None, 1]
            + 3 * (1 - t) * t**2 * ctrl[:, None, 2]
            + t**3 * ctrl[:, None, 3]
        )
        d2 = (gx.reshape(1, 1, -1) - curve[..., :1]) ** 2 + (gy.reshape(1, 1, -1) - curve[..., 1:]) ** 2
        drawn = np.exp(-d2.min(axis=1) / (2 * 0.1**2)).reshape(n, SIZE, SIZE)
        out = np.where((s < strokes)[:, None, None], np.maximum(out, drawn), out)
    return out


def ellipses(rng: np.random.Generator, n: int) -> np.ndarray:
    """One to three random filled ellipses per image."""
    gx, gy = grid()
    out = np.zeros((n, SIZE, SIZE))
    for _ in range(3):
        cx, cy = rng.uniform(-0.7, 0.7, (2, n, 1, 1))
        a, b = rng.uniform(0.1, 0.6, (2, n, 1, 1))
        t = rng.uniform(0, np.pi, (n, 1, 1))
        u = np.cos(t) * (gx - cx) + np.sin(t) * (gy - cy)
        v = -np.sin(t) * (gx - cx) + np.cos(t) * (gy - cy)
        keep = rng.random((n, 1, 1)) < 0.6
        out = np.maximum(out, keep / (1 + np.exp(np.minimum(((u / a) ** 2 + (v / b) ** 2 - 1) / 0.2, 50.0))))
    return out


def bit_blocks(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random 3×5 bit patterns scaled 3× (no digit's), placed at random."""
    out = np.zeros((n, SIZE, SIZE))
    for i in range(n):
        block = np.kron(rng.random((5, 3)) < 0.5, np.ones((3, 3)))
        top, left = int(rng.integers(0, SIZE - 15 + 1)), int(rng.integers(0, SIZE - 9 + 1))
        out[i, top : top + 15, left : left + 9] = block
    return out


def make_auxiliary(n: int, seed: int, tasks: tuple[str, ...] = ()) -> torch.Tensor:
    """RI's unlabeled auxiliary images: from generators no task uses (smooth noise, scribbles,
    random ellipses, random bit blocks), and with `tasks` half of them fresh unlabeled images of
    those tasks' kinds."""
    rng = np.random.default_rng(seed_for("auxiliary", seed))
    own = n // 2 if tasks else 0
    k = (n - own) // 4
    images = np.concatenate(
        [smooth_noise(rng, k), scribbles(rng, k), ellipses(rng, k), bit_blocks(rng, n - own - 3 * k)]
        + ([unlabeled_task_images(tasks, own, seed)] if own else [])
    )
    return pixel_values(finish(images[rng.permutation(n)], rng)).contiguous()
