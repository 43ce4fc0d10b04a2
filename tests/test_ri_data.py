"""RI's auxiliary data from a folder of images: preprocessing, determinism, the CLI, bad folders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, write_recipe
from helpers import EXPERTS, make_classifiers, vit

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")
from mergekit_ri.errors import UserError  # noqa: E402
from mergekit_ri.ri.data import load_auxiliary  # noqa: E402


@pytest.fixture
def vits(tmp_path, monkeypatch):
    monkeypatch.setenv("RI_MERGE_CACHE", str(tmp_path / "cache"))
    return make_classifiers(tmp_path / "vit", vit, [3, 5, 2], drift=0.3)


def write_images(folder: Path, count: int = 5, seed: int = 0) -> list[Path]:
    """Small RGB images of assorted sizes and formats, some in a subfolder."""
    rng = np.random.default_rng(seed)
    formats = [
        ("a/img{}.png", "PNG"),
        ("img{}.jpg", "JPEG"),
        ("b/c/img{}.bmp", "BMP"),
        ("img{}.png", "PNG"),
        ("img{}.webp", "WEBP"),
    ]
    paths = []
    for i in range(count):
        pattern, kind = formats[i % len(formats)]
        path = folder / pattern.format(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        size = (10 + 3 * i, 12 + i)
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(path, kind)
        paths.append(path)
    (folder / "notes.txt").write_text("not an image; ignored\n")
    return sorted(paths, key=lambda p: p.relative_to(folder).as_posix())


def config_of(folder: Path):
    return transformers.AutoConfig.from_pretrained(folder)


def expected_fallback(path: Path) -> torch.Tensor:
    """The documented fallback: to the model's channels (L), bilinear to image_size, [0,1], (x-0.5)/0.5."""
    with Image.open(path) as image:
        resized = image.convert("L").resize((8, 8), Image.Resampling.BILINEAR)
    return (torch.from_numpy(np.asarray(resized, dtype=np.float32))[None] / 255.0 - 0.5) / 0.5


def all_pixels(aux) -> torch.Tensor:
    return aux.images.load(list(range(aux.count)))


def test_fallback_preprocessing_is_resize_and_half_normalisation(tmp_path, vits):
    files = write_images(tmp_path / "images")
    aux = load_auxiliary(
        str(tmp_path / "images"),
        "pixel_values",
        config_of(vits["e0"]),
        None,
        None,
        128,
        processor_folders=(vits["e0"], vits["base"]),
    )
    assert aux.count == len(files) and aux.images.files == files  # recursive, sorted, only images
    pixels = all_pixels(aux)
    assert pixels.shape == (5, 1, 8, 8) and pixels.dtype == torch.float32
    assert -1.0 <= pixels.min() and pixels.max() <= 1.0
    for i, path in enumerate(files):
        torch.testing.assert_close(pixels[i], expected_fallback(path))
    # batches are a seeded sample of the folder, the same for the same seed
    first = [b["pixel_values"] for b in aux.batches(3, 4, seed=7)]
    again = [b["pixel_values"] for b in aux.batches(3, 4, seed=7)]
    assert all(a.shape == (3, 1, 8, 8) and torch.equal(a, b) for a, b in zip(first, again))
    other = [b["pixel_values"] for b in aux.batches(3, 4, seed=8)]
    assert any(not torch.equal(a, b) for a, b in zip(first, other))
    # every batch row is one of the folder's images
    assert all(any(torch.equal(row, p) for p in pixels) for batch in first for row in batch)


def test_the_models_own_image_processor_is_used(tmp_path, vits):
    files = write_images(tmp_path / "images", count=3)
    processor = transformers.ViTImageProcessor(
        size={"height": 8, "width": 8}, image_mean=[0.2], image_std=[0.4]
    )
    processor.save_pretrained(vits["e0"])
    aux = load_auxiliary(
        str(tmp_path / "images"),
        "pixel_values",
        config_of(vits["e0"]),
        None,
        None,
        128,
        processor_folders=(vits["e0"], vits["base"]),
    )
    expected = processor(images=[Image.open(f).convert("L") for f in files], return_tensors="pt")[
        "pixel_values"
    ]
    torch.testing.assert_close(all_pixels(aux), expected.float())
    assert not torch.allclose(all_pixels(aux), torch.stack([expected_fallback(f) for f in files]))


def test_fingerprint_follows_the_images(tmp_path, vits):
    files = write_images(tmp_path / "images", count=3)
    config = config_of(vits["e0"])
    before = load_auxiliary(str(tmp_path / "images"), "pixel_values", config, None, None, 128).fingerprint
    assert (
        load_auxiliary(str(tmp_path / "images"), "pixel_values", config, None, None, 128).fingerprint
        == before
    )
    Image.new("RGB", (9, 9), (1, 2, 3)).save(files[0])
    os.utime(files[0], ns=(1, 1))
    assert (
        load_auxiliary(str(tmp_path / "images"), "pixel_values", config, None, None, 128).fingerprint
        != before
    )


def ri_recipe(tmp_path: Path, vits, aux, **ri) -> Path:
    settings = {"auxiliary_data": str(aux), "steps": 3, "batch_size": 4, "lr": 1e-3, **ri}
    return write_recipe(
        tmp_path / "ri.yaml",
        merge_method="ties",
        base_model=str(vits["base"]),
        models=[{"model": str(vits[e])} for e in EXPERTS],
        out_dtype="float32",
        resolve_interference=settings,
    )


def test_cli_merges_with_an_image_folder_relative_to_the_recipe(tmp_path, vits):
    write_images(tmp_path / "images")
    result = run_cli("merge", ri_recipe(tmp_path, vits, "./images/"), "-o", tmp_path / "out", "--json")
    assert result.code == 0, result.stderr
    assert (tmp_path / "out" / "heads" / "index.json").is_file()


def test_empty_image_folder_is_a_one_line_error(tmp_path, vits):
    (tmp_path / "images" / "sub").mkdir(parents=True)
    (tmp_path / "images" / "readme.txt").write_text("no images here")
    result = run_cli("merge", ri_recipe(tmp_path, vits, tmp_path / "images"), "-o", tmp_path / "out")
    assert (
        result.code == 2 and "holds no images" in result.stderr and str(tmp_path / "images") in result.stderr
    )
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_unreadable_image_is_named(tmp_path, vits):
    write_images(tmp_path / "images", count=2)
    bad = tmp_path / "images" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    result = run_cli("merge", ri_recipe(tmp_path, vits, tmp_path / "images"), "-o", tmp_path / "out")
    assert result.code == 2 and str(bad) in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_truncated_image_is_named_when_decoded(tmp_path, vits):
    write_images(tmp_path / "images", count=2)
    good = tmp_path / "images" / "img3.png"
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8) + 7).save(good)
    good.write_bytes(good.read_bytes()[:60])  # the header survives, the pixels do not
    with pytest.raises(UserError, match="img3.png"):
        load_auxiliary(
            str(tmp_path / "images"), "pixel_values", config_of(vits["e0"]), None, None, 128
        ).images.load([0, 1, 2])


def test_image_folder_for_a_text_model_is_refused(tmp_path):
    write_images(tmp_path / "images", count=1)
    with pytest.raises(UserError, match="needs an image model"):
        load_auxiliary(str(tmp_path / "images"), "input_ids", None, None, None, 128)
